"""Model loading: catalog names, local folders, metadata, fingerprints, the bridge."""

from __future__ import annotations

import pytest
import torch

import lens
from lens._models.fingerprint import weights_fingerprint


def test_embedded_model_metadata(smollm2):
    info = smollm2.info
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.d_head, info.d_model) == (30, 9, 3, 64, 576)
    assert info.n_ctx == 8192 and info.architecture == "LlamaForCausalLM" and info.bos_token == "<|im_start|>"
    assert info.fingerprint == weights_fingerprint(smollm2.hf.state_dict())


def test_local_folder_loads_the_same_weights(smollm2):
    again = lens.load(str(smollm2.folder))
    assert again.info.fingerprint == smollm2.info.fingerprint and again.info.n_layers == 30


def test_unknown_model_lists_known_ones():
    with pytest.raises(lens.UnknownModelError, match="known models: smollm2-135m, gemma3-270m, tiny-llama"):
        lens.load("gpt-17")


def test_tokenize_exactly_as_given(smollm2):
    chat = "<|im_start|>user\nhi<|im_end|>\n"
    ids = smollm2.tokenize(chat).tolist()
    assert ids[0] == smollm2.tokenizer.bos_token_id and ids.count(smollm2.tokenizer.bos_token_id) == 1
    # Chat text starts with SmolLM2's BOS (<|im_start|>): no policy doubles it.
    assert smollm2.tokenize(chat, bos="always").tolist() == ids == smollm2.tokenize(chat, bos="auto").tolist()
    # The bridge prepends BOS by default: on chat text it doubles it.
    bridge_ids = smollm2.bridge.to_tokens(chat)[0].tolist()
    assert bridge_ids[:2] == [smollm2.tokenizer.bos_token_id] * 2


@pytest.mark.parametrize("name, adds_bos", [("smollm2-135m", False), ("gemma3-270m", True)])
def test_bos_policy_follows_each_tokenizer(name, adds_bos):
    model = lens.load(name)
    text = "Rivers and bridges."
    bos_id = model.tokenizer.bos_token_id
    plain = model.tokenize(text).tolist()
    assert plain == model.tokenize(text, bos="never").tolist() == model.tokenizer(text, add_special_tokens=False)["input_ids"]
    # auto does what the tokenizer does with its special tokens: Gemma 3 adds <bos>, SmolLM2 nothing.
    assert model.tokenize(text, bos="auto").tolist() == model.tokenizer(text)["input_ids"] == ([bos_id] if adds_bos else []) + plain
    assert model.tokenize(text, bos="always").tolist() == [bos_id, *plain]
    # A text that already starts with the BOS string gets no second one under any policy.
    marked = model.tokenizer.bos_token + text
    for policy in ("auto", "always", "never"):
        ids = model.tokenize(marked, bos=policy).tolist()
        assert ids[0] == bos_id and ids.count(bos_id) == 1 and ids[1:] == plain
    with pytest.raises(ValueError, match="bos must be one of auto, always, never"):
        model.tokenize(text, bos="sometimes")


def test_bridge_logits_equal_transformers(smollm2, eager_reference):
    tokens = smollm2.tokenize("Bridges and rivers, hills and valleys.")
    with torch.no_grad():
        ours = smollm2.bridge(tokens[None])
        reference = eager_reference(smollm2)(tokens[None]).logits
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)


def test_tiny_llama_has_grouped_query_attention(tiny_llama):
    assert (tiny_llama.info.n_heads, tiny_llama.info.n_kv_heads, tiny_llama.info.n_layers) == (4, 2, 2)


@pytest.mark.parametrize("dtype", ["bfloat16", torch.float16])
def test_load_in_half_precision(tiny_llama, dtype):
    model = lens.load("tiny-llama", dtype=dtype)
    name = str(dtype).removeprefix("torch.")
    assert model.info.dtype == name and next(model.hf.parameters()).dtype == getattr(torch, name)
    assert model.info.fingerprint == tiny_llama.info.fingerprint  # the model's identity, not its precision
    tokens = model.tokenize("Bridges and rivers, hills and valleys.")
    rows = []
    lens.capture(model, tokens, [lens.AttentionRows(lambda block: rows.append(block.probs), positions=[-1])])
    # Capture computes probabilities in float32 whatever the weights' precision.
    assert len(rows) == 2 and rows[0].dtype == torch.float32
    torch.testing.assert_close(rows[0].sum(-1), torch.ones_like(rows[0].sum(-1)))


