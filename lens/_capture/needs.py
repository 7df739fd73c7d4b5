"""What a detector asks of one forward pass.

A detector never receives a cache. It declares needs, each with a callback that reduces what it gets
right away, layer by layer, so nothing of size layers x positions^2 is ever held:

- ``AttentionRows``: post-softmax attention of some query rows (or all), streamed in blocks;
- ``Residual``: a residual-stream tensor per layer (``resid_post`` or ``mlp_out``);
- ``Logits``: next-token logits at some positions (the LM head runs only there);
- ``LogitChunks``: logits at many positions, streamed a chunk at a time (loss or entropy over long
  inputs without a positions x vocabulary tensor).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from jaxtyping import Float, Int
from torch import Tensor


@dataclass(frozen=True)
class AttentionBlock:
    """A block of attention rows of one layer.

    ``probs[b, h, i, s]`` is the attention of query head h at query position ``positions[i]`` to key s.
    Only keys ``0 .. n_keys-1`` are present (``n_keys = probs.shape[-1]``); every later key has zero
    attention from these rows (causality), so reducers add into ``[..., :n_keys]``.
    """

    layer: int
    positions: Int[Tensor, " row"]
    probs: Float[Tensor, "batch head row key"]

    @property
    def n_keys(self) -> int:
        return self.probs.shape[-1]


@dataclass(frozen=True)
class AttentionRows:
    """Attention rows at ``positions`` (None: every query position) of ``layers`` (None: all)."""

    consume: Callable[[AttentionBlock], None]
    positions: Sequence[int] | None = None
    layers: Sequence[int] | None = None


@dataclass(frozen=True)
class Residual:
    """A per-layer residual-stream tensor, ``[batch, pos, d_model]``, handed to ``consume(layer, x)``.

    ``resid_post``: the residual stream after the layer. ``mlp_out``: what the layer's MLP adds to it.
    """

    consume: Callable[[int, Float[Tensor, "batch pos d_model"]], None]
    kind: Literal["resid_post", "mlp_out"] = "resid_post"


@dataclass(frozen=True)
class Logits:
    """Next-token logits ``[batch, len(positions), vocab]`` at ``positions``."""

    consume: Callable[[Float[Tensor, "batch row vocab"]], None]
    positions: Sequence[int] = field(default_factory=lambda: [-1])


@dataclass(frozen=True)
class LogitChunks:
    """Logits at ``positions`` (None: every position), ``chunk`` positions at a time:
    ``consume(positions, logits[batch, len(positions), vocab])``."""

    consume: Callable[[Int[Tensor, " row"], Float[Tensor, "batch row vocab"]], None]
    positions: Sequence[int] | None = None
    chunk: int = 256


Need = AttentionRows | Residual | Logits | LogitChunks
