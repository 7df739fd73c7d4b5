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

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens._capture.attention import ATTENTION_IMPLEMENTATION, register_attention
from lens._models.architectures import ArchitectureAdapter, adapter_for
from lens._models.errors import UnknownModelError, UnsupportedArchitectureError
from lens._models.catalog import CATALOG, cached_fingerprint, ensure_cached, known_models
from lens._models.fingerprint import weights_fingerprint
from lens._models.kv_cache import new_cache


BOS_POLICIES = ("auto", "always", "never")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    sliding_window: int | None = None  # keys a sliding-window layer sees (its own position included)
    attn_softcap: float | None = None  # attention scores become tanh(s / c) * c (Gemma 2)
    logit_softcap: float | None = None  # logits likewise (Gemma 2 and 3)
    # What the unembedding's output is multiplied by before any soft-capping (Cohere's logit_scale,
    # 1 / Granite's logits_scaling): TransformerLens folds it into the weights, the workbench applies it.
    logit_scale: float = 1.0
    dtype: str = "float32"

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
        refuses: it reads key ``s`` as position ``s``. With every key kept, the mask applies the window.
        Its layers append in place (``lens/_models/kv_cache.py``) rather than copy the cache each step."""
        return new_cache()

    def prefix_cache(self, tokens: Tensor):
        """The KV cache of ``tokens`` (``[pos]`` or ``[batch, pos]``), keeping every key: run a prefix once,
        then continue it with ``lens.generate(..., past_key_values=)`` or a decoder call, inside a capture
        session or not (``copy.deepcopy`` it to reuse it, or ``crop(-n)`` it back to the prefix)."""
        self.check_length(tokens.shape[-1], what="prefix")
        cache = self.new_cache()
        with torch.no_grad():
            self.hf.get_decoder()(input_ids=tokens.reshape(-1, tokens.shape[-1]).to(self.device), past_key_values=cache, use_cache=True)
        return cache

    def layers(self) -> torch.nn.ModuleList:
        """The decoder layers (where TransformerLens's adapter says they are)."""
        return self.adapter.layers(self.hf)

    def unembed(self, hidden: Float[Tensor, "*batch d_model"], rows: Int[Tensor, " row"] | None = None) -> Float[Tensor, "*batch vocab"]:
        """Logits of final (normed) hidden states: the unembedding, the logit scale, the soft-capping;
        with ``rows``, only those vocabulary entries' logits (the LM head runs on those rows alone)."""
        head = self.adapter.unembed(self.hf)
        if rows is None:
            logits = head(hidden)
        else:
            rows = rows.to(head.weight.device)
            logits = torch.nn.functional.linear(hidden, head.weight[rows], None if head.bias is None else head.bias[rows])
        if self.info.logit_scale != 1.0:
            logits = logits * self.info.logit_scale
        if self.info.logit_softcap is not None:
            logits = torch.tanh(logits / self.info.logit_softcap) * self.info.logit_softcap
        return logits

    def embed(self, ids: Int[Tensor, "*batch pos"]) -> Float[Tensor, "*batch pos d_model"]:
        """Input embeddings of token ids, as the model computes them (any embedding scale included)."""
        return self.adapter.embed(self.hf)(ids.to(self.device))

    @contextmanager
    def embeddings_replaced(self, embeddings: Float[Tensor, "batch pos d_model"]) -> Iterator[None]:
        """Inside the block, the embedding layer returns ``embeddings`` whatever tokens it is given: forward
        passes from edited or interpolated inputs (integrated gradients), with capture as usual."""
        handle = self.adapter.embed(self.hf).register_forward_hook(lambda _module, _inputs, output: embeddings.to(output))
        try:
            yield
        finally:
            handle.remove()

    def attention(self, layer: int) -> torch.nn.Module:
        """Layer ``layer``'s attention module."""
        return self.adapter.attention(self.layers()[layer])

    def projection(self, layer: int, kind: str) -> torch.nn.Module:
        """Layer ``layer``'s ``kind`` ("q", "k" or "v") projection, where the architecture has it as a
        module of its own (``UnsupportedArchitectureError`` where q, k and v are one fused module)."""
        return self.adapter.projection(self.attention(layer), kind)

    def attention_scale(self, layer: int) -> float:
        """The factor layer ``layer`` multiplies query-key dot products by."""
        return float(self.attention(layer).scaling)

    def run_prefix(self, tokens: Int[Tensor, " pos"]) -> Prefix:
        """Run a prompt prefix once, to continue it many times (``continuing``, ``lens.generate(prefix=)``)."""
        return Prefix(self.prefix_cache(tokens))

    @contextmanager
    def continuing(self, prefix: Prefix | None) -> Iterator[Continuation]:
        """``run(tokens)`` inside the block gives the final hidden states of ``tokens`` ``[batch, pos]`` read
        after ``prefix`` (None: from the start), under any active capture session. The prefix's cache is
        repeated over a batch once per batch size and cropped back after each run, so successive
        batches reuse it; the repeated copy is dropped when the block ends."""
        yield Continuation(self, prefix)

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


@dataclass
class Prefix:
    """A prompt prefix run once (``Model.run_prefix``): its KV cache, with every key kept so it can be
    continued inside a capture session and cropped back to the prefix."""

    cache: object

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values))

    def copy(self, rows: int = 1):
        """A cache of its own holding the prefix, repeated over ``rows`` batch rows: extending it leaves
        this prefix as it is, so one prefix serves many continuations."""
        cache = copy.deepcopy(self.cache)
        if rows > 1:
            cache.batch_repeat_interleave(rows)
        return cache


