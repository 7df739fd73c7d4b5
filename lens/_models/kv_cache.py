"""A KV cache that appends in place: ``new_cache()``.

transformers' ``DynamicCache`` grows each layer by ``torch.cat``, so every decoding step after a long
prompt copies the whole cache: after 4,000 tokens that copy was a third of a CPU decode step, and a
batch of rows multiplies it. ``AppendingLayer`` keeps spare room after the filled part and writes new
keys and values into it; ``keys`` and ``values`` are views of the filled part, with the same values
``DynamicLayer`` would hold. Whatever replaces them (cropping, repeating over a batch, a deep copy,
moving devices) leaves a tensor that is not a view of the room, and the next append starts a new room
from it. With gradients enabled the layer concatenates, as ``DynamicLayer`` does: an in-place write
into the room would invalidate the keys an earlier step saved for its backward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# Spare positions a new room leaves: a quarter of what it holds, at least this many.
_MIN_ROOM = 64


class AppendingLayer(DynamicLayer):
    _key_room: Tensor | None = None
    _value_room: Tensor | None = None

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if torch.is_grad_enabled():
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        filled, added = self.get_seq_length(), key_states.shape[-2]
        if not self._room_takes(key_states, filled + added):
            capacity = filled + added + max(_MIN_ROOM, (filled + added) // 4)
            self._key_room = _room(self.keys, key_states, filled, capacity)
            self._value_room = _room(self.values, value_states, filled, capacity)
        self._key_room[..., filled : filled + added, :] = key_states
        self._value_room[..., filled : filled + added, :] = value_states
        self.keys = self._key_room[..., : filled + added, :]
        self.values = self._value_room[..., : filled + added, :]
        return self.keys, self.values

    def _room_takes(self, states: Tensor, length: int) -> bool:
        """Whether the room holds this layer's keys and values, has ``length`` positions and fits ``states``."""
        room = self._key_room
        if room is None or room.shape[-2] < length or room.shape[:-2] != states.shape[:-2] or room.shape[-1] != states.shape[-1]:
            return False
        if room.dtype != states.dtype or room.device != states.device:
            return False
        return self.get_seq_length() == 0 or (self.keys.data_ptr() == room.data_ptr() and self.values.data_ptr() == self._value_room.data_ptr())


def _room(filled: Tensor, states: Tensor, n_filled: int, capacity: int) -> Tensor:
    room = states.new_empty((*states.shape[:-2], capacity, states.shape[-1]))
    if n_filled:
        room[..., :n_filled, :] = filled
    return room


def new_cache() -> DynamicCache:
    """An empty cache of ``AppendingLayer``: every key of every layer kept (no sliding-window cut)."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = AppendingLayer
    return cache
