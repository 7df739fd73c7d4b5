"""Retrieval metrics on synthetic tensors with planted answers."""

from __future__ import annotations

import random

import pytest
import torch

from metrics.retrieval import (
    contains_verbatim,
    copy_hits,
    fraction_above,
    layer_matched_control,
    random_control,
    rank_heads,
    retrieval_credit,
    retrieval_scores,
    top_key,
    top_list,
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


def test_ranking_puts_scores_first_and_orders_ties_by_seed_not_by_index():
    scores = torch.zeros(6, 4, dtype=torch.float64)
    scores[5, 3], scores[2, 1], scores[4, 0], scores[0, 2] = 0.9, 0.5, 0.5, 0.5
    ranking = rank_heads(scores, seed=0)
    assert ranking[0] == (5, 3) and set(ranking[1:4]) == {(2, 1), (4, 0), (0, 2)} and len(set(ranking)) == 24
    assert ranking == rank_heads(scores, seed=0)
    # The 20 heads tied at zero come in a seeded order, not layer 0 first.
    orders = {tuple(rank_heads(scores, seed)[4:]) for seed in range(10)}
    assert len(orders) > 1 and any(order[0][0] > 0 for order in orders)
    tied_orders = {tuple(rank_heads(scores, seed)[1:4]) for seed in range(20)}
    assert len(tied_orders) > 1


def test_top_list_holds_only_positive_scores_and_is_capped():
    scores = torch.zeros(3, 3, dtype=torch.float64)
    scores[2, 2], scores[1, 0] = 0.4, 0.01
    ranking = rank_heads(scores, seed=1)
    assert top_list(ranking, scores, 5) == [(2, 2), (1, 0)]
    assert top_list(ranking, scores, 1) == [(2, 2)]
    assert top_list(ranking, torch.zeros(3, 3), 5) == []


def test_controls_avoid_the_top_list_and_match_layers():
    shape = (30, 9)
    top = [(18, 6), (18, 7), (17, 3), (23, 2), (5, 0)]
    excluded = set(top) | {(17, 4)}
    counts = {}
    for seed in range(200):
        uniform = random_control(top, excluded, shape, random.Random(seed))
        assert len(set(uniform)) == 5 and not set(uniform) & excluded
        matched = layer_matched_control(top, excluded, shape, random.Random(seed))
        assert sorted(layer for layer, _ in matched) == sorted(layer for layer, _ in top) and not set(matched) & excluded
        for head in uniform:
            counts[head] = counts.get(head, 0) + 1
    # Uniform over the 264 heads left: about 200 * 5 / 264 = 3.8 draws each; every layer gets drawn.
    assert len({layer for layer, _ in counts}) == 30 and max(counts.values()) < 15
    assert random_control(top, excluded, shape, random.Random(3)) == random_control(top, excluded, shape, random.Random(3))
    full_layer = [(0, head) for head in range(9)]
    with pytest.raises(ValueError, match="layer 0 has 0 heads outside the top list, 9 needed"):
        layer_matched_control(full_layer, set(full_layer), shape, random.Random(0))
    with pytest.raises(ValueError, match="cannot draw 9 heads from the 0"):
        random_control(full_layer, set(full_layer), (1, 9), random.Random(0))