@dataclass
class Continuation:
    """Runs token batches after a prefix (``Model.continuing``)."""

    model: Model
    prefix: Prefix | None
    _batched: tuple[int, object] | None = None  # (batch size, the prefix cache repeated over it)

    def __call__(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        decoder = self.model.hf.get_decoder()
        tokens = tokens.to(self.model.device)
        if self.prefix is None:
            return decoder(input_ids=tokens, use_cache=False).last_hidden_state
        if self._batched is None or self._batched[0] != tokens.shape[0]:
            cache = self.prefix.copy(tokens.shape[0])
            self._batched = (tokens.shape[0], cache)
        cache = self._batched[1]
        try:
            return decoder(input_ids=tokens, past_key_values=cache, use_cache=True).last_hidden_state
        finally:
            cache.crop(-tokens.shape[1])  # back to the prefix for the next batch


def _resolve(name: str) -> tuple[Path | str, str, str]:
    """(folder or hub id, display name, bridge name) for a catalog name, a local folder or a hub id."""
    if not isinstance(name, (str, os.PathLike)):
        raise UnknownModelError(f"lens.load takes a model name, a folder or a TransformerBridge, not a {type(name).__name__}")
    name = str(name)
    if name in CATALOG:
        return ensure_cached(name), name, CATALOG[name].bridge_name
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return path, path.name, path.name
    if "/" in name and not path.exists():
        return name, name, name  # a hub id: needs hub access, which this machine does not have
    raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(known_models())} (or a local HF folder)")


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _logit_scale(config) -> float:
    # Not in TransformerLens's config: its Cohere adapter folds logit_scale into the unembedding
    # weights, and Granite's logits_scaling has no TransformerLens field.
    return float(getattr(config, "logit_scale", None) or 1.0) / float(getattr(config, "logits_scaling", None) or 1.0)


