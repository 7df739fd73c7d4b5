"""Circuit metrics: logit differences, patching scores, in-circuit selection and circuit overlap.

Conventions (Merullo et al., ICLR 2024; Wang et al. 2023 for IOI):

- LD = logit(target) - logit(foil) at the final position.
- Patching score of a component = (mean LD_patched - mean LD_clean) / (mean LD_corrupt - mean LD_clean),
  with means over the task's pairs taken before the ratio (a per-pair ratio explodes on pairs whose
  corruption barely moves LD). 1 = patching this component alone does what the whole corruption does.
- Normalised faithfulness of a circuit: (LD_circuit - LD_ablated) / (LD_clean - LD_ablated), LD_ablated
  with every head ablated; the circuit is cut at the fewest top-|score| heads reaching a target.
- Overlap of two circuits A and B: Jaccard |A&B| / |A|B|, containments |A&B| / |A| (the paper's "fraction
  of one task's circuit found in the other's") and |A&B| / |B|; its p-value against a layer-stratified
  permutation null (B's heads shuffled within each layer), and its interval by resampling prompt pairs.
"""

from __future__ import annotations

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


def jaccard(a: Bool[Tensor, " component"], b: Bool[Tensor, " component"]) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else float("nan")


def containment(a: Bool[Tensor, " component"], b: Bool[Tensor, " component"]) -> float:
    """Share of A that is also in B: |A & B| / |A|."""
    size = int(a.sum())
    return int((a & b).sum()) / size if size else float("nan")


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


def normalized_faithfulness(
    ld_circuit: Float[Tensor, "pair *size"], ld_clean: Float[Tensor, " pair"], ld_ablated: Float[Tensor, " pair"]
) -> Float[Tensor, "*size"]:
    """(mean LD_circuit - mean LD_ablated) / (mean LD_clean - mean LD_ablated), means over pairs.

    LD_ablated is the metric with every head ablated, so 0 = the circuit does no better than no heads
    at all and 1 = it does all the full model does (Wang et al. 2023; Hanna et al. 2024)."""
    ablated = ld_ablated.mean()
    return (ld_circuit.mean(0) - ablated) / (ld_clean.mean() - ablated)


def faithful_cut(curve: Float[Tensor, " size"], target: float) -> int | None:
    """The smallest number of heads k >= 1 whose faithfulness ``curve[k]`` reaches ``target``
    (``curve[k]``: the top-k heads kept, k = 0..n); None when no k does."""
    reached = (curve[1:] >= target).nonzero().flatten()
    return int(reached[0]) + 1 if reached.numel() else None


def stratified_overlap_null(
    a: Bool[Tensor, "layer head"], b: Bool[Tensor, "layer head"], n_draws: int, generator: torch.Generator, chunk: int = 10_000
) -> Int[Tensor, " draw"]:
    """Overlaps |A & B'| for ``n_draws`` circuits B' made by shuffling B's heads within each layer.

    B' keeps B's count of heads in every layer, so a layer profile the two circuits share (late
    layers, say) is not mistaken for reuse of the same heads. Vectorised: each draw is a random
    permutation of head identities per layer (the argsort of uniform noise)."""
    a, b = a.bool(), b.bool()
    overlaps = []
    for start in range(0, n_draws, chunk):
        n = min(chunk, n_draws - start)
        permutation = torch.rand(n, *b.shape, generator=generator).argsort(-1)
        shuffled = b.expand(n, *b.shape).gather(-1, permutation)
        overlaps.append((shuffled & a).sum((-1, -2)))
    return torch.cat(overlaps)


def stratified_overlap_p(
    a: Bool[Tensor, "layer head"], b: Bool[Tensor, "layer head"], n_draws: int, generator: torch.Generator
) -> float:
    """P(overlap >= observed) under the layer-stratified permutation null, (1 + hits) / (1 + draws)."""
    observed = int((a.bool() & b.bool()).sum())
    null = stratified_overlap_null(a, b, n_draws, generator)
    return float((1 + (null >= observed).sum()) / (1 + n_draws))


def bootstrap_circuits(
    effects: Sequence[Float[Tensor, "pair component"]], sizes: Sequence[int], resamples: Int[Tensor, "resample pair"]
) -> Bool[Tensor, "resample component"]:
    """The circuit recomputed on resampled prompt pairs: per stage, the ``sizes[s]`` components with
    the largest |mean effect| over the resampled pairs (the score's common denominator does not change
    a ranking by |score|), united over stages. Sizes stay those of the full-data circuit."""
    selected = torch.zeros(resamples.shape[0], effects[0].shape[1], dtype=torch.bool)
    for effect, size in zip(effects, sizes):
        if size == 0:
            continue
        mean = effect[resamples].mean(1).abs()
        selected.scatter_(1, mean.topk(size, dim=1).indices, True)
    return selected


def overlap_measures(a: Bool[Tensor, "*batch component"], b: Bool[Tensor, "*batch component"]) -> dict[str, Float[Tensor, "*batch"]]:
    """Jaccard and both containments, batched (NaN where a denominator is empty)."""
    shared = (a & b).sum(-1).double()
    union = (a | b).sum(-1).double()
    n_a, n_b = a.sum(-1).double(), b.sum(-1).double()
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    return {
        "jaccard": torch.where(union > 0, shared / union, nan),
        "containment_a": torch.where(n_a > 0, shared / n_a, nan),
        "containment_b": torch.where(n_b > 0, shared / n_b, nan),
    }


def resample_means(values: Float[Tensor, "pair *rest"], resamples: Int[Tensor, "resample pair"]) -> Float[Tensor, "resample *rest"]:
    """Means of ``values`` over each resample of the pairs (rows of ``resamples`` index pairs)."""
    return values[resamples].mean(1)


def percentile_interval(samples: Float[Tensor, "resample *rest"], confidence: float = 0.95) -> tuple[Tensor, Tensor]:
    """Percentile bootstrap bounds over the resample axis (NaN resamples ignored)."""
    tail = (1 - confidence) / 2
    samples = samples.double()
    return torch.nanquantile(samples, tail, dim=0), torch.nanquantile(samples, 1 - tail, dim=0)
