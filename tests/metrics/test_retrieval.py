"""Retrieval metrics on synthetic tensors with planted answers."""

from __future__ import annotations

import pytest
import torch

from metrics.retrieval import (
    contains_verbatim,
    copy_hits,
    fraction_above,
    retrieval_credit,
    retrieval_scores,
    top_key,
    unigram_recall,
    words,
)


def test_copy_credit_counts_only_top1_needle_keys_holding_the_generated_token():
    context = torch.tensor([5, 6, 7, 8, 9, 7, 11, 12])  # needle span [2, 5) holds 7 8 9; key 5 holds 7 too
    generated = torch.tensor([7, 8, 9, 13])
    probs = torch.full((3, 4, 8), 0.01)
    # head 0 copies every needle token in order; head 1 looks at the needle but at the wrong token;
    # head 2 attends to the 7 outside the needle (key 5), which must not count.
    for row, key in enumerate([2, 3, 4, 0]):
        probs[0, row, key] = 0.9
    for row, key in enumerate([3, 4, 2, 2]):
        probs[1, row, key] = 0.9
    probs[2, :, 5] = 0.9
    hits = copy_hits(top_key(probs), generated, context, (2, 5))
    assert hits.tolist() == [[True, True, True, False], [False, False, False, False], [False, False, False, False]]
    credit = retrieval_credit(hits, needle_length=3)
    torch.testing.assert_close(credit, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


def test_top_key_takes_the_earliest_of_tied_keys():
    assert top_key(torch.tensor([[0.25, 0.5, 0.5, 0.0]])).tolist() == [1]


def test_retrieval_scores_average_counted_trials_only():
    credits = torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]], [[9.0, 9.0]]], dtype=torch.float64)  # trial layer head
    counted = torch.tensor([True, True, False])
    torch.testing.assert_close(retrieval_scores(credits, counted), torch.tensor([[0.75, 0.25]], dtype=torch.float64))
    assert retrieval_scores(credits, torch.zeros(3, dtype=torch.bool)).eq(0).all()
    assert fraction_above(torch.tensor([[0.05, 0.1, 0.11, 0.9]])) == 0.5


@pytest.mark.parametrize(
    ("reference", "candidate", "recall"),
    [
        ("in a cellar beneath the old mill", "It was found in a cellar beneath the old mill.", 1.0),
        ("in a cellar beneath the old mill", "In the old mill.", 4 / 7),
        ("4817-2290", "The code is 4817 2290", 1.0),
        ("4817-2290", "The code is 4817-2209", 0.5),
        ("the the cat", "the cat", 2 / 3),
        ("", "anything", 0.0),
    ],
)
def test_unigram_recall(reference, candidate, recall):
    assert unigram_recall(reference, candidate) == pytest.approx(recall)


def test_words_and_verbatim_match_ignore_case_and_punctuation():
    assert words("Thornbury's OLD-mill, 42!") == ["thornbury", "s", "old", "mill", "42"]
    assert contains_verbatim("the old mill in Thornbury", "Found beneath The Old Mill in thornbury.")
    assert not contains_verbatim("the old mill in Thornbury", "Thornbury, in the old mill")
    assert not contains_verbatim("", "anything")
