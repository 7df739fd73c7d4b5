"""Model reach: every architecture in TINY_MODEL_TYPES, as a tiny random-weight model built from its
config, is read through TransformerLens's adapter, captured exactly, and runs a census."""

from __future__ import annotations

import pytest
import torch

import lens
from lens._models.architectures import UnsupportedArchitectureError, supported_architectures, why_not_capturable
from lens._models.tiny import TINY_MODEL_TYPES, TINY_WINDOW, build_tiny

TEXT = "The quick brown fox jumps over the lazy dog, then naps under a tree."


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from lens._models.catalog import ensure_cached

    return AutoTokenizer.from_pretrained(ensure_cached("smollm2-135m"))


@pytest.fixture(scope="module", params=TINY_MODEL_TYPES)
def tiny(request, tokenizer, tmp_path_factory):
    """(workbench model, the same weights with transformers' eager attention) of one architecture."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp(request.param)
    build_tiny(request.param, folder, tokenizer, max_position_embeddings=2048)  # room for retrieval's probes
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    return lens.load(str(folder)), reference


def test_captured_attention_equals_eager_attention(tiny):
    model, reference = tiny
    tokens = model.tokenize(TEXT)
    n = len(tokens)
    assert n > 2 * TINY_WINDOW  # sliding-window layers see only part of the prompt
    rows = {}

    def consume(block: lens.AttentionBlock) -> None:
        full = rows.setdefault(block.layer, torch.zeros(model.info.n_heads, n, n))
        full[:, block.positions, : block.n_keys] = block.probs[0]

    logits = []
    lens.capture(model, tokens, [lens.AttentionRows(consume), lens.Logits(logits.append, positions=[0, -1])])
    with torch.no_grad():
        out = reference(tokens[None], output_attentions=True)
    assert sorted(rows) == list(range(model.info.n_layers)) == list(range(len(out.attentions)))
    for layer, attention in enumerate(out.attentions):
        torch.testing.assert_close(rows[layer], attention[0], atol=1e-6, rtol=0)
    # The unembedding, its logit scale (Cohere, Granite) and soft-capping (Gemma 2) are the model's own.
    torch.testing.assert_close(logits[0][0], out.logits[0, [0, -1]], atol=1e-5, rtol=1e-5)


def test_residual_writes_sum_to_each_layers_update(tiny):
    """The modules the adapter names as attention's and the MLP's writes are what each layer adds to the
    residual stream (post-norms included, parallel blocks too)."""
    model, _ = tiny
    tokens = model.tokenize(TEXT)
    writes, handles = {}, []
    for index, layer in enumerate(model.layers()):
        for part, module in (("attn", model.adapter.attention_write(layer)), ("mlp", model.adapter.mlp_write(layer))):
            hook = lambda _m, _i, output, key=(index, part): writes.__setitem__(key, output[0] if isinstance(output, tuple) else output)
            handles.append(module.register_forward_hook(hook))
    resid_pre = {}
    handles += [layer.register_forward_pre_hook(lambda _m, args, kwargs, i=i: resid_pre.__setitem__(i, (args or (kwargs.get("hidden_states"),))[0]), with_kwargs=True)
                for i, layer in enumerate(model.layers())]  # fmt: skip
    resid_post = {}
    try:
        lens.capture(model, tokens, [lens.Residual(lambda layer, x: resid_post.__setitem__(layer, x))])
    finally:
        for handle in handles:
            handle.remove()
    for layer in range(model.info.n_layers):
        update = resid_post[layer] - resid_pre[layer]
        torch.testing.assert_close(writes[layer, "attn"].reshape(update.shape) + writes[layer, "mlp"].reshape(update.shape), update, atol=1e-5, rtol=1e-4)


def test_info_is_read_through_transformer_lens(tiny):
    model, reference = tiny
    config = reference.config
    info = model.info
    assert info.architecture == type(reference).__name__ in supported_architectures()
    assert (info.n_layers, info.n_heads, info.d_head, info.d_model) == (2, 4, 16, 64)
    assert info.n_kv_heads == getattr(config, "num_key_value_heads", 4)
    assert info.logit_softcap == getattr(config, "final_logit_softcapping", None)
    assert info.attn_softcap == getattr(config, "attn_logit_softcapping", None)
    if "sliding_attention" in info.layer_types:
        assert info.sliding_window == TINY_WINDOW


def test_q_k_v_projections_are_named_or_fused(tiny):
    model, _ = tiny
    attention = model.adapter.attention(model.layers()[0])
    if model.adapter.projection_names is None:  # GPT-2, GPT-NeoX, Phi-3
        with pytest.raises(UnsupportedArchitectureError, match=f"{model.info.architecture} has no separate q, k and v projection modules .one fused projection"):
            model.adapter.projection(attention, "q")
    else:
        q, k = model.adapter.projection(attention, "q"), model.adapter.projection(attention, "k")
        assert q.out_features == model.info.n_heads * model.info.d_head and k.out_features == model.info.n_kv_heads * model.info.d_head


def test_a_census_of_every_detector_runs(tiny):
    model, _ = tiny
    # circuits patches each head's slice of the q/k/v projections: architectures that fuse them are refused
    # (test_q_k_v_projections_are_named_or_fused).
    detectors = [name for name in lens.detectors() if name != "circuits" or model.adapter.projection_names is not None]
    result = lens.census(model, detectors, limit=1)
    assert sorted(result.reports) == sorted(detectors)
    for name in detectors:
        assert "summary" in {report.type for report in result.reports[name]}, name
    frames = {report.type: report.frame for report in result.reports["sinks"]}
    assert len(frames["sinks"]) == model.info.n_layers * model.info.n_heads
    assert frames["sinks"]["layer"].nunique() == model.info.n_layers


@pytest.mark.parametrize(
    "architecture, reason",
    [
        ("BloomForCausalLM", "attention-function interface"),
        ("MambaForCausalLM", "attention-function interface"),
        ("RecurrentGemmaForCausalLM", "layers without softmax attention"),
        ("Lfm2ForCausalLM", "no softmax attention (a hybrid)"),
        ("BertLMHeadModel", "not a generative decoder"),
        ("T5ForConditionalGeneration", "not a decoder-only causal LM"),
        ("RwkvModel", "TransformerLens has no adapter"),
    ],
)
def test_why_an_architecture_cannot_be_captured(architecture, reason):
    assert reason in why_not_capturable(architecture)
    assert architecture not in supported_architectures()


def test_loading_an_uncapturable_architecture_names_it(tokenizer, tmp_path):
    from transformers import BloomConfig, BloomForCausalLM

    config = BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=1, n_head=2, architectures=["BloomForCausalLM"])
    BloomForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="cannot capture BloomForCausalLM: its attention does not go through"):
        lens.load(str(tmp_path))


@pytest.mark.parametrize("page, marker", [("docs/architectures.md", "architectures"), ("README.md", "architectures-summary")])
def test_architecture_lists_are_current(page, marker):
    from pathlib import Path

    from lens._models import architectures

    text = (Path(__file__).parents[2] / page).read_text()
    block = text.split(f"<!-- {marker}:begin -->\n", 1)[1].split(f"\n<!-- {marker}:end -->", 1)[0]
    generate = architectures.architectures_markdown if marker == "architectures" else architectures.architectures_summary
    assert block == generate(), f"regenerate it: lens architectures --write {page}"
    tested = block.count("| yes |") if marker == "architectures" else block.count("**") // 2
    assert tested == len(TINY_MODEL_TYPES) >= 6
