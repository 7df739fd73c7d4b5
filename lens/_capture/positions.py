"""Absolute positions of the queries and keys a layer receives (docs/capture.md): read from the
``position_ids`` the model passes, never from the number of keys."""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor


class CachePositionError(RuntimeError):
    """The keys a layer received do not run from position 0 to its last query."""


def first_query_position(position_ids: Int[Tensor, "batch_or_1 q"] | None, q_len: int) -> int:
    """The absolute position of the first query, from the ``position_ids`` the model passes. Capture
    reads consecutive positions, the same in every batch row (no padding, no packed sequences)."""
    if position_ids is None:
        raise CachePositionError("the model passed no position_ids to its attention function; capture needs each query's position")
    position_ids = position_ids.reshape(-1, position_ids.shape[-1])
    first = int(position_ids[0, 0])
    expected = torch.arange(first, first + q_len, device=position_ids.device)
    if position_ids.shape[-1] != q_len or not bool((position_ids == expected).all()):
        shown = position_ids[:4, :8].tolist()  # enough to see the problem in one line
        raise CachePositionError(f"capture needs consecutive query positions, the same in every batch row; got {shown} (first rows and columns)")
    return first


def check_keys(layer: int, first: int, q_len: int, kv_len: int) -> None:
    if first + q_len != kv_len:
        raise CachePositionError(
            f"layer {layer} received {kv_len} keys for queries at positions {first}..{first + q_len - 1}: capture needs the keys of "
            f"every position from 0 (a sliding-window cache keeps only the last window); continue from model.prefix_cache(tokens) "
            f"or model.new_cache()"
        )
