"""Contextual-head metrics on synthetic tensors with planted answers, and why key vectors do nothing."""

from __future__ import annotations

import torch

from lens._capture.attention import attention_probs
from metrics.contextual import heads_mean, score_ranks, set_mass, span_keys, top_heads


def test_span_keys_marks_half_open_spans():
    keys = span_keys(10, [(2, 4), (7, 8)])
    assert keys.tolist() == [False, False, True, True, False, False, False, True, False, False]
    assert not span_keys(5, []).any()


def test_set_mass_recovers_planted_mass():
    # 2 heads, 3 rows, 6 keys: row r of head h puts (h + 1) * 0.1 on each of keys 2..3 and the rest on key 0.
    probs = torch.zeros(2, 3, 6)
    for head in range(2):
        probs[head, :, 2:4] = (head + 1) * 0.1
        probs[head, :, 0] = 1 - 2 * (head + 1) * 0.1
    mass = set_mass(probs, span_keys(6, [(2, 4)]))
    torch.testing.assert_close(mass, torch.tensor([[0.2] * 3, [0.4] * 3]))
    torch.testing.assert_close(set_mass(probs, span_keys(6, [(0, 1)])), torch.tensor([[0.8] * 3, [0.6] * 3]))


def test_set_mass_ignores_keys_past_the_block():
    # A block of early rows has fewer keys than the sequence: keys beyond it carry no attention.
    probs = torch.full((1, 1, 4), 0.25)
    assert set_mass(probs, span_keys(9, [(3, 9)])).item() == 0.25


def test_top_heads_and_ranks_find_planted_heads():
    scores = torch.rand(5, 4, generator=torch.Generator().manual_seed(0)) * 0.1
    scores[3, 1], scores[0, 2], scores[4, 0] = 0.9, 0.8, 0.7
    assert top_heads(scores, 3) == [(3, 1), (0, 2), (4, 0)]
    ranks = score_ranks(scores)
    assert (ranks[3, 1], ranks[0, 2], ranks[4, 0]) == (1, 2, 3)
    assert sorted(ranks.flatten().tolist()) == list(range(1, 21))
    # Ties keep the lower flat index first, the same order in both functions.
    tied = torch.zeros(2, 2)
    assert top_heads(tied, 4) == [(0, 0), (0, 1), (1, 0), (1, 1)] and score_ranks(tied).flatten().tolist() == [1, 2, 3, 4]


def test_heads_mean_over_selected_heads():
    values = torch.arange(12.0).view(3, 4)
    assert heads_mean(values, [(0, 1), (2, 3)]).item() == (1 + 11) / 2
    batched = torch.stack([values, 2 * values])
    torch.testing.assert_close(heads_mean(batched, [(1, 0)]), torch.tensor([4.0, 8.0]))


def test_vector_added_to_every_key_is_cancelled_by_softmax():
    """q . (k_s + v) = q . k_s + q . v: the same constant for every key s of a row, which softmax removes.
    The same vector added to the query changes the scores by k_s . v, different for each key."""
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(1, 4, 7, 16, generator=generator)
    key = torch.randn(1, 2, 7, 16, generator=generator)  # grouped: 2 query heads per key head
    allowed = (torch.arange(7)[None, :] <= torch.arange(7)[:, None])[None, None]
    vector = 3.0 * torch.randn(1, 2, 1, 16, generator=generator)
    plain = attention_probs(query, key, allowed, 0.25)
    shifted_keys = attention_probs(query, key + vector, allowed, 0.25)
    torch.testing.assert_close(shifted_keys, plain, atol=1e-6, rtol=0)
    shifted_query = attention_probs(query + vector.repeat_interleave(2, dim=1), key, allowed, 0.25)
    assert (shifted_query - plain).abs().max() > 0.05
