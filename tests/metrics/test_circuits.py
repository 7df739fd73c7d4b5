"""Circuit metrics on hand-checked cases and synthetic tensors with planted answers."""

from __future__ import annotations

import math

import pytest
import torch

from metrics.circuits import (
    attribution_score,
    bootstrap_circuits,
    containment,
    faithful_cut,
    jaccard,
    logit_difference,
    normalized_faithfulness,
    overlap_measures,
    patching_score,
    ranks,
    spearman,
    stratified_overlap_null,
    stratified_overlap_p,
    top_fraction,
    top_k,
)


def mask(n: int, members: list[int]) -> torch.Tensor:
    selected = torch.zeros(n, dtype=torch.bool)
    selected[members] = True
    return selected


def test_logit_difference_picks_target_minus_foil():
    logits = torch.tensor([[0.0, 2.0, -1.0], [3.0, 0.5, 1.0]])
    got = logit_difference(logits, torch.tensor([1, 0]), torch.tensor([2, 1]))
    torch.testing.assert_close(got, torch.tensor([3.0, 2.5]))


def test_patching_score_normalizes_by_the_whole_corruption():
    ld_clean, ld_corrupt = torch.tensor([4.0, 2.0]), torch.tensor([0.0, 0.0])  # means 3 and 0
    # Component 0 does nothing, 1 does all of the corruption, 2 half of it, 3 the opposite.
    patched = torch.tensor([[4.0, 0.0, 2.0, 5.0], [2.0, 0.0, 1.0, 3.0]])
    torch.testing.assert_close(patching_score(patched, ld_clean, ld_corrupt), torch.tensor([0.0, 1.0, 0.5, -1 / 3]))
    # Extra component dimensions (layer, head) pass through.
    assert patching_score(patched.view(2, 2, 2), ld_clean, ld_corrupt).shape == (2, 2)


def test_attribution_score_is_exact_for_a_linear_metric():
    # LD = w . z: the first-order estimate equals exact patching.
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, generator=generator)
    z_clean, z_corrupt = torch.randn(4, 5, 3, generator=generator), torch.randn(4, 5, 3, generator=generator)
    ld = lambda z: (w * z).sum((-1, -2))  # noqa: E731
    patched = torch.stack([ld(torch.where(mask(5, [c])[None, :, None], z_corrupt, z_clean)) for c in range(5)], dim=1)
    exact = patching_score(patched, ld(z_clean), ld(z_corrupt))
    estimate = attribution_score(w.expand(4, 5, 3), z_corrupt - z_clean, ld(z_clean), ld(z_corrupt))
    torch.testing.assert_close(estimate, exact, atol=1e-5, rtol=1e-5)


def test_top_fraction_takes_two_percent_by_absolute_value():
    scores = torch.zeros(270)
    scores[[7, 100, 200, 3, 50]] = torch.tensor([0.9, -0.8, 0.7, 0.6, -0.5])
    scores[60] = 0.1
    selected = top_fraction(scores, 0.02)  # round(5.4) = 5 heads
    assert selected.sum() == 5 and set(selected.nonzero().flatten().tolist()) == {3, 7, 50, 100, 200}
    assert top_fraction(torch.tensor([0.1, 0.2]), 0.01).sum() == 1  # at least one
    assert top_k(torch.tensor([1.0, -3.0, 2.0]), 2).tolist() == [False, True, True]


def test_overlap_arithmetic_hand_checked():
    a, b = mask(10, [0, 1, 2, 3]), mask(10, [2, 3, 4])
    assert jaccard(a, b) == pytest.approx(2 / 5)
    assert containment(a, b) == pytest.approx(2 / 4)
    assert containment(b, a) == pytest.approx(2 / 3)
    assert jaccard(a, a) == 1.0 and jaccard(a, mask(10, [9])) == 0.0


def test_spearman_against_hand_ranks_and_ties():
    assert ranks(torch.tensor([10.0, 30.0, 20.0, 20.0])).tolist() == [1.0, 4.0, 2.5, 2.5]
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    # Hand-checked: ranks (1,2,3,4,5) vs (2,1,4,3,5): d^2 sum = 4, rho = 1 - 6*4/(5*24) = 0.8.
    assert spearman(x, torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0])) == pytest.approx(0.8)
    assert math.isnan(spearman(x, torch.ones(5)))


def test_normalized_faithfulness_and_cut():
    ld_clean, ld_ablated = torch.tensor([2.0, 4.0]), torch.tensor([0.0, 1.0])  # means 3 and 0.5
    curve = normalized_faithfulness(torch.tensor([[0.0, 1.0, 1.8, 2.0], [1.0, 2.0, 3.0, 4.0]]), ld_clean, ld_ablated)
    torch.testing.assert_close(curve, torch.tensor([0.0, 0.4, 0.76, 1.0]))
    assert faithful_cut(curve, 0.7) == 2 and faithful_cut(curve, 0.8) == 3 and faithful_cut(curve, 1.1) is None
    assert faithful_cut(torch.tensor([0.9, 0.1, 0.95]), 0.8) == 2  # k = 0 (no heads) is never the circuit


