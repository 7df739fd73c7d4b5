"""Attention-sink statistics (Gu et al., "When Attention Sink Emerges in Language Models")."""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor


def sink_rate(sink_scores: Float[Tensor, "layer head"], eps: float) -> float:
    """Sink_1^eps: percent of (layer, head) pairs whose first-token importance exceeds ``eps``."""
    return float((sink_scores > eps).double().mean() * 100.0)
