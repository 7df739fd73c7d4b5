"""Capture engine: reductions made inside the attention function equal full attention."""

from __future__ import annotations

import pytest
import torch

import lens
from lens._capture.positions import CachePositionError

TEXT = "The quick brown fox jumps over the lazy dog. Then it naps under a tree while the dog keeps watch."


def _collect(model, tokens, positions=None, block_elements=None):
    rows: dict[int, torch.Tensor] = {}
    n_heads = model.info.n_heads
    n = len(tokens)

    def consume(block: lens.AttentionBlock) -> None:
        full = rows.setdefault(block.layer, torch.full((n_heads, n, n), float("nan")))
        full[:, block.positions, :] = 0.0
        full[:, block.positions, : block.n_keys] = block.probs[0]

    kwargs = {"block_elements": block_elements} if block_elements else {}
    lens.capture(model, tokens, [lens.AttentionRows(consume, positions=positions)], **kwargs)
    return rows


def _eager_attentions(reference, tokens):
    with torch.no_grad():
        return reference(tokens[None], output_attentions=True).attentions


@pytest.mark.parametrize("block_elements", [None, 500])
def test_all_rows_equal_eager_attention_tiny(tiny_llama, eager_reference, block_elements):
    tokens = tiny_llama.tokenize(TEXT)
    rows = _collect(tiny_llama, tokens, block_elements=block_elements)
    expected = _eager_attentions(eager_reference(tiny_llama), tokens)
    assert set(rows) == {0, 1}
    for layer, attention in enumerate(expected):
        torch.testing.assert_close(rows[layer], attention[0], atol=1e-6, rtol=0)


def test_many_blocks_equal_eager_attention_real_model(smollm2, eager_reference):
    """A prompt several blocks long: each block masks only its diagonal square."""
    from lens._capture.attention import ROWS_PER_BLOCK

    tokens = smollm2.tokenize(" ".join([TEXT] * 8))
    assert len(tokens) > 2.5 * ROWS_PER_BLOCK
    rows = _collect(smollm2, tokens)
    expected = _eager_attentions(eager_reference(smollm2), tokens)
    for layer, attention in enumerate(expected):
        torch.testing.assert_close(rows[layer], attention[0], atol=1e-5, rtol=0)


def test_selected_rows_equal_eager_attention_real_model(smollm2, eager_reference):
    tokens = smollm2.tokenize(TEXT)
    rows = _collect(smollm2, tokens, positions=[0, 5, -1])
    expected = _eager_attentions(eager_reference(smollm2), tokens)
    n = len(tokens)
    assert len(rows) == smollm2.info.n_layers == 30
    for layer, attention in enumerate(expected):
        for position in (0, 5, n - 1):
            torch.testing.assert_close(rows[layer][:, position], attention[0][:, position], atol=1e-5, rtol=0)
        assert torch.isnan(rows[layer][:, 1]).all(), "rows that were not asked for must not be computed"


def test_all_rows_equal_bridge_full_cache_real_model(smollm2):
    """The TransformerLens full cache (hook_pattern) is the notebook ground truth."""
    tokens = smollm2.tokenize(TEXT)
    rows = _collect(smollm2, tokens)
    _, cache = smollm2.bridge.run_with_cache(tokens[None], names_filter=lambda name: name.endswith("hook_pattern"))
    for layer in range(smollm2.info.n_layers):
        torch.testing.assert_close(rows[layer], cache[f"blocks.{layer}.attn.hook_pattern"][0], atol=1e-5, rtol=0)


def test_capture_keeps_logits_and_residuals(smollm2, eager_reference):
    tokens = smollm2.tokenize(TEXT)
    logits, resid, mlp = [], {}, {}
    needs = [
        lens.AttentionRows(lambda block: None),
        lens.Logits(logits.append, positions=[3, -1]),
        lens.Residual(lambda layer, x: resid.__setitem__(layer, x.clone())),
        lens.Residual(lambda layer, x: mlp.__setitem__(layer, x.clone()), kind="mlp_out"),
    ]
    lens.capture(smollm2, tokens, needs)
    with torch.no_grad():
        out = eager_reference(smollm2)(tokens[None], output_hidden_states=True)
    torch.testing.assert_close(logits[0][0], out.logits[0, [3, len(tokens) - 1]], atol=2e-4, rtol=0)
    # hidden_states[l + 1] is the output of layer l, except the last, which HF returns after the final norm.
    for layer in range(smollm2.info.n_layers - 1):
        torch.testing.assert_close(resid[layer], out.hidden_states[layer + 1], atol=2e-4, rtol=1e-4)
    _, cache = smollm2.bridge.run_with_cache(tokens[None], names_filter=lambda name: name.endswith("hook_mlp_out"))
    assert set(mlp) == set(range(smollm2.info.n_layers))
    for layer in (0, 14, 29):
        torch.testing.assert_close(mlp[layer], cache[f"blocks.{layer}.hook_mlp_out"], atol=2e-4, rtol=1e-4)


def test_no_session_is_plain_sdpa(smollm2):
    tokens = smollm2.tokenize(TEXT)
    with torch.no_grad():
        ours = smollm2.hf(tokens[None]).logits
        smollm2.hf.config._attn_implementation = "sdpa"
        try:
            sdpa = smollm2.hf(tokens[None]).logits
        finally:
            smollm2.hf.config._attn_implementation = "lens"
    torch.testing.assert_close(ours, sdpa, atol=0, rtol=0)