def hypergeometric_pmf(n: int, k_a: int, k_b: int) -> list[float]:
    """P(|A & B| = x) for B a uniformly random k_b-subset of n items and |A| = k_a."""
    return [math.comb(k_a, x) * math.comb(n - k_a, k_b - x) / math.comb(n, k_b) for x in range(min(k_a, k_b) + 1)]


def stratified_tail(a: torch.Tensor, b: torch.Tensor, observed: int) -> float:
    """Exact P(overlap >= observed) under the stratified null: the per-layer hypergeometric laws convolved."""
    distribution = [1.0]
    for layer in range(a.shape[0]):
        pmf = hypergeometric_pmf(a.shape[1], int(a[layer].sum()), int(b[layer].sum()))
        out = [0.0] * (len(distribution) + len(pmf) - 1)
        for i, p in enumerate(distribution):
            for j, q in enumerate(pmf):
                out[i + j] += p * q
        distribution = out
    return sum(distribution[observed:])


def random_circuit(profile: list[int], n_heads: int, generator: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randperm(n_heads, generator=generator) < count for count in profile])


def test_stratified_null_matches_the_exact_convolution():
    generator = torch.Generator().manual_seed(0)
    profile = [0] * 20 + [2, 3, 1, 2, 0, 1, 3, 2, 1, 0]  # a late-layer circuit, 30 layers x 9 heads
    a, b = random_circuit(profile, 9, generator), random_circuit(profile, 9, generator)
    b[20:] = a[20:] | b[20:]  # plant extra sharing, so the tail is small but not zero
    observed = int((a & b).sum())
    null = stratified_overlap_null(a, b, 40_000, generator)
    assert (null.float().mean() - sum(int(a[l].sum()) * int(b[l].sum()) / 9 for l in range(30))).abs() < 0.05
    p = stratified_overlap_p(a, b, 40_000, generator)
    assert p == pytest.approx(stratified_tail(a, b, observed), abs=0.01)
    assert (null.view(-1) >= 0).all() and int(null.max()) <= int(torch.minimum(a.sum(1), b.sum(1)).sum())


def test_stratified_null_is_uniform_for_independent_circuits_with_the_same_layer_profile():
    """Two circuits drawn independently with one layer profile: p is (near) uniform, so about 5% fall
    below 0.05. The all-heads hypergeometric null, blind to the shared profile, rejects most of them."""
    generator = torch.Generator().manual_seed(1)
    profile = [0] * 12 + [1, 2, 3, 4, 4, 4, 4, 4, 3, 3, 2, 2, 2, 1, 1, 1, 1, 1]  # 30 layers x 9 heads
    n_total, k = 270, sum(profile)
    p_stratified, p_flat = [], []
    for _ in range(300):
        a, b = random_circuit(profile, 9, generator), random_circuit(profile, 9, generator)
        p_stratified.append(stratified_overlap_p(a, b, 1_000, generator))
        shared = int((a & b).sum())
        p_flat.append(sum(hypergeometric_pmf(n_total, k, k)[shared:]))
    p_stratified, p_flat = torch.tensor(p_stratified), torch.tensor(p_flat)
    # The overlap is discrete, so a valid p is uniform at its attainable levels: P(p <= alpha) is the
    # largest exact tail probability not above alpha (below alpha between levels, never above).
    tails = [stratified_tail(a, b, x) for x in range(k + 2)]
    for alpha in (0.05, 0.1, 0.25, 0.5, 0.75):
        expected = max(t for t in tails if t <= alpha + 1e-12)
        assert abs(float((p_stratified <= alpha).float().mean()) - expected) < 0.07, alpha
        assert expected > alpha - 0.15  # the levels are dense enough to call that near uniform
    assert float((p_flat <= 0.05).float().mean()) > 0.5


def test_bootstrap_circuits_keep_a_planted_head_and_measure_overlap():
    generator = torch.Generator().manual_seed(2)
    effect = 0.1 * torch.randn(16, 40, generator=generator)
    effect[:, 7] += 2.0  # one component carries the effect on every pair
    effect[:, 3] -= 1.5  # and one against it: ranked by |effect|
    resamples = torch.randint(0, 16, (200, 16), generator=generator)
    circuits = bootstrap_circuits([effect, effect], [2, 0], resamples)
    assert circuits.shape == (200, 40) and (circuits.sum(1) == 2).all()
    assert circuits[:, 7].all() and circuits[:, 3].all()
    other = torch.zeros(40, dtype=torch.bool)
    other[[7, 8]] = True
    measures = overlap_measures(circuits, other.expand(200, 40))
    assert torch.allclose(measures["jaccard"], torch.full((200,), 1 / 3, dtype=torch.float64))
    assert torch.allclose(measures["containment_a"], torch.full((200,), 0.5, dtype=torch.float64))
    assert math.isnan(float(overlap_measures(other & False, other)["containment_a"]))
