"""The model interface detectors use instead of ``model.hf``: embed, unembed (soft-capped, selected
rows), the attention modules and scale, and running a prefix once to continue it in batches. Tiny
random Llama and Gemma 2 (soft-capped logits and attention, sliding-window layers, scaled embeddings)."""

from __future__ import annotations

import pytest
import torch

import lens
from lens._models.tiny import TINY_WINDOW, build_tiny

TEXT = "The quick brown fox jumps over the lazy dog, then naps under a tree by the river."


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def model(request, tmp_path_factory):
    from transformers import AutoTokenizer

    from lens._models.catalog import ensure_cached

    folder = tmp_path_factory.mktemp(request.param)
    build_tiny(request.param, folder, AutoTokenizer.from_pretrained(ensure_cached("smollm2-135m")))
    return lens.load(str(folder))


def _final_hidden(model, tokens):
    with torch.no_grad():
        return model.hf.get_decoder()(input_ids=tokens, use_cache=False).last_hidden_state


def test_continuing_a_prefix_equals_the_whole_forward(model):
    tokens = model.tokenize(TEXT)[None]
    assert tokens.shape[1] > TINY_WINDOW + 4, "the prefix is longer than the sliding window"
    whole = _final_hidden(model, tokens)[0, -3:]
    prefix = model.run_prefix(tokens[0, :-3])
    with torch.no_grad(), model.continuing(prefix) as run:
        # Batch sizes 2, 1, 2: the repeated cache is cropped back after each run and rebuilt for a new size.
        runs = [run(tokens[:, -3:].expand(n, -1)) for n in (2, 1, 2)]
    for hidden in runs:
        torch.testing.assert_close(hidden, whole.expand(len(hidden), -1, -1), atol=1e-5, rtol=0)
    with torch.no_grad(), model.continuing(None) as run:
        torch.testing.assert_close(run(tokens), _final_hidden(model, tokens))


def test_unembed_is_the_models_own_logits_and_selects_rows(model):
    tokens = model.tokenize(TEXT)[None]
    with torch.no_grad():
        logits = model.hf(input_ids=tokens).logits
        unembedded = model.unembed(_final_hidden(model, tokens))
        rows = torch.tensor([5, 17, 300])
        torch.testing.assert_close(unembedded, logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.unembed(_final_hidden(model, tokens), rows), logits[..., rows], atol=1e-5, rtol=0)
    if model.info.logit_softcap is not None:
        assert unembedded.abs().max() <= model.info.logit_softcap


def test_replaced_embeddings_stand_for_the_tokens(model):
    tokens, other = model.tokenize(TEXT), model.tokenize(TEXT.upper())[: len(model.tokenize(TEXT))]
    assert len(other) == len(tokens) and not torch.equal(other, tokens)
    with torch.no_grad():
        plain, replaced = [], []
        lens.capture(model, other, [lens.Logits(plain.append)])
        with model.embeddings_replaced(model.embed(other[None])):
            lens.capture(model, tokens, [lens.Logits(replaced.append)])
    torch.testing.assert_close(replaced[0], plain[0])


def test_attention_modules_and_scale(model):
    config = model.hf.config
    expected = getattr(config, "query_pre_attn_scalar", None) or model.info.d_head
    assert model.attention_scale(0) == pytest.approx(expected**-0.5)
    assert all(hasattr(model.attention(layer), "q_proj") for layer in range(model.info.n_layers))
