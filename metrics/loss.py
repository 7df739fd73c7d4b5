"""Language-model losses from logits."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor


def next_token_loss(logits: Float[Tensor, "pos vocab"], tokens: Int[Tensor, " pos"]) -> float:
    """Mean cross-entropy (nats) of predicting ``tokens[t + 1]`` from the logits at ``t``."""
    return float(torch.nn.functional.cross_entropy(logits[:-1].float(), tokens[1:].to(logits.device)))
