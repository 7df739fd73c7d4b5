"""Sink metrics on synthetic tensors with planted answers: token sinks, aligned hidden states, massive
activations, lifetime labels, the loss and ACT's calibration edit."""

from __future__ import annotations

import math

import pytest
import torch

from lens import ScaleSinks
from metrics.attention import key_importance, queries_seeing, received_attention
from metrics.hidden import cosine_to_position, median_magnitude, position_norms, top_magnitudes
from metrics.loss import next_token_loss, next_token_loss_sum
from metrics.sinks import (
    aligned_with_first,
    first_sinks,
    formation,
    is_massive,
    jump_window,
    lifetime_label,
    raised_layers,
    sink_mask,
    sink_rate,
    sink_rate_per_prompt,
)
from metrics.uncertainty import column_mean_intervals


def _causal_uniform(n: int) -> torch.Tensor:
    return torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]


def test_planted_first_and_later_sinks_are_found_and_the_tail_is_not():
    n = 20
    probs = _causal_uniform(n).repeat(3, 1, 1)  # head query key
    probs[0] = 0.0
    probs[0, :, 0] = 1.0  # head 0: a first-token sink only
    probs[1, 6:] *= 0.5  # head 1: half of every row from 6 on goes to position 5 (a later sink)
    probs[1, 6:, 5] += 0.5
    probs[2, 15:] *= 0.1  # head 2: rows 15.. put 0.9 on key 15, seen by only 5 queries
    probs[2, 15:, 15] += 0.9
    importance = key_importance(received_attention(probs))
    mask = sink_mask(importance, queries_seeing(n), tau=0.1, min_queries=8)
    assert mask[0].nonzero().flatten().tolist() == [0]
    assert 5 in mask[1].nonzero().flatten().tolist()
    assert importance[2, 15] > 0.9 and not mask[2, 15]  # seen by 5 < 8 queries
    first = first_sinks(mask)
    for head in range(3):
        flagged = mask[head].nonzero().flatten()
        assert first[head].nonzero().flatten().tolist() == flagged[:1].tolist()


def test_sink_rate_thresholds_each_prompt_before_averaging():
    """Gu et al.'s Sink_k^eps: a head that is a strong sink on one prompt and not on the other counts on
    half the prompts, though its mean importance (0.5) is over eps; a head at 0.25 on both never counts."""
    importance = torch.tensor([[[0.9, 0.25, 0.1, 0.1]], [[0.1, 0.25, 0.1, 0.1]]])  # prompt layer head
    assert sink_rate_per_prompt(importance, 0.3).tolist() == [25.0, 0.0]
    assert sink_rate(importance, 0.3) == 12.5
    # Thresholding the mean over prompts instead (the old definition) would say 25%.
    assert float((importance.mean(0) > 0.3).double().mean() * 100) == 25.0
    # Equal to a direct count over (prompt, layer, head) triples.
    assert sink_rate(importance, 0.3) == 100.0 * sum(v > 0.3 for v in importance.flatten().tolist()) / importance.numel()


def test_column_mean_intervals_cover_each_column_mean():
    rng = torch.Generator().manual_seed(0)
    values = torch.randn(40, 3, generator=rng).double().numpy() + [0.0, 5.0, -2.0]
    values[:, 2] = -2.0  # a constant column: the interval is the value
    low, high, method = column_mean_intervals(values, seed=0)
    means = values.mean(axis=0)
    assert (low <= means).all() and (means <= high).all() and "bootstrap" in method
    assert low[2] == high[2] == -2.0 and (high[:2] - low[:2] > 0.2).all() and (high[:2] - low[:2] < 1.5).all()
    one = column_mean_intervals(values[:1], seed=0)
    assert torch.isnan(torch.as_tensor(one[0])).all()


def test_first_sinks_is_the_lowest_flagged_position():
    mask = torch.tensor([[False, True, False, True], [False, False, False, False], [True, True, True, True]])
    assert first_sinks(mask).tolist() == [[False, True, False, False], [False] * 4, [True, False, False, False]]


def test_active_layers_by_norm_ratio_keep_every_raised_stretch():
    first = torch.tensor([10.0, 50.0, 52.0, 11.0, 900.0, 880.0, 300.0])
    median = torch.full((7,), 10.0)
    assert raised_layers(first, median, 2.0).tolist() == [False, True, True, False, True, True, True]
    # The reference code's window: after the largest rise (layer 4) up to the largest fall after it (6).
    assert jump_window(first).nonzero().flatten().tolist() == [4, 5]


