"""Tiny random-weight models of any architecture, built from its config (no download): 2 layers,
4 query heads over 2 KV heads where the architecture has grouped-query attention, 16 dimensions a head.

The catalog's ``tiny-llama`` is one; tests/lens/test_architectures.py builds one of every architecture in
``TINY_MODEL_TYPES`` and checks capture and a census on each.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Architectures (transformers model types) the tests build and check; docs/architectures.md marks them.
TINY_MODEL_TYPES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "phi", "gpt2", "gpt_neox", "olmo2",
    "cohere", "granite", "starcoder2",
)  # fmt: skip

TINY_DIMS = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
}
# A window shorter than the tests' prompts, so the sliding-window layers really slide.
TINY_WINDOW = 8
# One layer of each kind where an architecture interleaves them (Gemma 3's default is five sliding, one full).
TINY_OVERRIDES = {
    "gemma3_text": {"layer_types": ["sliding_attention", "full_attention"]},
    "gemma2": {"layer_types": ["sliding_attention", "full_attention"]},
}


def tiny_config(model_type: str, tokenizer, **overrides):
    """The config of a tiny ``model_type`` model over ``tokenizer``'s vocabulary and special tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_class = type(AutoConfig.for_model(model_type))
    defaults = config_class()
    # Only the fields the architecture has: a stray num_key_value_heads on GPT-2 would read as GQA.
    dims = {key: value for key, value in TINY_DIMS.items() if hasattr(defaults, key)}
    if getattr(defaults, "sliding_window", None) is not None or "sliding_window" in defaults.to_dict():
        dims["sliding_window"] = TINY_WINDOW
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": None}
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **{**dims, **special, **TINY_OVERRIDES.get(model_type, {}), **overrides})
    config.architectures = [AutoModelForCausalLM._model_mapping[config_class].__name__]
    return config


def build_tiny(model_type: str, out: Path, tokenizer, seed: int = 0, **overrides) -> None:
    """Write a complete Hugging Face folder (config, random weights from ``seed``, tokenizer) into ``out``."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, tokenizer, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
