"""The workbench's attention function, registered with transformers' attention interface.

Every supported architecture calls it with the rotated queries and keys (after any q/k norm), the
values, the mask and the scale. With no capture session active it is exactly SDPA. Inside a session
it hands attention rows to detectors block by block and applies interventions:

- rows for a few query positions: SDPA computes the output; only those rows' probabilities are
  computed, against the keys they can see (cost grows with the context, not its square);
- rows for every position, an edit of the probabilities, or a soft-capped model: the layer's attention
  is computed blockwise from the probabilities themselves (the output is ``probs @ V``), so each block
  of rows is computed once and shared by every consumer. Peak memory is one block, never T x T.

Positions: a query's absolute position is what the model passes (``position_ids``), never inferred
from the number of keys. Key ``s`` must be the key of position ``s``: the keys must run from position 0
to the last query. A cache that drops keys breaks that (transformers' ``DynamicCache(config=...)``
keeps only the last window on sliding-window layers), and is refused with ``CachePositionError``;
``Model.new_cache()`` and ``Model.prefix_cache(tokens)`` keep every key, and the model's mask applies
the window by position.
"""

from __future__ import annotations

import functools

import torch
from einops import rearrange, repeat
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lens._capture.positions import check_keys
from lens._capture.session import ACTIVE_SESSION, CaptureSession

ATTENTION_IMPLEMENTATION = "lens"
# Query rows per block on the CPU when the element budget allows more: blocks of a few MiB stay in
# cache through the softmax and the consumers, which is faster than fewer, larger blocks
# (benchmarks/attention_blocks.py). On a GPU, larger blocks mean fewer kernel launches: only the
# element budget applies there.
ROWS_PER_BLOCK = 64


def register_attention() -> None:
    """Make ``attn_implementation="lens"`` available to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, lens_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_IMPLEMENTATION, sdpa_mask)


def lens_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    session = ACTIVE_SESSION.get()
    if session is None and kwargs.get("softcap") is None:
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return session_attention(session, module, query, key, value, attention_mask, scaling, kwargs.get("softcap"), kwargs.get("position_ids"))


def sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' SDPA attention, except float32 grouped-query attention on CUDA: there the flash
    kernel refuses float32 and grouped-query SDPA falls back to the math kernel, which keeps every
    head's [query, key] weights for the backward pass (72 GB at 8192 tokens on SmolLM2). With the KV
    heads repeated and no GQA flag, the memory-efficient kernel runs instead."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n_groups = query.shape[1] // key.shape[1]
    if not (query.is_cuda and query.dtype == torch.float32 and n_groups > 1):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    key, value = (repeat(tensor, "b kv s d -> b (kv g) s d", g=n_groups) for tensor in (key, value))
    mask = None if attention_mask is None else attention_mask[:, :, :, : key.shape[-2]]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout if module.training else 0.0, scale=scaling,
        is_causal=query.shape[2] > 1 and mask is None,
    )
    return out.transpose(1, 2).contiguous(), None


def visible_keys(
    positions: Int[Tensor, " row"],
    n_keys: int,
    attention_mask: Tensor | None,
    mask_rows: Int[Tensor, " row"],
) -> Bool[Tensor, "batch_or_1 1 row key"]:
    """Which keys each query row may attend to: causal, intersected with the model's own mask."""
    causal = torch.arange(n_keys, device=positions.device)[None, :] <= positions[:, None]
    allowed = causal[None, None]
    if attention_mask is not None:
        rows_mask = attention_mask[:, :, mask_rows, :n_keys]
        allowed = allowed & (rows_mask if rows_mask.dtype == torch.bool else rows_mask > torch.finfo(rows_mask.dtype).min / 2)
    return allowed


def attention_scores(
    query_rows: Float[Tensor, "batch head row d_head"],
    key: Float[Tensor, "batch kv_head key d_head"],
    scaling: float,
    softcap: float | None = None,
) -> Float[Tensor, "batch head row key"]:
    """Scaled query-key scores in float32, grouped-query aware without repeating keys."""
    n_rows, n_kv = query_rows.shape[2], key.shape[1]
    # Query head h reads KV head h // group: the group's rows share one matmul with their KV head.
    # Scaling the few query rows rather than the many scores saves a pass over the block.
    grouped = rearrange(query_rows.float() * scaling, "b (kv g) r d -> b kv (g r) d", kv=n_kv)
    scores = rearrange(torch.matmul(grouped, key.float().transpose(-1, -2)), "b kv (g r) s -> b (kv g) r s", r=n_rows)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    return scores


def _softmax(scores: Float[Tensor, "batch head row key"]) -> Float[Tensor, "batch head row key"]:
    """Softmax over keys, in place unless gradients flow (``out=`` does not record them): a second
    block-sized buffer is a fresh allocation per block, which made the softmax and the column sum of a
    64-row block 1.6x slower at 512 tokens and 1.25x at 8192 on the CPU."""
    return torch.softmax(scores, dim=-1) if scores.requires_grad else torch.softmax(scores, dim=-1, out=scores)


