"""Per-architecture adapters: where a Hugging Face causal LM keeps the parts the capture engine hooks.

Every architecture here computes attention through transformers' attention interface, which is what
lets one capture mechanism serve them all (see lens/_capture/attention.py). An adapter only says where
the decoder layers are and which module writes the MLP's contribution into the residual stream; add a
line to ``ADAPTERS`` to support another family.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Module paths of one architecture family, relative to the ``*ForCausalLM`` object."""

    layers_path: str = "model.layers"
    # The module whose output is what the MLP adds to the residual stream (after any post-norm).
    mlp_write_name: str = "mlp"

    def layers(self, hf_model: nn.Module) -> nn.ModuleList:
        return hf_model.get_submodule(self.layers_path)

    def mlp_write(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.mlp_write_name)


_LLAMA_LIKE = ArchitectureAdapter()

ADAPTERS: dict[str, ArchitectureAdapter] = {
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
    "Qwen3ForCausalLM": _LLAMA_LIKE,
    # Gemma 3 normalises the MLP output before adding it to the residual stream.
    "Gemma3ForCausalLM": ArchitectureAdapter(mlp_write_name="post_feedforward_layernorm"),
}


def adapter_for(architecture: str) -> ArchitectureAdapter:
    try:
        return ADAPTERS[architecture]
    except KeyError:
        known = ", ".join(sorted(ADAPTERS))
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {known}") from None
