"""Attention-sink statistics.

- Sink_k^eps (Gu et al., "When Attention Sink Emerges in Language Models", ICLR 2025; code
  sail-sg/Attention-Sink), thresholded per prompt before averaging, as the reference does;
- token-level sinks and the first detected sink (ACT, "Unveiling and Harnessing Hidden Attention Sinks");
- the layers where the first-token sink is active and the later tokens aligned with it, labelled by
  lifetime (Wong et al., "Secondary Attention Sinks");
- massive activations (Sun et al., "Massive Activations in Large Language Models", 2024).
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def sink_rate_per_prompt(importance: Float[Tensor, "prompt layer head"], eps: float) -> Float[Tensor, " prompt"]:
    """Per prompt, the percent of (layer, head) pairs whose importance of the key exceeds ``eps``.

    Gu et al. threshold each prompt first (``eval_sink_open_source.py``: ``importance > epsilon``
    per sample, layer and head), so a head that is a strong sink on half the prompts and none on
    the others counts on half of them, whatever its mean importance."""
    return (importance > eps).double().mean(dim=(1, 2)) * 100.0


def sink_rate(importance: Float[Tensor, "prompt layer head"], eps: float) -> float:
    """Sink_k^eps (Gu et al. 2025): percent of (prompt, layer, head) triples whose importance of key
    k (mean over t >= k of A[t, k]) exceeds ``eps``; the mean of ``sink_rate_per_prompt``."""
    return float(sink_rate_per_prompt(importance, eps).mean())


def sink_mask(
    importance: Float[Tensor, "*batch key"], n_queries: Float[Tensor, " key"], tau: float, min_queries: int
) -> Bool[Tensor, "*batch key"]:
    """ACT's sink test: key s is a sink when its importance (sum_t A[t, s] / (T - s)) exceeds ``tau``.

    Keys seen by fewer than ``min_queries`` queries are never sinks: near the end of a prompt the
    mean runs over a handful of rows and one large weight would flag the key.
    """
    return (importance > tau) & (n_queries >= min_queries)


def first_sinks(mask: Bool[Tensor, "*batch key"]) -> Bool[Tensor, "*batch key"]:
    """The first detected sink of each row of ``mask`` (ACT sets it aside; normally position 0)."""
    earlier = mask.long().cumsum(dim=-1) - mask.long()
    return mask & (earlier == 0)


def raised_layers(
    first_norm: Float[Tensor, " layer"], median_norm: Float[Tensor, " layer"], ratio: float
) -> Bool[Tensor, " layer"]:
    """Layers where the first token's hidden-state norm exceeds ``ratio`` times the median over positions.

    This keeps every stretch of layers where the first-token sink is active; a model may raise it in
    more than one stretch (SmolLM2-135M does, at layers 1-8 and from 11 on).
    """
    return first_norm > ratio * median_norm


def jump_window(first_norm: Float[Tensor, " layer"]) -> Bool[Tensor, " layer"]:
    """The Secondary-Attention-Sinks code's window: from the layer after the largest rise of the first
    token's norm to the layer of the largest fall after it (exclusive). One stretch only."""
    change = first_norm[1:] - first_norm[:-1]
    start = int(change.argmax()) + 1
    end = int(change[start:].argmin()) + start + 1 if start < change.numel() else first_norm.numel()
    window = torch.zeros_like(first_norm, dtype=torch.bool)
    window[start:end] = True
    return window


def aligned_with_first(
    cosine: Float[Tensor, "layer pos"], active: Bool[Tensor, " layer"], threshold: float
) -> Bool[Tensor, "layer pos"]:
    """Where a token's hidden state is sink-like: |cos(h[t], h[first])| > ``threshold`` in an active layer."""
    return (cosine.abs() > threshold) & active[:, None]


def lifetime_thresholds(n_layers: int, noise_fraction: float, primary_fraction: float) -> tuple[float, float]:
    """(noise_max, primary_min) in layers. The reference labels with > 4 and < L - 15 on 40-layer models;
    as fractions of the depth that is 4/40 = 0.1 and 25/40 = 0.625, which reproduce it at L = 40."""
    return noise_fraction * n_layers, primary_fraction * n_layers


def lifetime_label(lifetime: int, n_layers: int, noise_fraction: float, primary_fraction: float) -> str:
    """``noise`` (lifetime <= noise_max), ``primary`` (>= primary_min) or ``secondary`` (between)."""
    noise_max, primary_min = lifetime_thresholds(n_layers, noise_fraction, primary_fraction)
    if lifetime >= primary_min:
        return "primary"
    if lifetime <= noise_max:
        return "noise"
    return "secondary"


def is_massive(
    values: Float[Tensor, "*n"], median: Float[Tensor, "*n"], min_value: float, min_ratio: float
) -> Bool[Tensor, "*n"]:
    """Sun et al.'s massive activation: magnitude above ``min_value`` and ``min_ratio`` x the median magnitude."""
    magnitude = values.abs()
    return (magnitude > min_value) & (magnitude > min_ratio * median)


def formation(aligned: Bool[Tensor, "layer pos"]) -> tuple[Int[Tensor, " pos"], Int[Tensor, " pos"], Int[Tensor, " pos"]]:
    """Per position: the first and last aligned layer (-1 if never) and the number of aligned layers."""
    n_layers = aligned.shape[0]
    layers = torch.arange(n_layers)[:, None].expand_as(aligned)
    lifetime = aligned.sum(dim=0)
    first = torch.where(aligned, layers, n_layers).min(dim=0).values
    last = torch.where(aligned, layers, -1).max(dim=0).values
    first = torch.where(lifetime > 0, first, torch.full_like(first, -1))
    return first, last, lifetime