def test_prompt_longer_than_context_is_refused(tiny_llama):
    tokens = torch.zeros(tiny_llama.info.n_ctx + 1, dtype=torch.long)
    with pytest.raises(lens.PromptTooLongError, match="longer than"):
        lens.capture(tiny_llama, tokens, [])


def test_a_decode_step_is_captured_and_patched_at_its_absolute_position(tiny_llama):
    """Continuing a prefix's KV cache by one token reads and edits the same attention row and head
    output as the full forward pass does at that position (ReplaceZ positions are absolute)."""
    tokens = tiny_llama.tokenize(TEXT)
    info, last = tiny_llama.info, len(tokens) - 1
    patch = torch.randn(1, 1, info.n_heads, info.d_head, generator=torch.Generator().manual_seed(0))
    edits = [lens.ZeroQuery(0, [1], positions=[last]), lens.ReplaceZ(1, [last], patch, torch.tensor([[True, False, True, False]]))]

    def run(rows, logits, step):
        needs = [lens.AttentionRows(lambda b: rows.__setitem__(b.layer, (b.positions.tolist(), b.probs[0, :, -1])), positions=[last])]
        if not step:
            lens.capture(tiny_llama, tokens, [*needs, lens.Logits(logits.append)], edits)
            return
        cache = tiny_llama.prefix_cache(tokens[:-1])
        with torch.no_grad(), lens.session(tiny_llama, needs, edits):
            logits.append(tiny_llama.hf(input_ids=tokens[None, -1:], past_key_values=cache, use_cache=True).logits)

    (full_rows, full_logits), (step_rows, step_logits) = ({}, []), ({}, [])
    run(full_rows, full_logits, step=False)
    run(step_rows, step_logits, step=True)
    for layer in range(info.n_layers):
        assert step_rows[layer][0] == full_rows[layer][0] == [last]
        torch.testing.assert_close(step_rows[layer][1], full_rows[layer][1], atol=1e-5, rtol=0)
    torch.testing.assert_close(step_logits[0][0, -1], full_logits[0][0, -1], atol=1e-4, rtol=0)
    with torch.no_grad():
        plain = tiny_llama.hf(tokens[None]).logits[0, -1]
    assert (plain - full_logits[0][0, -1]).abs().max() > 1e-2, "the edits change the logits"


def test_positions_that_disagree_with_the_keys_are_refused(tiny_llama):
    tokens = tiny_llama.tokenize(TEXT)[None]
    shifted = torch.arange(3, 3 + tokens.shape[1])[None]  # positions that do not start at key 0
    with torch.no_grad(), lens.session(tiny_llama, [lens.AttentionRows(lambda block: None)]):
        with pytest.raises(CachePositionError, match=r"received \d+ keys for queries at positions 3\.\."):
            tiny_llama.hf(input_ids=tokens, position_ids=shifted)
        with pytest.raises(CachePositionError, match="consecutive query positions"):
            tiny_llama.hf(input_ids=tokens, position_ids=shifted.flip(-1))


def test_logit_chunks_stream_every_position(smollm2, eager_reference):
    tokens = smollm2.tokenize(TEXT)
    seen: list[torch.Tensor] = []
    chunks: list[torch.Tensor] = []
    lens.capture(smollm2, tokens, [lens.LogitChunks(lambda p, x: (seen.append(p), chunks.append(x[0])), chunk=7)])
    assert torch.cat(seen).tolist() == list(range(len(tokens))) and max(len(p) for p in seen) == 7
    with torch.no_grad():
        reference = eager_reference(smollm2)(tokens[None]).logits[0]
    torch.testing.assert_close(torch.cat(chunks), reference, atol=2e-4, rtol=0)


def test_gemma3_sliding_window_layers_equal_eager_attention(eager_reference, monkeypatch):
    """Gemma 3 interleaves sliding-window (512) and global layers: the prompt is longer than the window."""
    # One block per layer, as eager computes it: MKL rounds a matmul differently for other block
    # shapes, and over five of Gemma's layers that float32 noise reaches 2e-5 in the first global layer.
    monkeypatch.setattr("lens._capture.attention.ROWS_PER_BLOCK", 4096)
    gemma = lens.load("gemma3-270m")
    tokens = gemma.tokenize(" ".join(f"item{i} is number {i}." for i in range(120)), bos="always")
    assert len(tokens) > 2 * gemma.hf.config.sliding_window
    layers = [gemma.info.layer_types.index("sliding_attention"), gemma.info.layer_types.index("full_attention")]
    rows = {}

    def consume(block: lens.AttentionBlock) -> None:
        if block.layer in layers:
            full = rows.setdefault(block.layer, torch.zeros(gemma.info.n_heads, len(tokens), len(tokens)))
            full[:, block.positions, : block.n_keys] = block.probs[0]

    # Every layer blockwise, as eager does: with SDPA upstream, later layers' inputs differ by ~1e-5.
    lens.capture(gemma, tokens, [lens.AttentionRows(consume)])
    assert sorted(rows) == sorted(layers)
    expected = _eager_attentions(eager_reference(gemma), tokens)
    for layer in layers:
        torch.testing.assert_close(rows[layer], expected[layer][0], atol=1e-5, rtol=0)
    assert rows[layers[0]][:, -1, :-600].abs().max() == 0, "a sliding-window layer must not see past its window"