def test_unknown_dtype_is_one_clear_error():
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16, got 'int8'"):
        lens.load("tiny-llama", dtype="int8")


def test_a_users_bridge_is_captured_by_transformer_lens_hook_names(smollm2):
    """lens.load(bridge) wraps a TransformerBridge's own weights; hooks named as in TransformerLens read
    what run_with_cache reads, and a replacing hook_z edits like run_with_hooks."""
    bridge = smollm2.bridge
    model = lens.load(bridge)
    assert model.bridge is bridge and model.info.fingerprint == smollm2.info.fingerprint
    assert next(model.hf.parameters()).data_ptr() in {p.data_ptr() for p in bridge.parameters()}  # shared, not copied
    tokens = smollm2.tokenize("Bridges and rivers, hills and valleys, roads and towns.")
    n = len(tokens)
    got: dict[str, torch.Tensor] = {}

    def pattern(block: lens.AttentionBlock, hook) -> None:
        full = got.setdefault(hook.name, torch.zeros(block.probs.shape[1], n, n))
        full[:, block.positions, : block.n_keys] = block.probs[0]

    def keep(value, hook) -> None:
        got[hook.name] = value[0].detach().clone()

    names = ["blocks.18.attn.hook_pattern", "blocks.3.attn.hook_z", "blocks.3.attn.hook_rot_q", "blocks.5.hook_resid_post", "blocks.5.hook_mlp_out"]
    logits = []
    lens.capture(model, tokens, [lens.Logits(logits.append)], hooks={name: pattern if name.endswith("pattern") else keep for name in names})
    with torch.no_grad():
        reference_logits, cache = bridge.run_with_cache(tokens[None], names_filter=names)
    for name in names:
        torch.testing.assert_close(got[name], cache[name][0], atol=1e-5, rtol=1e-4)

    def zero_head_0(z, hook):
        z = z.clone()
        z[:, :, 0] = 0.0
        return z

    lens.capture(model, tokens, [lens.Logits(logits.append)], hooks={"blocks.3.attn.hook_z": zero_head_0})
    with torch.no_grad():
        patched = bridge.run_with_hooks(tokens[None], fwd_hooks=[("blocks.3.attn.hook_z", zero_head_0)])
    torch.testing.assert_close(logits[0][0, -1], reference_logits[0, -1], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[1][0, -1], patched[0, -1], atol=1e-4, rtol=0)
    assert (logits[1][0, -1] - logits[0][0, -1]).abs().max() > 1e-3  # the edit changed something


def test_unknown_hook_names_are_refused(tiny_llama):
    tokens = tiny_llama.tokenize("hello")
    with pytest.raises(ValueError, match="unknown hook name 'blocks.0.attn.hook_attn_scores'; capture knows blocks.<layer>"):
        lens.capture(tiny_llama, tokens, hooks={"blocks.0.attn.hook_attn_scores": print})
    with pytest.raises(ValueError, match="blocks.7.attn.hook_z: the model has 2 layers"):
        lens.capture(tiny_llama, tokens, hooks={"blocks.7.attn.hook_z": print})
    with pytest.raises(ValueError, match="blocks.0.hook_resid_post: capture only reads this activation"):
        lens.capture(tiny_llama, tokens, hooks={"blocks.0.hook_resid_post": lambda x, hook: x})


def test_a_census_runs_on_a_users_bridge(tiny_llama):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama.folder, dtype=torch.float32)
    bridge = TransformerBridge.boot_transformers("tiny-llama", hf_model=hf, tokenizer=tiny_llama.tokenizer)
    model = lens.load(bridge)
    assert (model.name, model.info.n_kv_heads, model.info.fingerprint) == ("tiny-llama", 2, tiny_llama.info.fingerprint)
    frames = {report.type: report.frame for report in lens.census(model, ["sinks"], limit=1).reports["sinks"]}
    assert len(frames["sinks"]) == 2 * 4
    bridge.enable_compatibility_mode()  # folds norms into the weights: no longer the HF model's computation
    with pytest.raises(ValueError, match="weights are processed"):
        lens.load(bridge)
