"""Shared fixtures: the real embedded model (loaded once per test session) and a tiny random Llama."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=DeprecationWarning)

# Runtime shape checking of metrics/: every jaxtyping annotation is checked by beartype on every call
# in the tests, so a wrong shape (or a wrong annotation) fails. Installed before anything imports metrics.
from jaxtyping import install_import_hook  # noqa: E402

install_import_hook("metrics", "beartype.beartype")


@pytest.fixture(scope="session")
def smollm2():
    import lens

    return lens.load("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_llama():
    import lens

    return lens.load("tiny-llama")


@pytest.fixture(scope="session")
def eager_reference():
    """``eager_reference(model)``: the same weights with transformers' eager attention, for
    ``output_attentions`` ground truth. Cached per model."""
    import torch
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(model):
        if model.name not in cache:
            reference = AutoModelForCausalLM.from_pretrained(model.folder, dtype=torch.float32, attn_implementation="eager")
            cache[model.name] = reference.eval()
        return cache[model.name]

    return get


@pytest.fixture
def store(tmp_path):
    import lens

    return lens.ReportStore(tmp_path / "store")