def attention_probs(
    query_rows: Float[Tensor, "batch head row d_head"],
    key: Float[Tensor, "batch kv_head key d_head"],
    allowed: Bool[Tensor, "batch_or_1 1 row key"],
    scaling: float,
    softcap: float | None = None,
) -> Float[Tensor, "batch head row key"]:
    """Softmax attention of some query rows under a key mask, in float32."""
    scores = attention_scores(query_rows, key, scaling, softcap)
    return _softmax(scores.masked_fill_(~allowed, float("-inf")))


def causal_block_probs(
    query_rows: Float[Tensor, "batch head row d_head"],
    key: Float[Tensor, "batch kv_head key d_head"],
    first_position: int,
    scaling: float,
    softcap: float | None = None,
) -> Float[Tensor, "batch head row key"]:
    """``attention_probs`` for consecutive rows from ``first_position`` under a purely causal mask,
    with keys up to the block's last row. Only the block's diagonal square holds masked keys, so
    only it is masked: the rest of the block is visible to every row."""
    n_rows = query_rows.shape[2]
    scores = attention_scores(query_rows, key, scaling, softcap)
    scores[..., first_position : first_position + n_rows].masked_fill_(_above_diagonal(n_rows, scores.device), float("-inf"))
    return _softmax(scores)


@functools.lru_cache(maxsize=64)
def _above_diagonal(n_rows: int, device: torch.device) -> Bool[Tensor, "row row"]:
    """The keys of a block's diagonal square that its rows must not see; one per block height and
    device, since every block of a pass (and every pass) asks for the same few."""
    return torch.ones(n_rows, n_rows, dtype=torch.bool, device=device).triu_(1)


def _row_blocks(rows: list[int], rows_per_block: int):
    for start in range(0, len(rows), rows_per_block):
        yield rows[start : start + rows_per_block]


def session_attention(session: CaptureSession | None, module, query, key, value, attention_mask, scaling, softcap, position_ids=None):
    session = session or CaptureSession()  # a soft-capped model outside any session
    layer = module.layer_idx
    batch, n_heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    offset = session.first_query_position(position_ids, q_len)  # non-zero with a KV cache
    check_keys(layer, offset, q_len, kv_len)
    positions = torch.arange(offset, offset + q_len, device=query.device)
    edits = session.interventions_at(layer)
    for edit in edits:
        query = edit.edit_query(query, positions)
        key = edit.edit_key(key, torch.arange(kv_len, device=key.device))

    consumers = session.attention_consumers(layer)
    prob_edits = [edit for edit in edits if edit.edits_probs]
    every_row = any(c.positions is None for c in consumers)
    blockwise = every_row or bool(prob_edits) or softcap is not None
    rows_per_block = max(1, session.block_elements // max(1, batch * n_heads * kv_len))
    if not query.is_cuda:
        rows_per_block = min(rows_per_block, ROWS_PER_BLOCK)

    if blockwise:
        rows = list(range(q_len))
        out = query.new_empty(batch, n_heads, q_len, value.shape[-1])
    else:
        wanted = sorted({p for c in consumers for p in c.positions})
        rows = [p - offset if p >= 0 else q_len + p for p in wanted]
        rows = [row for row in rows if 0 <= row < q_len]
        out = None

    n_kv = key.shape[1]
    for block_rows in _row_blocks(rows, rows_per_block):
        # Rows and positions stay Python ints, so no block waits on the device.
        block = torch.tensor(block_rows, device=query.device)
        block_positions = block + offset
        n_keys = offset + block_rows[-1] + 1  # causal: no row of this block sees a key past its last position
        if blockwise and attention_mask is None:  # consecutive rows, purely causal
            probs = causal_block_probs(query[:, :, block_rows[0] : block_rows[-1] + 1], key[:, :, :n_keys], offset + block_rows[0], scaling, softcap)
        else:
            allowed = visible_keys(block_positions, n_keys, attention_mask, block)
            probs = attention_probs(query[:, :, block], key[:, :, :n_keys], allowed, scaling, softcap)
        for edit in prob_edits:
            probs = edit.edit_probs(probs, block_positions)
        for consumer in consumers:
            consumer.offer(layer, [offset + row for row in block_rows], probs)
        if out is not None:
            grouped = rearrange(probs, "b (kv g) r s -> b kv (g r) s", kv=n_kv).to(value.dtype)
            block_out = torch.matmul(grouped, value[:, :, :n_keys])
            out[:, :, block_rows[0] : block_rows[-1] + 1] = rearrange(block_out, "b kv (g r) d -> b (kv g) r d", r=len(block_rows))

    if out is None:
        attn_output, _ = sdpa(module, query, key, value, attention_mask, scaling=scaling)
    else:
        attn_output = out.transpose(1, 2).contiguous()
    for edit in edits:
        attn_output = edit.edit_z(attn_output, positions)
    return attn_output, None
