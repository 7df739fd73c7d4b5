"""``lens.load``: a model ready for analysis, with its tokenizer and metadata.

Two views of the same weights:
- ``model.hf`` is the plain transformers model with the workbench's attention function (SDPA speed;
  the capture engine computes attention statistics inside it). The census runs on it.
- ``model.bridge`` is a TransformerLens 4.x ``TransformerBridge`` over a second copy of the weights,
  made on first use, for hook-based exploration and full caches in notebooks. The bridge rewires the
  model it wraps (eager attention, its own modules), which is why it gets its own copy.

BOS policy (``model.tokenize(text, bos=...)``): ``"never"`` (the default of ``tokenize``) gives the text
exactly as given, special-token strings included; ``"always"`` puts the tokenizer's BOS first;
``"auto"`` (the default of every detector and of ``lens.census``) does what the tokenizer itself does
with ``add_special_tokens=True``: Gemma 3 adds ``<bos>``, SmolLM2 adds nothing. Text that already
starts with BOS never gets a second one. ``bridge.to_tokens`` prepends the tokenizer's BOS
(``<|im_start|>`` on SmolLM2) by default, and would double it on chat-formatted text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor

from lens._capture.attention import ATTENTION_IMPLEMENTATION, register_attention
from lens._models.architectures import ArchitectureAdapter, adapter_for
from lens._models.catalog import CATALOG, cached_fingerprint, ensure_cached, known_models
from lens._models.fingerprint import weights_fingerprint


BOS_POLICIES = ("auto", "always", "never")


class UnknownModelError(ValueError):
    pass


class PromptTooLongError(ValueError):
    pass


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    n_ctx: int
    fingerprint: str
    bos_token: str | None
    # Per layer: "full_attention" or "sliding_attention" (Gemma 3 interleaves them).
    layer_types: tuple[str, ...] = field(default=())

    @property
    def n_heads_total(self) -> int:
        return self.n_layers * self.n_heads


@dataclass
class Model:
    info: ModelInfo
    hf: torch.nn.Module
    tokenizer: object
    adapter: ArchitectureAdapter
    folder: Path | None
    bridge_name: str

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    def tokenize(self, text: str, *, bos: str = "never") -> Tensor:
        """Token ids of ``text`` (special-token strings count as special tokens), with a BOS first per
        ``bos``: ``"never"`` (the text exactly as given), ``"always"``, or ``"auto"`` (where the
        tokenizer adds one itself). A text that already starts with BOS gets no second one."""
        if bos not in BOS_POLICIES:
            raise ValueError(f"bos must be one of {', '.join(BOS_POLICIES)}, got {bos!r}")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos_id = self.tokenizer.bos_token_id
        # The tokenizer's own policy: what it puts before an empty text when asked for special tokens.
        wanted = bos == "always" or (bos == "auto" and bos_id is not None and self.tokenizer("")["input_ids"][:1] == [bos_id])
        if wanted and ids[:1] != [bos_id]:
            if bos_id is None:
                raise ValueError(f"{self.name} has no BOS token to prepend")
            ids = [bos_id, *ids]
        return torch.tensor(ids, dtype=torch.long)

    def check_length(self, n_tokens: int, what: str = "prompt") -> None:
        if n_tokens > self.info.n_ctx:
            raise PromptTooLongError(
                f"{what} has {n_tokens} tokens, longer than {self.name}'s context of {self.info.n_ctx}"
            )

    def new_cache(self):
        """An empty KV cache that keeps the key of every position on every layer. transformers' default
        (``DynamicCache(config=...)``) keeps only the last window on sliding-window layers, which capture
        refuses: it reads key ``s`` as position ``s``. With every key kept, the mask applies the window."""
        from transformers import DynamicCache

        return DynamicCache()

    def prefix_cache(self, tokens: Tensor):
        """The KV cache of ``tokens`` (``[pos]`` or ``[batch, pos]``), keeping every key: run a prefix once,
        then continue it with ``lens.generate(..., past_key_values=)`` or a decoder call, inside a capture
        session or not (``copy.deepcopy`` it to reuse it, or ``crop(-n)`` it back to the prefix)."""
        self.check_length(tokens.shape[-1], what="prefix")
        cache = self.new_cache()
        with torch.no_grad():
            self.hf.get_decoder()(input_ids=tokens.reshape(-1, tokens.shape[-1]).to(self.device), past_key_values=cache, use_cache=True)
        return cache

    def token_strings(self, ids: Tensor) -> list[str]:
        return [self.tokenizer.decode([i]) for i in ids.tolist()]

    @cached_property
    def bridge(self):
        """A TransformerLens ``TransformerBridge`` over its own copy of the weights (built lazily)."""
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import AutoModelForCausalLM

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if self.folder is None:
            raise ValueError(f"{self.name} has no local folder to build a bridge from")
        hf_copy = AutoModelForCausalLM.from_pretrained(self.folder, dtype=torch.float32).to(self.device)
        hf_copy.eval()
        return TransformerBridge.boot_transformers(self.bridge_name, hf_model=hf_copy, tokenizer=self.tokenizer)

    def __repr__(self) -> str:
        i = self.info
        return (
            f"Model({i.name}: {i.n_layers} layers x {i.n_heads} heads ({i.n_kv_heads} KV), d_head={i.d_head}, "
            f"n_ctx={i.n_ctx}, fingerprint={i.fingerprint})"
        )


def _resolve(name: str) -> tuple[Path | str, str, str]:
    """(folder or hub id, display name, bridge name) for a catalog name, a local folder or a hub id."""
    if name in CATALOG:
        return ensure_cached(name), name, CATALOG[name].bridge_name
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return path, path.name, path.name
    if "/" in name and not path.exists():
        return name, name, name  # a hub id: needs hub access, which this machine does not have
    raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(known_models())} (or a local HF folder)")


def load(name: str = "smollm2-135m", *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Model:
    """Load a model by catalog name (``lens.known_models()``), local Hugging Face folder or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, display_name, bridge_name = _resolve(name)
    register_attention()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=ATTENTION_IMPLEMENTATION)
    except OSError as error:
        raise UnknownModelError(f"cannot load model {name!r}: {str(error).splitlines()[0]}") from None
    hf.to(device).eval()
    config = hf.config.get_text_config()
    architecture = (hf.config.architectures or [type(hf).__name__])[0]
    folder = source if isinstance(source, Path) else None
    fingerprint = (cached_fingerprint(folder) if folder else None) or weights_fingerprint(hf.state_dict())
    n_heads = config.num_attention_heads
    info = ModelInfo(
        name=display_name,
        architecture=architecture,
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        d_head=getattr(config, "head_dim", None) or config.hidden_size // n_heads,
        d_model=config.hidden_size,
        n_ctx=config.max_position_embeddings,
        fingerprint=fingerprint,
        bos_token=tokenizer.bos_token,
        layer_types=tuple(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers),
    )
    return Model(info, hf, tokenizer, adapter_for(architecture), folder, bridge_name)
