"""Edits applied inside the attention function of one layer, during a forward pass.

Four places can be edited, in this order: the rotated queries and keys (before scores), the attention
probabilities (forces the blockwise path for that layer), and the per-head outputs ``z`` (before the
output projection). Every detector's causal test is one of the classes below.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


class Intervention:
    """Base: an identity edit of ``layer``. Subclasses override the edits they make."""

    layer: int
    edits_probs: bool = False

    def edit_query(self, query: Float[Tensor, "batch head q d_head"], positions: Int[Tensor, " q"]) -> Tensor:
        return query

    def edit_key(self, key: Float[Tensor, "batch kv_head key d_head"], positions: Int[Tensor, " key"]) -> Tensor:
        return key

    def edit_probs(self, probs: Float[Tensor, "batch head row key"], positions: Int[Tensor, " row"]) -> Tensor:
        return probs

    def edit_z(self, z: Float[Tensor, "batch q head d_head"], positions: Int[Tensor, " q"]) -> Tensor:
        return z


def _rows(positions: Int[Tensor, " q"], selected: Sequence[int] | None) -> Bool[Tensor, " q"]:
    if selected is None:
        return torch.ones_like(positions, dtype=torch.bool)
    return torch.isin(positions, torch.as_tensor(list(selected), device=positions.device))


@dataclass
class ZeroQuery(Intervention):
    """Zero the query of ``heads``: their attention becomes uniform over the visible keys (the
    retrieval-head paper's masking). ``positions`` restricts it to some query positions."""

    layer: int
    heads: Sequence[int]
    positions: Sequence[int] | None = None

    def edit_query(self, query, positions):
        rows = _rows(positions, self.positions)
        query = query.clone()
        for head in self.heads:
            query[:, head, rows] = 0.0
        return query


@dataclass
class AddToQuery(Intervention):
    """Add ``scale * vectors[i]`` to the rotated query of ``heads[i]`` (focus directions).

    Gradients flow into ``vectors``, so the same class serves training and inference.
    """

    layer: int
    heads: Sequence[int]
    vectors: Float[Tensor, "n d_head"]
    scale: float = 1.0

    def edit_query(self, query, positions):
        added = torch.zeros_like(query[0, :, 0])
        added = added.index_add(0, torch.as_tensor(list(self.heads), device=query.device), self.scale * self.vectors.to(query))
        return query + added[None, :, None, :]


@dataclass
class ScaleSinks(Intervention):
    """ACT's sink calibration: in ``heads``, multiply the attention to ``sink_positions`` by ``beta``
    and give the removed mass back to the other visible keys in proportion to their attention."""

    layer: int
    heads: Sequence[int]
    sink_positions: Sequence[int]
    beta: float = 0.4
    edits_probs = True

    def edit_probs(self, probs, positions):
        n_keys = probs.shape[-1]
        sinks = torch.as_tensor([s for s in self.sink_positions if s < n_keys], dtype=torch.long, device=probs.device)
        if sinks.numel() == 0:
            return probs
        heads = torch.as_tensor(list(self.heads), device=probs.device)
        selected = probs[:, heads]
        is_sink = torch.zeros(n_keys, dtype=torch.bool, device=probs.device)
        is_sink[sinks] = True
        sink_mass = selected[..., is_sink].sum(-1, keepdim=True)
        other_mass = (selected.sum(-1, keepdim=True) - sink_mass).clamp_min(1e-30)
        removed = (1.0 - self.beta) * sink_mass
        rescaled = torch.where(is_sink, selected * self.beta, selected * (1.0 + removed / other_mass))
        probs = probs.clone()
        probs[:, heads] = rescaled
        return probs


@dataclass
class ReplaceZ(Intervention):
    """Replace the output ``z`` of heads at ``positions`` (activation patching and ablation).

    ``positions`` are absolute (distinct) positions; a negative one counts from the end of the tokens
    read so far (-1: the last query of the pass), so it also works on a decode step from a KV cache.
    ``values[b, i, h]`` is the new z at ``positions[i]`` for head h; ``where[b, h]`` says which heads
    are replaced in batch element b (batch 1 broadcasts). This lets one batched forward patch a
    different head in each batch element.
    """

    layer: int
    positions: Sequence[int]
    values: Float[Tensor, "batch pos head d_head"]
    where: Bool[Tensor, "batch head"]

    def edit_z(self, z, positions):
        wanted = torch.as_tensor(list(self.positions), device=z.device)
        wanted = torch.where(wanted < 0, wanted + positions[-1] + 1, wanted)
        # match[q, i]: query row q is positions[i]. Placing values by a matmul needs no host sync, and
        # rows whose position is not in this pass (another decode step) keep their z.
        match = positions[:, None] == wanted[None, :]
        placed = torch.einsum("qi,bihd->bqhd", match.to(z.dtype), self.values.to(z))
        replace = self.where.to(z.device)[:, None, :, None] & match.any(-1)[None, :, None, None]
        return torch.where(replace, placed, z)
