"""The appending KV cache holds what transformers' DynamicCache holds, through every way a cache is used."""

import copy

import torch
from transformers import DynamicCache

from lens._models.kv_cache import AppendingLayer, new_cache


def _states(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, length, 8, generator=generator), torch.randn(batch, 3, length, 8, generator=generator)


def _same(ours: DynamicCache, theirs: DynamicCache) -> bool:
    return all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) for a, b in zip(ours.layers, theirs.layers, strict=True))


@torch.no_grad()
def test_appending_equals_dynamic_cache_through_crop_repeat_copy_and_select():
    ours, theirs = new_cache(), DynamicCache()
    steps = [(1, 70), (1, 1), (1, 1), ("crop", -2), (1, 5), ("repeat", 3), (3, 1), ("copy", None), (3, 200), ("select", [2, 0]), (2, 1)]
    for seed, (what, arg) in enumerate(steps):
        if what == "crop":
            ours.crop(arg), theirs.crop(arg)
        elif what == "repeat":
            ours.batch_repeat_interleave(arg), theirs.batch_repeat_interleave(arg)
        elif what == "copy":
            ours, theirs = copy.deepcopy(ours), copy.deepcopy(theirs)
        elif what == "select":
            ours.batch_select_indices(torch.tensor(arg)), theirs.batch_select_indices(torch.tensor(arg))
        else:
            for layer in range(2):
                states = _states(what, arg, seed * 10 + layer)
                returned, expected = ours.update(*states, layer), theirs.update(*states, layer)
                assert all(torch.equal(a, b) for a, b in zip(returned, expected))
        assert _same(ours, theirs) and ours.get_seq_length() == theirs.get_seq_length(), f"after step {seed}: {what} {arg}"
    assert all(isinstance(layer, AppendingLayer) for layer in ours.layers)


@torch.no_grad()
def test_appends_in_place_and_keeps_earlier_copies_intact():
    cache = new_cache()
    cache.update(*_states(1, 10, 0), 0)
    room = cache.layers[0].keys.data_ptr()
    kept = copy.deepcopy(cache)
    cache.update(*_states(1, 1, 1), 0)
    assert cache.layers[0].keys.data_ptr() == room, "a short append writes into the spare room, with no copy"
    assert kept.get_seq_length() == 10 and torch.equal(kept.layers[0].keys, _states(1, 10, 0)[0])


def test_with_gradients_enabled_it_concatenates_and_gradients_flow():
    cache = new_cache()
    cache.update(*_states(1, 3, 2), 1)
    before = cache.layers[1].keys
    cache.update(*_states(1, 1, 3), 1)
    assert cache.layers[1].keys.data_ptr() != before.data_ptr(), "a new tensor each step: one saved for backward is never written into"

    first = _states(1, 4, 0)[0].requires_grad_()
    cache.update(first, first * 2, 0)
    keys, values = cache.update(first[..., :1, :] * 3, first[..., :1, :], 0)
    (keys.sum() + values.sum()).backward()
    assert torch.allclose(first.grad[..., 0, :], torch.full_like(first.grad[..., 0, :], 1 + 2 + 3 + 1))