def _model(hf, tokenizer, display_name: str, folder: Path | None, bridge_name: str) -> Model:
    """A ``Model`` around a loaded transformers causal LM, its architecture read through TransformerLens."""
    config = hf.config.get_text_config()
    architecture = type(hf).__name__
    adapter, tl_config = adapter_for(hf.config, architecture)
    layers = adapter.layers(hf)
    if not all(_has(layer, adapter.attention_name) for layer in layers):
        raise UnsupportedArchitectureError(f"cannot capture {architecture}: some layers have no {adapter.attention_name!r} attention")
    fingerprint = (cached_fingerprint(folder) if folder else None) or weights_fingerprint(hf.state_dict())
    n_layers = len(layers)
    layer_types = tuple(getattr(config, "layer_types", None) or ["full_attention"] * n_layers)
    soft_cap = lambda value: None if value is None or value <= 0 else float(value)  # TransformerLens: -1 means none
    info = ModelInfo(
        name=display_name,
        architecture=architecture,
        n_layers=n_layers,
        n_heads=tl_config.n_heads,
        n_kv_heads=getattr(tl_config, "n_key_value_heads", None) or tl_config.n_heads,
        d_head=tl_config.d_head,
        d_model=tl_config.d_model,
        n_ctx=tl_config.n_ctx,
        fingerprint=fingerprint,
        bos_token=tokenizer.bos_token,
        layer_types=layer_types,
        sliding_window=_sliding_window(config),
        attn_softcap=soft_cap(getattr(tl_config, "attn_scores_soft_cap", None)),
        logit_softcap=soft_cap(getattr(tl_config, "output_logits_soft_cap", None)),
        logit_scale=_logit_scale(config),
        dtype=str(next(hf.parameters()).dtype).removeprefix("torch."),
    )
    return Model(info, hf, tokenizer, adapter, folder, bridge_name)


def _sliding_window(config) -> int | None:
    """The window of the sliding-window layers: the config's, unless its layer types name none
    (Qwen2 keeps a window in its config that no layer uses)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return getattr(config, "sliding_window", None)


def _has(module: torch.nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def _is_bridge(source) -> bool:
    return type(source).__name__ == "TransformerBridge" and hasattr(source, "original_model")


def _from_bridge(bridge, device, dtype) -> Model:
    """A ``Model`` over the weights of a user's ``TransformerBridge``. The bridge replaced its HF model's
    modules with its own wrappers, so the workbench builds a plain HF model of the same config whose
    parameters are the bridge's tensors (no copy unless ``device`` or ``dtype`` differ)."""
    from transformers import AutoModelForCausalLM

    if getattr(bridge, "_weights_processed", False):
        raise ValueError("this TransformerBridge's weights are processed (compatibility mode folds norms and centres weights): "
                         "hand lens.load a bridge without enable_compatibility_mode()")
    wrapped = bridge.original_model
    state = {key.replace("_original_component.", ""): value for key, value in wrapped.state_dict().items()}
    hf = AutoModelForCausalLM.from_config(wrapped.config, attn_implementation=ATTENTION_IMPLEMENTATION, dtype=next(iter(state.values())).dtype)
    hf.load_state_dict(state, assign=True, strict=False)
    missing = set(hf.state_dict()) - set(state)
    if missing - {key for key in missing if key.endswith("lm_head.weight")}:
        raise ValueError(f"the bridge's model lacks weights the workbench needs: {sorted(missing)[:3]}")
    hf.tie_weights()
    hf.to(device=device or next(iter(state.values())).device, dtype=_torch_dtype(dtype) if dtype else None).eval()
    name = getattr(bridge.cfg, "model_name", None) or type(wrapped).__name__
    model = _model(hf, bridge.tokenizer, name, None, name)
    model.__dict__["bridge"] = bridge  # ``model.bridge`` is the user's own
    return model


def load(name="smollm2-135m", *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> Model:
    """Load a model by catalog name (``lens.known_models()``), local Hugging Face folder or hub id, or
    wrap a TransformerLens ``TransformerBridge`` (its weights, its tokenizer; ``model.bridge`` is it).
    ``dtype``: float32 (default), bfloat16 or float16; ``device``: default cpu (a bridge's own)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    register_attention()
    if _is_bridge(name):
        return _from_bridge(name, device, dtype)
    torch_dtype = _torch_dtype(dtype or "float32")
    source, display_name, bridge_name = _resolve(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, attn_implementation=ATTENTION_IMPLEMENTATION)
    except OSError as error:
        raise UnknownModelError(f"cannot load model {name!r}: {str(error).splitlines()[0]}") from None
    except ValueError as error:  # transformers knows no such architecture
        raise UnsupportedArchitectureError(f"cannot load model {name!r}: {str(error).splitlines()[0]}") from None
    hf.to(device or "cpu").eval()
    folder = source if isinstance(source, Path) else None
    return _model(hf, tokenizer, display_name, folder, bridge_name)
