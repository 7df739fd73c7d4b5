"""Many independent forward passes, several to a batched forward: ``run_passes(model, passes)``.

A pass is any object with ``tokens`` (1-D token ids), ``needs``, ``interventions`` and ``done`` (the
detectors' ``ForwardPass``, duck-typed: capture sits below the detectors). Passes with the same
tokens and no interventions share one batch row. Rows are grouped by length and right-padded: with
causal attention a real query never sees a later position, so padding placed after an item's tokens
changes none of its rows, and no mask is needed. Every need and intervention of an item sees what a
forward pass of that item alone gives: batch size 1, its own rows, keys and positions, negative
positions counted from its own last token; padding reaches no consumer. ``docs/capture.md`` describes
it in full.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from jaxtyping import Int
from torch import Tensor

from lens._capture.interventions import Intervention
from lens._capture.needs import Need
from lens._capture.session import DEFAULT_BLOCK_ELEMENTS, BatchItem, deliver_logits, session

# Activation bytes a batched forward may hold (default): about 8,000 tokens of SmolLM2 in float32.
DEFAULT_MEMORY_BUDGET = 2**28
# An item joins a batch only if it is at least this fraction of the batch's longest item, so padding
# never costs more than the real tokens it rides with.
MIN_FILL = 0.5


class Pass(Protocol):
    tokens: Int[Tensor, " pos"]
    needs: Sequence[Need]
    interventions: Sequence[Intervention]
    done: Callable[[], None]


@dataclass
class _Row:
    """One batch row: the passes that read it (several only when they share tokens and edit nothing)."""

    tokens: Int[Tensor, " pos"]
    passes: list[int] = field(default_factory=list)
    needs: list[Need] = field(default_factory=list)
    interventions: list[Intervention] = field(default_factory=list)


def activation_bytes_per_token(model) -> int:
    """Rough bytes one token of a batch holds at once inside a decoder layer: the residual stream and
    its normed copies, queries, keys, values and attention output, and the MLP's hidden layer."""
    info, config = model.info, model.hf.config.get_text_config()
    width = 6 * info.d_model + 3 * (getattr(config, 'intermediate_size', None) or getattr(config, 'n_inner', None) or 4 * info.d_model) + 2 * (info.n_heads + 2 * info.n_kv_heads) * info.d_head
    return width * model.hf.dtype.itemsize


def plan_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices of ``lengths`` in batches: longest first, each batch of rows at least ``MIN_FILL`` of
    its longest one, with at most ``max_tokens`` tokens padding included (a longer item runs alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        if batches:
            batch = batches[-1]
            longest = lengths[batch[0]]
            if lengths[index] >= MIN_FILL * longest and (len(batch) + 1) * longest <= max_tokens:
                batch.append(index)
                continue
        batches.append([index])
    return batches


def run_passes(model, passes: Sequence[Pass], memory_budget: int | None = None, *, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> int:
    """Run independent ``passes`` in batched forward passes, feed every need as a batch-of-one capture
    of its pass would, then call each pass's ``done()`` in the order given. The passes must not depend
    on one another (a pass built from another's ``done`` goes in a later call). ``memory_budget``:
    activation bytes one batched forward may hold (default ``DEFAULT_MEMORY_BUDGET``); the attention
    blocks are bounded by ``block_elements`` as in ``capture``. Returns the number of forward passes run."""
    rows: list[_Row] = []
    shared: dict[bytes, _Row] = {}
    for index, forward in enumerate(passes):
        tokens = forward.tokens.reshape(-1)
        model.check_length(len(tokens))
        key = tokens.cpu().numpy().tobytes()
        row = shared.get(key) if not forward.interventions else None
        if row is None:
            row = _Row(tokens)
            rows.append(row)
            if not forward.interventions:
                shared[key] = row
        row.passes.append(index)
        row.needs += forward.needs
        row.interventions += forward.interventions

    max_tokens = (memory_budget or DEFAULT_MEMORY_BUDGET) // activation_bytes_per_token(model)
    ran = [False] * len(passes)
    next_done = 0
    batches = plan_batches([len(row.tokens) for row in rows], max_tokens)
    for batch in batches:
        _forward(model, [rows[i] for i in batch], block_elements)
        for i in batch:
            for index in rows[i].passes:
                ran[index] = True
        while next_done < len(passes) and ran[next_done]:  # in the order given, each as soon as it can
            passes[next_done].done()
            next_done += 1
    return len(batches)


def _forward(model, rows: list[_Row], block_elements: int) -> None:
    longest = max(len(row.tokens) for row in rows)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    tokens = torch.full((len(rows), longest), pad, dtype=torch.long)
    items = []
    edits: list[Intervention] = []
    for index, row in enumerate(rows):
        tokens[index, : len(row.tokens)] = row.tokens
        item = BatchItem(index, len(row.tokens), row.needs)
        items.append(item)
        # A lone row has no padding and no neighbours: its edits run as they are.
        edits += [edit if len(rows) == 1 else ItemEdit(edit, item) for edit in row.interventions]
    with session(model, (), edits, seq_len=longest, block_elements=block_elements, items=items), torch.no_grad():
        decoder = getattr(model.hf, model.hf.base_model_prefix)
        final = decoder(input_ids=tokens.to(model.device), use_cache=False).last_hidden_state
        for item in items:
            deliver_logits(model, final[item.row : item.row + 1, : item.length], item.needs)


class ItemEdit(Intervention):
    """``edit`` applied to one item of a batched forward only: it sees that item's batch row, its real
    positions and keys, as in a forward pass of the item alone; every other row passes unchanged."""

    def __init__(self, edit: Intervention, item: BatchItem):
        self.edit, self.item = edit, item
        self.layer, self.edits_probs = edit.layer, edit.edits_probs

    def _edited(self, tensor: Tensor, positions: Int[Tensor, " n"], edit: Callable, position_dim: int, trim_keys: bool = False) -> Tensor:
        """``edit`` of the item's row and real positions (dimension ``position_dim``) of ``tensor``."""
        n = int((positions < self.item.length).sum())  # positions ascend: the real ones come first
        if not n:
            return tensor
        part = [slice(self.item.row, self.item.row + 1)] + [slice(None)] * (position_dim - 1) + [slice(n)]
        if trim_keys:  # as in the item's own block: keys up to its last row (later ones are zero, causal)
            part.append(slice(int(positions[n - 1]) + 1))
        view = tensor[tuple(part)]
        edited = edit(view, positions[:n])
        if edited is not view:  # else the edit only read it (a tap, or a method left as the identity)
            # Written in place: run_passes runs without gradients or a cache, so the queries, keys,
            # probabilities and z of a batched forward belong to this layer call alone, and a copy per
            # edit per item would cost batch x batch blocks.
            tensor[tuple(part)] = edited
        return tensor

    def edit_query(self, query, positions):
        return self._edited(query, positions, self.edit.edit_query, 2)

    def edit_key(self, key, positions):
        return self._edited(key, positions, self.edit.edit_key, 2)

    def edit_probs(self, probs, positions):
        return self._edited(probs, positions, self.edit.edit_probs, 2, trim_keys=True)

    def edit_z(self, z, positions):
        return self._edited(z, positions, self.edit.edit_z, 1)
