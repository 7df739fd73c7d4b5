"""Reductions of post-softmax attention shared by several detectors.

``received`` is attention summed over query rows: ``received[..., s] = sum_t A[t, s]``.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def received_attention(probs: Float[Tensor, "*batch head row key"]) -> Float[Tensor, "*batch head key"]:
    """Attention each key receives, summed over the given query rows."""
    return probs.sum(dim=-2)


def queries_seeing(seq_len: int, device: torch.device | None = None) -> Float[Tensor, " key"]:
    """How many causal query positions see key s: ``seq_len - s``."""
    return torch.arange(seq_len, 0, -1, device=device, dtype=torch.float32)


def key_importance(received: Float[Tensor, "*batch key"]) -> Float[Tensor, "*batch key"]:
    """Mean attention key s receives over the queries that can see it (t >= s), from full-row sums."""
    return received / queries_seeing(received.shape[-1], received.device)


def prefix_mass(received: Float[Tensor, "*batch key"], n_prefix: int) -> Float[Tensor, "*batch"]:
    """Mean over all query rows of the attention on the first ``n_prefix`` keys."""
    return received[..., :n_prefix].sum(dim=-1) / received.shape[-1]
