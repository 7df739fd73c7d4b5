"""Language-model losses from logits."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor


def next_token_loss(logits: Float[Tensor, "pos vocab"], tokens: Int[Tensor, " pos"]) -> float:
    """Mean cross-entropy (nats) of predicting ``tokens[t + 1]`` from the logits at ``t``."""
    return float(torch.nn.functional.cross_entropy(logits[:-1].float(), tokens[1:].to(logits.device)))


def next_token_loss_sum(logits: Float[Tensor, "row vocab"], positions: Int[Tensor, " row"], tokens: Int[Tensor, " pos"]) -> float:
    """Summed cross-entropy (nats) of predicting ``tokens[t + 1]`` from the logits at each position t
    of a chunk (the last position of the sequence has no target and is skipped). Summed over the
    chunks of a sequence and divided by ``len(tokens) - 1``, it equals ``next_token_loss``."""
    has_target = positions < len(tokens) - 1
    targets = tokens.to(logits.device)[positions[has_target].to(logits.device) + 1]
    return float(torch.nn.functional.cross_entropy(logits[has_target.to(logits.device)].float(), targets, reduction="sum"))
