"""Circuit metrics: logit differences, patching scores, in-circuit selection and circuit overlap.

Conventions (Merullo et al., ICLR 2024; Wang et al. 2023 for IOI):

- LD = logit(target) - logit(foil) at the final position.
- Patching score of a component = (mean LD_patched - mean LD_clean) / (mean LD_corrupt - mean LD_clean),
  with means over the task's pairs taken before the ratio (a per-pair ratio explodes on pairs whose
  corruption barely moves LD). 1 = patching this component alone does what the whole corruption does.
- Overlap of two circuits A and B among N components: Jaccard |A&B| / |A|B|, containments |A&B| / |A| and
  |A&B| / |B|, and the hypergeometric tail P(X >= |A&B|) for X the overlap of two random sets of the same
  sizes (the paper gives no denominator, so all are reported).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def logit_difference(
    logits: Float[Tensor, "*batch vocab"], target: Int[Tensor, "*batch"], foil: Int[Tensor, "*batch"]
) -> Float[Tensor, "*batch"]:
    """logit[target] - logit[foil] for each row."""
    return logits.gather(-1, target[..., None]).squeeze(-1) - logits.gather(-1, foil[..., None]).squeeze(-1)


def patching_score(
    ld_patched: Float[Tensor, "pair *component"], ld_clean: Float[Tensor, " pair"], ld_corrupt: Float[Tensor, " pair"]
) -> Float[Tensor, "*component"]:
    """(mean LD_patched - mean LD_clean) / (mean LD_corrupt - mean LD_clean), means over pairs."""
    clean = ld_clean.mean()
    return (ld_patched.mean(0) - clean) / (ld_corrupt.mean() - clean)


def attribution_score(
    gradient: Float[Tensor, "pair *component d"],
    delta: Float[Tensor, "pair *component d"],
    ld_clean: Float[Tensor, " pair"],
    ld_corrupt: Float[Tensor, " pair"],
) -> Float[Tensor, "*component"]:
    """First-order estimate of ``patching_score``: LD_patched - LD_clean ~ gradient . (z_corrupt - z_clean)."""
    estimated_change = (gradient * delta).sum(-1)
    return estimated_change.mean(0) / (ld_corrupt.mean() - ld_clean.mean())


def top_fraction(scores: Float[Tensor, " component"], fraction: float) -> Bool[Tensor, " component"]:
    """The round(fraction * n) components (at least 1) with the largest |score|."""
    k = max(1, round(fraction * scores.numel()))
    return top_k(scores, k)


def top_k(scores: Float[Tensor, " component"], k: int) -> Bool[Tensor, " component"]:
    """The k components with the largest |score| (ties broken by index, stably)."""
    order = torch.sort(scores.abs(), descending=True, stable=True).indices
    selected = torch.zeros(scores.numel(), dtype=torch.bool)
    selected[order[:k]] = True
    return selected


def faithfulness(ld_circuit: Float[Tensor, "pair *size"], ld_clean: Float[Tensor, " pair"]) -> Float[Tensor, "*size"]:
    """Mean LD with only the circuit intact, over mean LD of the full model (1 = all of it kept)."""
    return ld_circuit.mean(0) / ld_clean.mean()


def smallest_faithful(sizes: Sequence[int], faithfulness_by_size: Float[Tensor, " size"], threshold: float) -> int | None:
    """The smallest size whose faithfulness reaches ``threshold`` (None when none does)."""
    reached = [size for size, value in zip(sizes, faithfulness_by_size.tolist()) if value >= threshold]
    return min(reached) if reached else None


def jaccard(a: Bool[Tensor, " component"], b: Bool[Tensor, " component"]) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else float("nan")


def containment(a: Bool[Tensor, " component"], b: Bool[Tensor, " component"]) -> float:
    """Share of A that is also in B: |A & B| / |A|."""
    size = int(a.sum())
    return int((a & b).sum()) / size if size else float("nan")


def hypergeometric_tail(n_total: int, n_a: int, n_b: int, n_overlap: int) -> float:
    """P(X >= n_overlap) for X = |A & B| with B a uniformly random n_b-subset of n_total and |A| = n_a.

    Exact, from binomial coefficients in integer arithmetic (no scipy).
    """
    top = min(n_a, n_b)
    if n_overlap > top:
        return 0.0
    favourable = sum(math.comb(n_a, k) * math.comb(n_total - n_a, n_b - k) for k in range(max(n_overlap, 0), top + 1))
    return favourable / math.comb(n_total, n_b)


def ranks(values: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
    """Ranks from 1, ties given their average rank (as Spearman's rho needs)."""
    values = values.double()
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    position = torch.arange(1, values.numel() + 1, dtype=torch.float64)
    # Groups of equal values share the mean of their positions.
    _, group, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    group_sum = torch.zeros(counts.numel(), dtype=torch.float64).index_add_(0, group, position)
    result = torch.empty_like(position)
    result[order] = (group_sum / counts)[group]
    return result


def spearman(x: Float[Tensor, " n"], y: Float[Tensor, " n"]) -> float:
    """Spearman's rank correlation: Pearson's r of the (tie-averaged) ranks."""
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = (rx.square().sum() * ry.square().sum()).sqrt()
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")
