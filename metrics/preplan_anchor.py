"""Local and global heads, WAAD and FAI ("Attention Illuminates LLM Reasoning: The Preplan-and-Anchor
Rhythm Enables Fine-Grained Policy Optimization", 2025).

Attention rows arrive in blocks (``probs[..., row, key]`` for query positions ``positions[row]``, keys
``0 .. n_keys-1``). Every per-head quantity here is linear in the attention, so a head group's value
(attention averaged over the group's heads) is the mean of the per-head values: the detector keeps
per-head reductions of length |R| and combines them once the groups are known.

- distance of a row t: sum_s A[t, s] * (t - s); d[l, h] is its mean over the response rows R;
- WAAD_t = sum_s A_loc[t, s] * min(t - s, W);
- FAI_s = mean over t in R with lo <= t - s <= hi of A_glob[t, s] (hi=None: every later token, t > s).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from jaxtyping import Bool, Float, Int, Real
from torch import Tensor


def key_distances(positions: Int[Tensor, " row"], n_keys: int) -> Int[Tensor, "row key"]:
    """t - s for every query row and key (negative for future keys, which get no attention)."""
    return positions[:, None] - torch.arange(n_keys, device=positions.device)[None, :]


def drop_keys(probs: Float[Tensor, "*head row key"], keys: Int[Tensor, " dropped"]) -> Float[Tensor, "*head row key"]:
    """Attention with ``keys`` removed and each row renormalised: where the head looks when it does not
    look at those keys (e.g. the first-token sink)."""
    kept = probs.clone()
    kept[..., keys[keys < probs.shape[-1]]] = 0.0
    return kept / kept.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def attention_distance(probs: Float[Tensor, "*head row key"], positions: Int[Tensor, " row"]) -> Float[Tensor, "*head row"]:
    """Mean backward distance of each row: sum_s A[t, s] * (t - s)."""
    distance = key_distances(positions, probs.shape[-1]).clamp_min(0).to(probs.dtype)
    return (probs * distance).sum(dim=-1)


def windowed_distance(probs: Float[Tensor, "*head row key"], positions: Int[Tensor, " row"], window: int) -> Float[Tensor, "*head row"]:
    """WAAD of each row for the given heads: sum_s A[t, s] * min(t - s, W)."""
    distance = key_distances(positions, probs.shape[-1]).clamp(0, window).to(probs.dtype)
    return (probs * distance).sum(dim=-1)


def future_window(
    query_positions: Int[Tensor, " row"], key_positions: Int[Tensor, " key"], lo: int, hi: int | None
) -> Bool[Tensor, "row key"]:
    """Which (query, key) pairs count towards FAI: lo <= t - s <= hi (hi=None: t - s >= max(lo, 1))."""
    gap = query_positions[:, None] - key_positions[None, :]
    inside = gap >= max(lo, 1)
    return inside if hi is None else inside & (gap <= hi)


def future_influence_sums(
    probs: Float[Tensor, "*head row key"],
    positions: Int[Tensor, " row"],
    key_positions: Int[Tensor, " target"],
    lo: int,
    hi: int | None,
) -> Float[Tensor, "*head target"]:
    """Attention each target key receives from the given rows inside the FAI window, summed over rows.
    Sums over all row blocks divided by ``future_counts`` give FAI."""
    visible = key_positions < probs.shape[-1]
    sums = probs.new_zeros(*probs.shape[:-2], key_positions.numel())
    if bool(visible.any()):
        columns = probs[..., key_positions[visible]]
        inside = future_window(positions, key_positions[visible], lo, hi).to(probs.dtype)
        sums[..., visible] = (columns * inside).sum(dim=-2)
    return sums


def future_counts(query_positions: Int[Tensor, " row"], key_positions: Int[Tensor, " key"], lo: int, hi: int | None) -> Int[Tensor, " key"]:
    """How many query rows fall inside each key's FAI window (FAI's denominator)."""
    return future_window(query_positions, key_positions, lo, hi).sum(dim=0)


def head_groups(mean_distance: Float[Tensor, "layer head"], share: float, eligible: Bool[Tensor, "layer head"] | None = None) -> tuple[Bool[Tensor, "layer head"], Bool[Tensor, "layer head"]]:
    """(local, global): the bottom and top ``share`` of the eligible heads by mean distance d."""
    eligible = torch.ones_like(mean_distance, dtype=torch.bool) if eligible is None else eligible
    flat = mean_distance.flatten()
    candidates = torch.nonzero(eligible.flatten()).flatten()
    n_group = int(round(share * candidates.numel()))
    # Stable sorts: ties go to the lower (layer, head) index, so groups are reproducible.
    ascending = candidates[torch.argsort(flat[candidates], stable=True)]
    descending = candidates[torch.argsort(-flat[candidates], stable=True)]
    local, global_ = torch.zeros_like(flat, dtype=torch.bool), torch.zeros_like(flat, dtype=torch.bool)
    local[ascending[:n_group]] = True
    global_[descending[:n_group]] = True
    return local.view_as(mean_distance), global_.view_as(mean_distance)


def top_share(values: Float[Tensor, " token"], share: float) -> Bool[Tensor, " token"]:
    """The top ``share`` of the defined (non-NaN) values, round(share * n) of them; ties to the earlier token."""
    defined = torch.nonzero(~torch.isnan(values)).flatten()
    n_top = int(round(share * defined.numel()))
    ordered = defined[torch.argsort(-values[defined], stable=True)]
    chosen = torch.zeros_like(values, dtype=torch.bool)
    chosen[ordered[:n_top]] = True
    return chosen


def waad_change(waad: Float[Tensor, " token"]) -> Float[Tensor, " token"]:
    """|WAAD_t - WAAD_{t+1}| (NaN for the last token, which has no successor)."""
    change = torch.full_like(waad, math.nan)
    change[:-1] = (waad[:-1] - waad[1:]).abs()
    return change


def preceded_within(marks: Bool[Tensor, " token"], k: int, first: int = 0) -> Bool[Tensor, " token"]:
    """Tokens t with a mark at some t - j, first <= j <= k (first=0: follows or coincides within k tokens)."""
    result = torch.zeros_like(marks)
    for j in range(first, k + 1):
        result |= preceded_at(marks, j)
    return result


def preceded_at(marks: Bool[Tensor, " token"], offset: int) -> Bool[Tensor, " token"]:
    """Tokens t with a mark exactly at t - offset."""
    result = torch.zeros_like(marks)
    if offset < marks.numel():
        result[offset:] = marks[: marks.numel() - offset]
    return result


def ratio_of_sums(
    numerator: Real[np.ndarray, "*resample unit"], denominator: Real[np.ndarray, "*resample unit"], axis: int = -1
) -> Float[np.ndarray, "*resample"] | float:  # a float when there is no resample axis
    """sum(numerator) / sum(denominator) over units: a share pooled over probes."""
    return numerator.sum(axis=axis) / denominator.sum(axis=axis)


def pooled_lift(
    both: Real[np.ndarray, "*resample unit"],
    condition: Real[np.ndarray, "*resample unit"],
    event: Real[np.ndarray, "*resample unit"],
    total: Real[np.ndarray, "*resample unit"],
    axis: int = -1,
) -> Float[np.ndarray, "*resample"] | float:  # a float when there is no resample axis
    """``lift`` from per-unit counts (event and condition, condition, event, tokens), pooled over units:
    (sum both / sum condition) / (sum event / sum total)."""
    return (both.sum(axis=axis) / condition.sum(axis=axis)) / (event.sum(axis=axis) / total.sum(axis=axis))


def locally_dominated(
    is_anchor: Bool[Tensor, " token"], is_preplan: Bool[Tensor, " token"], waad: Float[Tensor, " token"], k: int, quantile: float
) -> Bool[Tensor, " token"]:
    """Anchors whose own reference is local (WAAD at or below the response's ``quantile``) and that
    follow a preplan token within 1..k tokens: the anchor owes its content to the preplan token's
    long-range reference. The paper leaves the threshold open; the median is the default."""
    threshold = torch.nanquantile(waad, quantile)
    return is_anchor & (waad <= threshold) & preceded_within(is_preplan, k, first=1)


def entropy(logits: Float[Tensor, "*row vocab"]) -> Float[Tensor, "*row"]:
    """Entropy (nats) of the softmax of each row."""
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1)
