"""TransformerLens hook names for the workbench's needs and interventions.

A TransformerLens user names activations ``blocks.{layer}.attn.hook_pattern`` and writes hooks
``fn(activation, hook)`` that may return a replacement. ``lens.capture(model, tokens, hooks={name: fn})``
takes the same names and functions and runs them in the workbench's one forward pass (``hook_points``
turns them into needs and interventions for ``lens.session``). Shapes are TransformerLens's:

| name | ``fn`` receives | a returned tensor |
|---|---|---|
| ``blocks.L.attn.hook_pattern`` | ``AttentionBlock``: rows ``probs[batch, head, row, key]`` of the pattern at ``positions``, block by block (never the whole ``pos x pos``) | not allowed |
| ``blocks.L.hook_resid_post`` | ``[batch, pos, d_model]`` | not allowed |
| ``blocks.L.hook_mlp_out`` | ``[batch, pos, d_model]`` | not allowed |
| ``blocks.L.attn.hook_rot_q`` | rotated queries ``[batch, pos, head, d_head]`` | replaces them |
| ``blocks.L.attn.hook_rot_k`` | rotated keys ``[batch, pos, kv_head, d_head]`` | replaces them |
| ``blocks.L.attn.hook_z`` | per-head outputs ``[batch, pos, head, d_head]`` | replaces them |
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from einops import rearrange
from torch import Tensor

from lens._capture.interventions import Intervention
from lens._capture.needs import AttentionRows, Need, Residual

_NAME = re.compile(r"blocks\.(\d+)\.(attn\.hook_pattern|hook_resid_post|hook_mlp_out|attn\.hook_rot_q|attn\.hook_rot_k|attn\.hook_z)")
SUPPORTED = ("attn.hook_pattern", "hook_resid_post", "hook_mlp_out", "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_z")


@dataclass(frozen=True)
class HookPoint:
    """What a hook function gets as ``hook``: the name and, like TransformerLens's, ``layer()``."""

    name: str
    index: int

    def layer(self) -> int:
        return self.index


def _observe(fn, hook: HookPoint, value) -> None:
    if fn(value, hook) is not None:
        raise ValueError(f"{hook.name}: capture only reads this activation; edit it with an Intervention (lens/_capture/interventions.py)")


@dataclass
class _HookEdit(Intervention):
    """A TransformerLens-style hook on rotated queries, rotated keys or ``z`` of one layer."""

    layer: int
    site: str
    fn: Callable
    hook: HookPoint

    def _call(self, value: Tensor, layout: str) -> Tensor:
        # The attention function holds queries and keys as [batch, head, pos, d_head]; TransformerLens
        # hands hooks [batch, pos, head, d_head].
        replaced = self.fn(rearrange(value, f"{layout} -> b p h d"), self.hook)
        return value if replaced is None else rearrange(replaced, f"b p h d -> {layout}")

    def edit_query(self, query, positions):
        return self._call(query, "b h p d") if self.site == "attn.hook_rot_q" else query

    def edit_key(self, key, positions):
        return self._call(key, "b h p d") if self.site == "attn.hook_rot_k" else key

    def edit_z(self, z, positions):
        return self._call(z, "b p h d") if self.site == "attn.hook_z" else z


def hook_points(hooks: Mapping[str, Callable], n_layers: int) -> tuple[list[Need], list[Intervention]]:
    """The needs and interventions that run TransformerLens-named hooks ``{name: fn(activation, hook)}``."""
    needs: list[Need] = []
    edits: list[Intervention] = []
    for name, fn in hooks.items():
        match = _NAME.fullmatch(name)
        if match is None:
            raise ValueError(f"unknown hook name {name!r}; capture knows blocks.<layer>.{{{', '.join(SUPPORTED)}}}")
        layer, site = int(match[1]), match[2]
        if layer >= n_layers:
            raise ValueError(f"{name}: the model has {n_layers} layers")
        hook = HookPoint(name, layer)
        if site == "attn.hook_pattern":
            needs.append(AttentionRows(lambda block, fn=fn, hook=hook: _observe(fn, hook, block), layers=[layer]))
        elif site in ("hook_resid_post", "hook_mlp_out"):
            kind = "resid_post" if site == "hook_resid_post" else "mlp_out"

            def consume(index: int, value: Tensor, fn=fn, hook=hook) -> None:
                if index == hook.index:
                    _observe(fn, hook, value)

            needs.append(Residual(consume, kind=kind))
        else:
            edits.append(_HookEdit(layer, site, fn, hook))
    return needs, edits
