"""Where a Hugging Face causal LM keeps the parts the workbench hooks, read from TransformerLens.

TransformerLens 4.x ships an architecture adapter per family (``transformer_lens.model_bridge.
supported_architectures``). Its ``component_mapping`` names the Hugging Face module of each canonical
part: ``blocks`` (the decoder layers), and in each block ``attn``, ``mlp`` and the norms around them
(``ln1``/``ln2`` feed attention/MLP; ``ln1_post``/``ln2_post`` sit on their outputs, before the residual
add), then ``ln_final``, ``unembed`` and ``embed``. The workbench reads those paths instead of keeping
its own table, and the head counts and logit soft-capping from TransformerLens's reading of the config.

Capture itself needs no per-architecture code: it is an attention function registered with
transformers' attention interface (lens/_capture/attention.py). So an architecture is capturable when
TransformerLens maps it, transformers builds it as a causal LM whose attention goes through that
interface, and every layer is a softmax-attention layer (hybrids with Mamba, convolution or linear
attention layers are not: they have layers the capture never sees).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from torch import nn

from lens._models.errors import UnsupportedArchitectureError

# Layer types (``config.layer_types``) whose attention is softmax attention through the interface;
# the model's mask applies the window or the chunk, and capture intersects its rows with that mask.
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention"})


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Module paths of one architecture, relative to the ``*ForCausalLM`` object (``layers_path``,
    ``final_norm_path``, ``unembed_path``, ``embed_path``) or to one decoder layer (the rest)."""

    architecture: str
    layers_path: str
    attention_name: str
    # The module whose output is what attention adds to the residual stream: the attention, or the norm
    # on its output (Gemma 2 and 3's post_attention_layernorm, OLMo 2's).
    attention_write_name: str
    # The module whose output is what the MLP adds to the residual stream: the MLP itself, or the norm
    # on its output where there is one (Gemma 2 and 3's post_feedforward_layernorm, OLMo 2's).
    mlp_write_name: str
    final_norm_path: str | None  # None: no final norm (OPT-350m projects instead)
    # The attention's separate q, k and v projections, relative to the attention module; None where one
    # fused projection computes all three (GPT-2's c_attn, GPT-NeoX's query_key_value, Phi-3's qkv_proj)
    # or TransformerLens maps them otherwise (DeepSeek's low-rank queries and keys).
    projection_names: tuple[str, str, str] | None
    fused_projection_name: str | None
    unembed_path: str
    embed_path: str

    def layers(self, hf_model: nn.Module) -> nn.ModuleList:
        return hf_model.get_submodule(self.layers_path)

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.attention_name)

    def projection(self, attention: nn.Module, kind: str) -> nn.Module:
        """The ``kind`` ("q", "k" or "v") projection of an attention module, where it is a module of its own."""
        if self.projection_names is None:
            fused = f" (one fused projection: {self.fused_projection_name})" if self.fused_projection_name else ""
            raise UnsupportedArchitectureError(f"{self.architecture} has no separate q, k and v projection modules{fused}")
        return attention.get_submodule(self.projection_names["qkv".index(kind)])

    def attention_write(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.attention_write_name)

    def mlp_write(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.mlp_write_name)

    def final_norm(self, hf_model: nn.Module) -> nn.Module | None:
        return None if self.final_norm_path is None else hf_model.get_submodule(self.final_norm_path)

    def unembed(self, hf_model: nn.Module) -> nn.Module:
        return hf_model.get_submodule(self.unembed_path)

    def embed(self, hf_model: nn.Module) -> nn.Module:
        return hf_model.get_submodule(self.embed_path)


@functools.cache
def _transformer_lens_adapters() -> dict[str, type]:
    """TransformerLens's adapter class of every architecture it supports, by HF class name."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    return dict(SUPPORTED_ARCHITECTURES)


@functools.cache
def _causal_lm_names() -> frozenset[str]:
    """The names of transformers' causal-LM classes (those ``AutoModelForCausalLM`` builds), without
    importing their modules."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return frozenset(name for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for name in ([value] if isinstance(value, str) else value))


def _attention_blocks(tl_adapter):
    """TransformerLens's mapping of the decoder blocks, or the reason it maps none with attention in
    every layer."""
    blocks = tl_adapter.component_mapping.get("blocks")
    if blocks is None or "attn" not in blocks.submodules:
        return None, "TransformerLens maps no decoder blocks with attention for it"
    if blocks.submodules["attn"].optional:  # TransformerLens's mark of a hybrid: some layers have no attention
        return None, "some of its layers have no softmax attention (a hybrid)"
    return blocks, None


def transformer_lens_adapter(hf_config, architecture: str):
    """TransformerLens's adapter of an HF config, as ``TransformerBridge.boot_transformers`` builds it:
    its ``component_mapping`` and its config (head counts, soft-capping)."""
    from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_config_from_hf

    bridge_config = build_bridge_config_from_hf(hf_config, architecture, architecture, None)
    return ArchitectureAdapterFactory.select_architecture_adapter(bridge_config)


