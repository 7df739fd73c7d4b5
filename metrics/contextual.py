"""Contextual-head statistics (Zhu et al., "Focus Directions Make Your Language Models Pay More
Attention to Relevant Contexts", 2025; reference code billzyx/focus_direction).

A probe's gold document, its distractor documents and its first tokens are sets of key positions;
the attention mass of a query row on a set is the sum of that row's attention over the set. The
contextual score of a head is that mass on the gold document, averaged over response rows, then probes.

A focus direction v of a head is added to its rotated query: every score of a row changes by
``scaling * (v . k_s)``, so the new attention is the old one reweighted by ``exp(scaling * v . k_s)``
and renormalised (``focused_set_mass``). With the layer's inputs held fixed this needs only the old
rows and the keys, which is how the reference trains the directions (each layer on frozen inputs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def span_keys(n_keys: int, spans: Sequence[tuple[int, int]]) -> Bool[Tensor, " key"]:
    """Key positions covered by the half-open token spans ``[start, end)``."""
    keys = torch.zeros(n_keys, dtype=torch.bool)
    for start, end in spans:
        keys[start:end] = True
    return keys


def set_mass(probs: Float[Tensor, "*batch head row key"], keys: Bool[Tensor, " seq"]) -> Float[Tensor, "*batch head row"]:
    """Attention mass of every row on the keys in ``keys`` (keys past ``probs``'s last one get none)."""
    present = keys[: probs.shape[-1]].to(device=probs.device, dtype=probs.dtype)
    return probs[..., : present.shape[0]] @ present


def focused_set_mass(
    probs: Float[Tensor, "head row key"],
    keys: Float[Tensor, "head key d_head"],
    directions: Float[Tensor, "head d_head"],
    scaling: Float[Tensor, " head"],
    selected: Bool[Tensor, " key"],
) -> Float[Tensor, "head row"]:
    """Mass on ``selected`` of attention rows ``probs`` once ``directions`` are added to the rows'
    queries, the keys unchanged: softmax(log probs + scaling * keys . direction). Differentiable in
    ``directions``; masked keys (probability 0) stay masked."""
    shift = scaling[:, None] * torch.einsum("hkd,hd->hk", keys.float(), directions.float())
    logits = probs.float().log() + shift[:, None, :]
    return set_mass(torch.softmax(logits, dim=-1), selected)


def top_heads(scores: Float[Tensor, "layer head"], k: int) -> list[tuple[int, int]]:
    """The ``k`` highest-scoring (layer, head) pairs, best first (ties: lower flat index first)."""
    order = torch.sort(scores.flatten(), descending=True, stable=True).indices[:k]
    n_heads = scores.shape[1]
    return [(int(i) // n_heads, int(i) % n_heads) for i in order]


def score_ranks(scores: Float[Tensor, "layer head"]) -> Int[Tensor, "layer head"]:
    """1 for the highest score, ``layer * head`` for the lowest (same tie order as ``top_heads``)."""
    order = torch.sort(scores.flatten(), descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, order.numel() + 1)
    return ranks.view(scores.shape)


def heads_mean(values: Float[Tensor, "*batch layer head"], heads: Sequence[tuple[int, int]]) -> Float[Tensor, "*batch"]:
    """Mean of ``values`` over the given (layer, head) pairs."""
    layers = torch.tensor([layer for layer, _ in heads], dtype=torch.long)
    indices = torch.tensor([head for _, head in heads], dtype=torch.long)
    return values[..., layers, indices].mean(-1)
