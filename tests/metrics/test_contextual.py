"""Contextual-head metrics on synthetic tensors with planted answers, the focused mass against attention
with the direction added, and why key vectors do nothing."""

from __future__ import annotations

import pytest
import torch

from lens._capture.attention import attention_probs
from metrics.contextual import focused_set_mass, heads_mean, score_ranks, set_mass, span_keys, top_heads


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


def test_focused_set_mass_equals_attention_with_the_direction_added_to_the_query():
    """Reweighting the old rows by exp(scaling * v . k) is the softmax of (q + v) . k, masks included."""
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(1, 4, 9, 16, generator=generator)
    key = torch.randn(1, 2, 9, 16, generator=generator)
    allowed = (torch.arange(9)[None, :] <= torch.arange(9)[:, None])[None, None]
    allowed = allowed & (torch.arange(9)[None, :] >= torch.arange(9)[:, None] - 4)  # a sliding window of 5
    direction = torch.randn(4, 16, generator=generator)
    scaling = 0.3
    plain = attention_probs(query, key, allowed, scaling)[0]
    shifted = attention_probs(query + direction[None, :, None, :], key, allowed, scaling)[0]
    gold = span_keys(9, [(3, 6)])
    keys = key[0].repeat_interleave(2, dim=0)  # each query head's keys
    got = focused_set_mass(plain, keys, direction, torch.full((4,), scaling), gold)
    torch.testing.assert_close(got, set_mass(shifted, gold), atol=1e-5, rtol=0)
    # A zero direction leaves the mass as it was; the shifted mass above differs from it.
    torch.testing.assert_close(focused_set_mass(plain, keys, torch.zeros(4, 16), torch.full((4,), scaling), gold), set_mass(plain, gold))
    assert (set_mass(shifted, gold) - set_mass(plain, gold)).abs().max() > 0.05


def test_focused_set_mass_is_differentiable_and_rises_along_the_gold_keys():
    # One head, one row, uniform over 4 keys; the gold key is e0, the others e1..e3: moving the
    # direction along e0 raises the gold mass, with a positive gradient along e0.
    probs = torch.full((1, 1, 4), 0.25)
    keys = torch.eye(4)[None]
    gold = span_keys(4, [(0, 1)])
    direction = torch.zeros(1, 4, requires_grad=True)
    mass = focused_set_mass(probs, keys, direction, torch.ones(1), gold)
    assert mass.item() == 0.25
    mass.sum().backward()
    assert direction.grad[0, 0] > 0 and (direction.grad[0, 1:] < 0).all()
    expected = torch.e / (torch.e + 3)
    assert focused_set_mass(probs, keys, torch.tensor([[1.0, 0, 0, 0]]), torch.ones(1), gold).item() == pytest.approx(expected)
