"""Reductions of one layer's hidden states ``[pos, d_model]`` (residual stream or a sublayer's output)."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor


def position_norms(hidden: Float[Tensor, "pos d_model"]) -> Float[Tensor, " pos"]:
    return hidden.float().norm(dim=-1)


def cosine_to_position(hidden: Float[Tensor, "pos d_model"], index: int = 0) -> Float[Tensor, " pos"]:
    """Cosine similarity of every position's hidden state with the state at ``index``."""
    hidden = hidden.float()
    norms = hidden.norm(dim=-1).clamp_min(1e-12)
    return (hidden @ hidden[index]) / (norms * norms[index])


def top_magnitudes(
    hidden: Float[Tensor, "pos d_model"], k: int
) -> tuple[Float[Tensor, " k"], Int[Tensor, " k"], Int[Tensor, " k"]]:
    """The ``k`` entries of largest magnitude: their signed values, positions and channels."""
    flat = hidden.float().flatten()
    _, index = flat.abs().topk(min(k, flat.numel()))
    return flat[index], index // hidden.shape[-1], index % hidden.shape[-1]


def median_magnitude(hidden: Float[Tensor, "pos d_model"]) -> Float[Tensor, ""]:
    """Median |entry| over the whole layer (Sun et al.'s reference level)."""
    return hidden.float().abs().flatten().median()
