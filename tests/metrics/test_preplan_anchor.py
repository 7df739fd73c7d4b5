"""Preplan/anchor metrics on synthetic attention with planted local (sawtooth) and global (stripe) heads
and planted WAAD / FAI peaks."""

from __future__ import annotations

import math

import numpy as np
import torch

from metrics import preplan_anchor as pa

T = 60
CHUNK = 6
ANCHORS = (0, 20, 40)


def sawtooth() -> torch.Tensor:
    """Each row attends uniformly from the start of its chunk of CHUNK tokens up to itself."""
    probs = torch.zeros(T, T)
    for t in range(T):
        start = (t // CHUNK) * CHUNK
        probs[t, start : t + 1] = 1.0 / (t + 1 - start)
    return probs


def stripes() -> torch.Tensor:
    """Each row attends uniformly to the anchors it can see (vertical stripes)."""
    probs = torch.zeros(T, T)
    for t in range(T):
        seen = [a for a in ANCHORS if a <= t]
        probs[t, seen] = 1.0 / len(seen)
    return probs


def heads() -> torch.Tensor:
    return torch.stack([sawtooth(), stripes(), 0.5 * sawtooth() + 0.5 * stripes(), stripes()])


def test_attention_distance_separates_sawtooth_from_stripes():
    positions = torch.arange(T)
    distance = pa.attention_distance(heads(), positions).mean(dim=-1)
    # Sawtooth: mean offset within a chunk, (CHUNK - 1) / 2 averaged over positions in the chunk.
    expected_local = torch.tensor([sum(range(j + 1)) / (j + 1) for j in range(CHUNK)]).mean()
    assert torch.isclose(distance[0], expected_local, atol=1e-5)
    assert distance[1] > 5 * distance[0]
    local, global_ = pa.head_groups(distance.view(2, 2), 0.25)
    assert local.flatten().tolist() == [True, False, False, False]
    assert global_.flatten().tolist() == [False, True, False, False]  # tie between heads 1 and 3: the earlier wins


def test_head_groups_respect_eligibility():
    distance = torch.arange(12.0).view(3, 4)
    eligible = torch.zeros(3, 4, dtype=torch.bool)
    eligible[1] = True
    local, global_ = pa.head_groups(distance, 0.5, eligible)
    assert torch.nonzero(local).tolist() == [[1, 0], [1, 1]]
    assert torch.nonzero(global_).tolist() == [[1, 2], [1, 3]]


def test_blocks_add_up_to_the_whole():
    probs, positions, keys = heads(), torch.arange(T), torch.arange(30, T)
    whole = pa.future_influence_sums(probs, positions, keys, 10, 100)
    first, second = positions[:45], positions[45:]
    blocks = pa.future_influence_sums(probs[..., :45, :45], first, keys, 10, 100) + pa.future_influence_sums(probs[..., 45:, :], second, keys, 10, 100)
    torch.testing.assert_close(blocks, whole)


def test_fai_finds_the_planted_anchors():
    probs, positions = stripes(), torch.arange(T)
    for lo, hi in ((10, 100), (1, None)):
        fai = pa.future_influence_sums(probs, positions, positions, lo, hi) / pa.future_counts(positions, positions, lo, hi)
        # Direct: mean over t in the window of A[t, s].
        for s in (0, 5, 20, 33):
            rows = [t for t in range(T) if t - s >= max(lo, 1) and (hi is None or t - s <= hi)]
            assert math.isclose(float(fai[s]), float(probs[rows, s].mean()), abs_tol=1e-6)
        defined = ~torch.isnan(fai)
        anchors = pa.top_share(fai, 3 / int(defined.sum()))
        assert torch.nonzero(anchors).flatten().tolist() == list(ANCHORS)
    assert torch.isnan(fai[-1])  # no later token


def test_waad_clips_and_marks_chunk_boundaries():
    # Rows attend 2 tokens back, except every 12th row reaches 25 tokens back (clipped to W = 10).
    probs = torch.zeros(T, T)
    boundaries = list(range(30, T, 12))
    for t in range(2, T):
        probs[t, t - 25 if t in boundaries else t - 2] = 1.0
    positions = torch.arange(2, T)
    waad = pa.windowed_distance(probs[2:], positions, 10)
    assert set(waad.unique().tolist()) == {2.0, 10.0}
    change = pa.waad_change(waad)
    assert torch.isnan(change[-1])
    preplan = pa.top_share(change, 2 * len(boundaries) / (len(waad) - 1))
    # The jump is seen at the token before each boundary and at the boundary itself.
    marked = {int(p) + 2 for p in torch.nonzero(preplan).flatten()}
    assert marked == {b - 1 for b in boundaries} | set(boundaries)


def test_drop_keys_renormalises_without_the_sink():
    probs = torch.softmax(torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    kept = pa.drop_keys(probs, torch.tensor([0]))
    assert torch.all(kept[..., 0] == 0)
    torch.testing.assert_close(kept.sum(-1), torch.ones(3, 5))
    torch.testing.assert_close(kept[..., 1:], probs[..., 1:] / probs[..., 1:].sum(-1, keepdim=True))


def test_coupling_offsets_and_lift():
    preplan = torch.tensor([1, 0, 0, 0, 0, 1, 0, 0, 0, 0], dtype=torch.bool)
    anchor = torch.tensor([0, 1, 0, 0, 0, 0, 1, 0, 0, 1], dtype=torch.bool)
    assert torch.nonzero(pa.preceded_at(preplan, 1)).flatten().tolist() == [1, 6]
    assert torch.nonzero(pa.preceded_within(preplan, 2)).flatten().tolist() == [0, 1, 2, 5, 6, 7]
    assert torch.nonzero(pa.preceded_within(preplan, 2, first=1)).flatten().tolist() == [1, 2, 6, 7]
    assert not pa.preceded_at(preplan, 20).any()


    def counts(event, condition):
        return [np.array([float(x)]) for x in ((event & condition).sum(), condition.sum(), event.sum(), len(event))]

    # P(anchor | preplan exactly 1 before) = 1, P(anchor) = 0.3.
    assert math.isclose(float(pa.pooled_lift(*counts(anchor, pa.preceded_at(preplan, 1)))), 1 / 0.3)
    assert math.isclose(float(pa.pooled_lift(*counts(anchor, pa.preceded_at(preplan, 0)))), 0.0)
    with np.errstate(invalid="ignore"):
        assert math.isnan(float(pa.pooled_lift(*counts(anchor, torch.zeros(10, dtype=torch.bool)))))
    # Pooled over two responses = the lift of their concatenated tokens (windows shifted within each).
    first, second = counts(anchor, pa.preceded_within(preplan, 2)), counts(anchor[:6], pa.preceded_within(preplan[:6], 2))
    pooled = pa.pooled_lift(*(np.concatenate([a, b]) for a, b in zip(first, second)))
    joined_event = torch.cat([anchor, anchor[:6]])
    joined_condition = torch.cat([pa.preceded_within(preplan, 2), pa.preceded_within(preplan[:6], 2)])
    direct = joined_event[joined_condition].double().mean() / joined_event.double().mean()
    assert math.isclose(float(pooled), float(direct))


def test_locally_dominated_anchors():
    waad = torch.tensor([9.0, 1.0, 8.0, 7.0, 2.0, 9.5, 0.5, 6.0])
    preplan = torch.tensor([1, 0, 0, 1, 0, 0, 0, 0], dtype=torch.bool)
    anchor = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1], dtype=torch.bool)
    # Median WAAD is 6.5: anchors 1 (WAAD 1, one after a preplan) and 4 (WAAD 2, one after) qualify;
    # anchor 2 has a high WAAD, anchor 7 is 4 tokens after the last preplan token.
    dominated = pa.locally_dominated(anchor, preplan, waad, k=3, quantile=0.5)
    assert torch.nonzero(dominated).flatten().tolist() == [1, 4]


def test_entropy():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    entropy = pa.entropy(logits)
    assert math.isclose(float(entropy[0]), math.log(4), rel_tol=1e-9)
    assert float(entropy[1]) < 1e-20