def test_planted_aligned_hidden_state_forms_a_secondary_sink():
    torch.manual_seed(0)
    n_layers, n_pos, d = 12, 10, 16
    hidden = torch.randn(n_layers, n_pos, d)
    sink_direction = torch.randn(d)
    hidden[:, 0] = 50 * sink_direction
    hidden[3:8, 6] = -20 * sink_direction + 0.01 * torch.randn(5, d)  # aligned (negatively) in layers 3..7
    hidden[5, 2] = 30 * sink_direction  # one layer only: noise
    cosine = torch.stack([cosine_to_position(h, 0) for h in hidden])
    norms = torch.stack([position_norms(h) for h in hidden])
    active = raised_layers(norms[:, 0], norms.median(dim=1).values, 2.0)
    assert active.all()
    aligned = aligned_with_first(cosine, active, 0.9)
    first, last, lifetime = formation(aligned)
    assert (first[6].item(), last[6].item(), lifetime[6].item()) == (3, 7, 5)
    assert (first[2].item(), lifetime[2].item()) == (5, 1)
    assert (first[4].item(), last[4].item(), lifetime[4].item()) == (-1, -1, 0)
    assert lifetime[0].item() == n_layers
    # Thresholds scale with depth: at 12 layers noise <= 1.2, primary >= 7.5.
    assert [lifetime_label(int(n), n_layers, 0.1, 0.625) for n in (lifetime[0], lifetime[6], lifetime[2])] == ["primary", "secondary", "noise"]
    # At 40 layers they are the reference's > 4 and < L - 15 = 25.
    assert [lifetime_label(n, 40, 0.1, 0.625) for n in (4, 5, 24, 25)] == ["noise", "secondary", "secondary", "primary"]


def test_planted_massive_activation_is_the_top_entry():
    torch.manual_seed(0)
    hidden = torch.randn(30, 64)
    hidden[7, 41] = -2500.0
    hidden[3, 2] = 150.0
    values, positions, channels = top_magnitudes(hidden, 3)
    assert values[:2].tolist() == [-2500.0, 150.0]
    assert positions[:2].tolist() == [7, 3] and channels[:2].tolist() == [41, 2]
    median = median_magnitude(hidden)
    assert median == hidden.abs().flatten().median()
    assert is_massive(values, median.expand(3), 100.0, 1000.0).tolist() == [True, False, False]


def test_next_token_loss_is_mean_cross_entropy_of_the_next_token():
    torch.manual_seed(0)
    logits, tokens = torch.randn(5, 11), torch.tensor([3, 1, 4, 1, 5])
    direct = -sum(torch.log_softmax(logits[t], -1)[tokens[t + 1]] for t in range(4)) / 4
    assert next_token_loss(logits, tokens) == pytest.approx(float(direct), abs=1e-6)
    uniform = torch.zeros(5, 11)
    assert next_token_loss(uniform, tokens) == pytest.approx(math.log(11), abs=1e-6)


def test_next_token_loss_summed_over_chunks_equals_the_mean():
    torch.manual_seed(1)
    logits, tokens = torch.randn(7, 13), torch.randint(0, 13, (7,))
    chunks = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([6])]  # the last position has no target
    total = sum(next_token_loss_sum(logits[c], c, tokens) for c in chunks)
    assert total / 6 == pytest.approx(next_token_loss(logits, tokens), abs=1e-6)
    assert next_token_loss_sum(logits[[6]], torch.tensor([6]), tokens) == 0.0


def test_scale_sinks_equals_act_formula():
    torch.manual_seed(0)
    n = 9
    scores = torch.randn(1, 3, n, n).masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool)), float("-inf"))
    probs = scores.softmax(-1)
    edited = ScaleSinks(layer=0, heads=[0, 2], sink_positions=[2, 5], beta=0.4).edit_probs(probs, torch.arange(n))
    torch.testing.assert_close(edited[:, 1], probs[:, 1], atol=0, rtol=0)  # head 1 untouched
    for head in (0, 2):
        for t in range(n):
            row = probs[0, head, t]
            sinks = [s for s in (2, 5) if s <= t]
            expected = row.clone()
            if sinks:
                sink_mass = row[sinks].sum()
                others = [s for s in range(t + 1) if s not in sinks]
                expected[sinks] = 0.4 * row[sinks]
                expected[others] = row[others] + 0.6 * sink_mass * row[others] / row[others].sum()
            torch.testing.assert_close(edited[0, head, t], expected, atol=1e-6, rtol=0)
            assert edited[0, head, t].sum() == pytest.approx(1.0, abs=1e-6)
