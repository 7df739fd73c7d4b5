"""One forward pass that serves many detectors: ``capture(model, tokens, needs, interventions)``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens._capture.interventions import Intervention
from lens._capture.needs import AttentionBlock, AttentionRows, LogitChunks, Logits, Need, Residual
from lens._capture.positions import first_query_position

# Elements of one block of attention scores (batch x heads x rows x keys); 2**23 floats = 32 MiB.
DEFAULT_BLOCK_ELEMENTS = 2**23


@dataclass
class _RowsConsumer:
    """Feeds one ``AttentionRows`` need the part of each block it asked for."""

    need: AttentionRows
    positions: set[int] | None  # resolved to absolute positions; None = all
    item: BatchItem | None = None  # the need's own batch row of a batched pass; None = the whole batch

    def offer(self, layer: int, positions: list[int], probs: Float[Tensor, "batch head row key"]) -> None:
        if self.item is not None:  # its row only, its real tokens only: a batch of one
            positions = [position for position in positions if position < self.item.length]
            if not positions:
                return
            # Rows come in ascending positions, so the padding rows are the block's last ones.
            probs = probs[self.item.row : self.item.row + 1, :, : len(positions), : positions[-1] + 1]
        if self.positions is not None:
            keep = [i for i, position in enumerate(positions) if position in self.positions]
            if not keep:
                return
            if len(keep) < len(positions):
                positions, probs = [positions[i] for i in keep], probs[:, :, keep]
        self.need.consume(AttentionBlock(layer, torch.tensor(positions, device=probs.device), probs))


@dataclass(frozen=True)
class BatchItem:
    """One pass of a batched forward (``lens/_capture/batch.py``): batch row ``row`` holds its
    ``length`` real tokens at positions ``0 .. length-1``, then padding that no real query sees
    (causal). Its ``needs`` see batch size 1 and its own rows and keys only; their negative positions
    count from its own end."""

    row: int
    length: int
    needs: Sequence[Need] = ()


@dataclass
class CaptureSession:
    """The needs and interventions active during one forward pass (``seq_len`` resolves negative positions)."""

    needs: Sequence[Need] = ()
    interventions: Sequence[Intervention] = ()
    seq_len: int = 0
    block_elements: int = DEFAULT_BLOCK_ELEMENTS
    items: Sequence[BatchItem] = ()
    _consumers: dict[int, list[_RowsConsumer]] = field(default_factory=dict)
    # The last forward pass's position_ids and its first query position: every layer of a pass gets
    # the same tensor, so it is read (one device sync) once per pass, not once per layer.
    _positions: tuple[Tensor, int] | None = None

    def first_query_position(self, position_ids: Tensor | None, q_len: int) -> int:
        if position_ids is None or self._positions is None or self._positions[0] is not position_ids:
            self._positions = (position_ids, first_query_position(position_ids, q_len))
        return self._positions[1]

    def attention_consumers(self, layer: int) -> list[_RowsConsumer]:
        if layer not in self._consumers:
            self._consumers[layer] = [
                _RowsConsumer(need, None if need.positions is None else _absolute(need.positions, length), item)
                for item, needs, length in [(None, self.needs, self.seq_len)] + [(item, item.needs, item.length) for item in self.items]
                for need in needs
                if isinstance(need, AttentionRows) and (need.layers is None or layer in need.layers)
            ]
        return self._consumers[layer]

    def interventions_at(self, layer: int) -> list[Intervention]:
        return [edit for edit in self.interventions if edit.layer == layer]


def _absolute(positions: Sequence[int], seq_len: int) -> set[int]:
    return {p + seq_len if p < 0 else p for p in positions}


@contextmanager
def _residual_hooks(model, needs: Sequence[Need], items: Sequence[BatchItem] = ()) -> Iterator[None]:
    # (need, the batch rows and positions it reads: all of them, or one item's real tokens)
    residual = [(need, (slice(None), slice(None))) for need in needs if isinstance(need, Residual)]
    residual += [(need, (slice(item.row, item.row + 1), slice(item.length))) for item in items for need in item.needs if isinstance(need, Residual)]
    handles = []
    for index, layer in enumerate(model.adapter.layers(model.hf)):
        for need, part in residual:
            module = layer if need.kind == "resid_post" else model.adapter.mlp_write(layer)

            def hook(_module, _inputs, output, index=index, need=need, part=part):
                need.consume(index, (output[0] if isinstance(output, tuple) else output)[part])

            handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# The session the attention function serves (lens/_capture/attention.py); None: plain SDPA.
ACTIVE_SESSION: ContextVar[CaptureSession | None] = ContextVar("lens_capture_session", default=None)


@contextmanager
def session(model, needs: Sequence[Need] = (), interventions: Sequence[Intervention] = (), *, seq_len: int = 0,
            block_elements: int = DEFAULT_BLOCK_ELEMENTS, items: Sequence[BatchItem] = ()) -> Iterator[CaptureSession]:
    """Activate needs and interventions for every forward pass of ``model.hf`` inside the block
    (``model.hf.generate`` included). ``items``: the passes of a batched forward, each with its own needs."""
    active = CaptureSession(needs, interventions, seq_len, block_elements, items)
    token = ACTIVE_SESSION.set(active)
    try:
        with _residual_hooks(model, needs, items):
            yield active
    finally:
        ACTIVE_SESSION.reset(token)


def capture(
    model,
    tokens: Int[Tensor, "batch pos"] | Int[Tensor, " pos"],
    needs: Sequence[Need] = (),
    interventions: Sequence[Intervention] = (),
    *,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    grad: bool = False,
    hooks: Mapping[str, Callable] | None = None,
) -> None:
    """Run one forward pass over ``tokens`` and feed every need. The decoder runs without its LM head;
    logits are computed only where ``Logits`` or ``LogitChunks`` needs ask. Nothing is returned.
    ``hooks``: TransformerLens-named hooks ``{"blocks.3.attn.hook_z": fn(z, hook)}`` (lens/_capture/hook_names.py)."""
    if hooks:
        from lens._capture.hook_names import hook_points

        hook_needs, hook_edits = hook_points(hooks, model.info.n_layers)
        needs, interventions = [*needs, *hook_needs], [*interventions, *hook_edits]
    if tokens.dim() == 1:
        tokens = tokens[None]
    seq_len = tokens.shape[1]
    model.check_length(seq_len)

    with session(model, needs, interventions, seq_len=seq_len, block_elements=block_elements), torch.set_grad_enabled(grad):
        decoder = getattr(model.hf, model.hf.base_model_prefix)
        final = decoder(input_ids=tokens.to(model.device), use_cache=False).last_hidden_state
        deliver_logits(model, final, needs)


def deliver_logits(model, final: Float[Tensor, "batch pos d_model"], needs: Sequence[Need]) -> None:
    """Feed the ``Logits`` and ``LogitChunks`` needs from the decoder's final hidden states (negative
    positions count from the end of ``final``)."""
    seq_len = final.shape[1]

    def absolute(position: int) -> int:
        return position + seq_len if position < 0 else position

    for need in needs:
        if isinstance(need, Logits):
            need.consume(lm_head(model, final[:, [absolute(p) for p in need.positions]]))
        elif isinstance(need, LogitChunks):
            positions = torch.arange(seq_len) if need.positions is None else torch.tensor([absolute(p) for p in need.positions])
            for start in range(0, len(positions), need.chunk):
                chunk = positions[start : start + need.chunk]
                need.consume(chunk, lm_head(model, final[:, chunk.to(final.device)]))


def lm_head(model, hidden: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos vocab"]:
    """The model's unembedding of final (normed) hidden states, with its logit scale and soft-capping if any."""
    return model.unembed(hidden)
