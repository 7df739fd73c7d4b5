"""A stable fingerprint of a model's weights, recorded with every report."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch


def weights_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over parameter names, dtypes, shapes and bytes, in name order; first 16 hex digits."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]