def _check(architecture: str, hf_config=None):
    """(TransformerLens's adapter, None) when the workbench can capture ``architecture`` (an HF class
    name) with ``hf_config`` (default: the architecture's default config), else (None, why not)."""
    import transformers

    adapter_class = _transformer_lens_adapters().get(architecture)
    if adapter_class is None:
        return None, "TransformerLens has no adapter for it"
    if not getattr(adapter_class, "supports_generation", True):
        return None, "it is not a generative decoder"
    if not hasattr(transformers, architecture):
        return None, "transformers has no class of that name (remote code)"
    if architecture not in _causal_lm_names():
        return None, "it is not a decoder-only causal LM"
    model_class = getattr(transformers, architecture)
    if not getattr(model_class, "_supports_attention_backend", False):
        return None, "its attention does not go through transformers' attention-function interface, which capture needs"
    hf_config = model_class.config_class() if hf_config is None else hf_config
    other_layers = set(getattr(hf_config.get_text_config(), "layer_types", None) or ()) - ATTENTION_LAYER_TYPES
    if other_layers:
        return None, f"it has layers without softmax attention ({', '.join(sorted(other_layers))})"
    try:
        tl_adapter = transformer_lens_adapter(hf_config, architecture)
    except ImportError as error:  # an adapter that needs an optional package (timm for Gemma 3n)
        return None, f"its TransformerLens adapter needs a package that is not installed ({str(error).splitlines()[0]})"
    reason = _attention_blocks(tl_adapter)[1]
    return (None, reason) if reason else (tl_adapter, None)


def why_not_capturable(architecture: str, hf_config=None) -> str | None:
    """Why the workbench cannot capture ``architecture`` with ``hf_config`` (default: its default
    config), or None when it can."""
    return _check(architecture, hf_config)[1]


@functools.cache
def supported_architectures() -> tuple[str, ...]:
    """Every architecture (HF class name) the workbench can load and capture with its default config, sorted."""
    return tuple(sorted(name for name in _transformer_lens_adapters() if why_not_capturable(name) is None))


def adapter_for(hf_config, architecture: str):
    """The workbench adapter of a model (``architecture``: its HF class name) and TransformerLens's
    config of it, or ``UnsupportedArchitectureError`` naming the architecture and the reason."""
    tl_adapter, reason = _check(architecture, hf_config)
    if reason is not None:
        raise UnsupportedArchitectureError(f"cannot capture {architecture}: {reason} (`lens architectures` lists the supported ones)")
    mapping = tl_adapter.component_mapping
    blocks, _ = _attention_blocks(tl_adapter)
    parts = blocks.submodules
    mlp = parts["mlp"]
    # Where the MLP has no container module of its own (OPT: fc1 and fc2 sit in the layer), its output
    # projection is what it writes.
    mlp_write = parts.get("ln2_post") or (mlp if mlp.name is not None else mlp.submodules["out"])
    final_norm = mapping.get("ln_final")
    attention_parts = parts["attn"].submodules
    fused = attention_parts.get("qkv")
    adapter = ArchitectureAdapter(
        architecture=architecture,
        layers_path=blocks.name,
        attention_name=parts["attn"].name,
        attention_write_name=(parts.get("ln1_post") or parts["attn"]).name,
        mlp_write_name=mlp_write.name,
        final_norm_path=None if final_norm is None else final_norm.name,
        projection_names=tuple(attention_parts[kind].name for kind in "qkv") if fused is None and set("qkv") <= set(attention_parts) else None,
        fused_projection_name=None if fused is None else fused.name,
        unembed_path=mapping["unembed"].name,
        embed_path=mapping["embed"].name,
    )
    return adapter, tl_adapter.cfg


def architectures_markdown() -> str:
    """The supported architectures (with the module paths read from TransformerLens, and whether the
    tests check a tiny model of each), then TransformerLens's other architectures and why not: the
    generated block of docs/architectures.md (``lens architectures --write docs/architectures.md``)."""
    import transformers

    from lens._models.tiny import TINY_MODEL_TYPES

    lines = [
        "| architecture | model type | decoder layers | attention | MLP write | final norm | tested |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in supported_architectures():
        model_class = getattr(transformers, name)
        adapter, _ = adapter_for(model_class.config_class(), name)
        model_type = model_class.config_class.model_type
        tested = "yes" if model_type in TINY_MODEL_TYPES else ""
        lines.append(f"| {name} | {model_type} | `{adapter.layers_path}` | `{adapter.attention_name}` | `{adapter.mlp_write_name}` | "
                     f"`{adapter.final_norm_path}` | {tested} |")
    lines += ["", "TransformerLens's other architectures, and why the workbench cannot capture them:", "",
              "| architecture | why not |", "|---|---|"]
    for name in sorted(_transformer_lens_adapters()):
        reason = why_not_capturable(name)
        if reason is not None:
            lines.append(f"| {name} | {reason.replace('|', '/')} |")
    return "\n".join(lines)


def architectures_summary() -> str:
    """One paragraph for the README: every supported architecture, the tested ones in bold."""
    import transformers

    from lens._models.tiny import TINY_MODEL_TYPES

    def short(name: str) -> str:
        tested = getattr(transformers, name).config_class.model_type in TINY_MODEL_TYPES
        label = name.removesuffix("ForCausalLM").removesuffix("LMHeadModel").replace("ForConditionalGeneration", " (multimodal)")
        return f"**{label}**" if tested else label

    names = supported_architectures()
    return (f"{len(names)} architectures, read from TransformerLens's adapters "
            f"([docs/architectures.md](docs/architectures.md); in bold those the tests run as tiny models): "
            f"{', '.join(short(name) for name in names)}.")
