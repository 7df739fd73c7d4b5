"""Attention pooled into token bins: a long text's attention pattern at a resolution a screen can show.

Query positions and key positions are grouped into consecutive bins. The pooled value from query bin
i to key bin j is the attention mass the bin's queries put on the bin's keys, averaged over the
queries: each pooled row still sums to 1, and with one token per bin it is the attention itself.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor


def token_bins(n_tokens: int, max_bins: int) -> Int[Tensor, " token"]:
    """Bin index of each position: ``min(n_tokens, max_bins)`` consecutive bins of near-equal size."""
    n_bins = max(1, min(n_tokens, max_bins))
    return torch.div(torch.arange(n_tokens) * n_bins, n_tokens, rounding_mode="floor")


def add_block(
    pooled: Float[Tensor, "head bin bin"],
    probs: Float[Tensor, "head row key"],
    row_bins: Int[Tensor, " row"],
    key_bins: Int[Tensor, " key"],
) -> None:
    """Add a block of attention rows into the pooled sums (in place): keys summed within each key bin,
    rows summed within each query bin. Divide by ``bin_sizes`` of the query bins at the end."""
    n_heads, n_bins = pooled.shape[0], pooled.shape[-1]
    by_key = probs.new_zeros(n_heads, probs.shape[1], n_bins).index_add_(2, key_bins, probs)
    pooled.index_add_(1, row_bins, by_key.to(pooled.dtype))


def bin_sizes(bins: Int[Tensor, " token"], n_bins: int) -> Float[Tensor, " bin"]:
    """How many positions fall in each bin."""
    return torch.bincount(bins, minlength=n_bins).to(torch.float32)
