"""Gemma 3 past its sliding window (512): capture and interventions read absolute positions when a run
continues from a KV cache (a decode step, generation, single-token patching)."""

from __future__ import annotations

import copy

import pytest
import torch

import lens
from lens._capture.positions import CachePositionError
from lens._capture.session import lm_head
from probes.circuits import Circuits
from probes.retrieval import Retrieval, RetrievalParams
from metrics.circuits import logit_difference

MAX_NEW_TOKENS = 16


@pytest.fixture(scope="module")
def gemma():
    return lens.load("gemma3-270m")


@pytest.fixture(scope="module")
def needle_probe(gemma):
    """A retrieval probe of about 1,500 tokens whose needle sits within the last window of the question,
    so that sliding-window heads can copy from it."""
    detector = Retrieval(gemma, RetrievalParams(lengths=[1500], depths=[0.9]))
    probe = detector.builtin_probes()[0]
    tokens = detector.tokens(probe["prompt"])
    window = gemma.hf.config.sliding_window
    assert len(tokens) >= 1500 and len(tokens) - detector.needle_span(probe["prompt"], probe["needle"])[0] < window
    return probe, tokens


def _sliding_layers(model) -> list[int]:
    return [layer for layer, kind in enumerate(model.info.layer_types) if kind == "sliding_attention"]


def test_masked_decode_step_equals_masked_full_forward(gemma, needle_probe):
    """Zeroing head 0's query and head 1's output at the last position on every layer gives the same
    attention rows and logits whether that position is a decode step from the prefix's cache or part
    of one full forward pass."""
    _, tokens = needle_probe
    info, window, last = gemma.info, gemma.hf.config.sliding_window, len(tokens) - 1
    zero_z = torch.zeros(1, 1, info.n_heads, info.d_head)
    head_1 = torch.tensor([[False, True] + [False] * (info.n_heads - 2)])
    edits = [lens.ZeroQuery(layer, [0], positions=[last]) for layer in range(info.n_layers)]
    edits += [lens.ReplaceZ(layer, [last], zero_z, head_1) for layer in range(info.n_layers)]

    def recorder(rows):
        return lens.AttentionRows(lambda block: rows.__setitem__(block.layer, (block.positions.tolist(), block.probs[0, :, -1])), positions=[last])

    direct_rows, direct_logits = {}, []
    lens.capture(gemma, tokens, [recorder(direct_rows), lens.Logits(direct_logits.append)], edits)

    cache = gemma.prefix_cache(tokens[:-1])
    decoder = gemma.hf.get_decoder()
    step_rows = {}
    with torch.no_grad(), lens.session(gemma, [recorder(step_rows)], edits):
        step_logits = lm_head(gemma, decoder(input_ids=tokens[None, -1:], past_key_values=cache, use_cache=True).last_hidden_state)

    assert sorted(step_rows) == list(range(info.n_layers))
    for layer in range(info.n_layers):
        positions, probs = step_rows[layer]
        assert positions == [last] and probs.shape[-1] == len(tokens)
        torch.testing.assert_close(probs, direct_rows[layer][1], atol=5e-5, rtol=0)
        # The zeroed query attends uniformly to what it may see: the last window on a sliding layer.
        visible = window if info.layer_types[layer] == "sliding_attention" else len(tokens)
        expected = torch.zeros(len(tokens))
        expected[-visible:] = 1.0 / visible
        torch.testing.assert_close(probs[0], expected, atol=1e-7, rtol=0)
    difference = (step_logits[0, -1] - direct_logits[0][0, -1]).abs().max()
    assert difference < 5e-4  # measured 1.7e-5; the edits move the logits by 9.3

    cache.crop(-1)  # a cache that keeps every key can go back to the prefix
    with torch.no_grad():
        plain_logits = lm_head(gemma, decoder(input_ids=tokens[None, -1:], past_key_values=cache, use_cache=True).last_hidden_state)
    assert (plain_logits[0, -1] - step_logits[0, -1]).abs().max() > 100 * difference, "the edits change the answer"


def test_a_cache_that_drops_keys_is_refused(gemma, needle_probe):
    """transformers' default cache on Gemma 3 keeps only the last window on sliding layers: a capture
    session refuses to continue it (the test above continues Model.prefix_cache instead)."""
    _, tokens = needle_probe
    window = gemma.hf.config.sliding_window
    with torch.no_grad():
        dropping = gemma.hf(input_ids=tokens[None, : window + 8], use_cache=True, logits_to_keep=1).past_key_values
        assert min(layer.keys.shape[-2] for layer in dropping.layers) < window  # transformers' default on Gemma 3
        with lens.session(gemma, [], [lens.ZeroQuery(0, [0])]), pytest.raises(CachePositionError, match="keys of every position"):
            gemma.hf(input_ids=tokens[None, window + 8 : window + 9], past_key_values=dropping, use_cache=True)


def test_decode_time_retrieval_scores_equal_teacher_forced(gemma, needle_probe):
    """The retrieval detector scored while decoding (every step captured from the KV cache) and by one
    teacher-forced pass over prompt + answer: the same top-1 keys, so the same credit on every head."""
    probe, _ = needle_probe
    credits, answers = {}, {}
    for scoring in ("decode", "teacher_forced"):
        detector = Retrieval(gemma, RetrievalParams(scoring=scoring, max_new_tokens=MAX_NEW_TOKENS))
        for forward in detector.passes(probe, 0):
            lens.capture(gemma, forward.tokens, forward.needs, forward.interventions)
            forward.done()
        (trial,) = detector.trials
        credits[scoring], answers[scoring] = trial.credit, trial.generation.answer_tokens.tolist()
    assert answers["decode"] == answers["teacher_forced"]
    assert torch.equal(credits["decode"], credits["teacher_forced"])
    assert credits["decode"][_sliding_layers(gemma)].max() > 0, "a sliding-window head copies the needle"


def test_circuits_patching_from_a_prefix_cache_past_the_window(gemma, needle_probe):
    """Single-token patching continues the clean prefix's cache (cropped back after every batch): on a
    prompt longer than the window its logit differences equal full forward passes with the same patch."""
    _, tokens = needle_probe
    filler = gemma.tokenizer.decode(tokens[1:560])
    probe = {"task": "ioi", "clean": filler + "\n\nWhen Mary and John went to the shop, John gave a bag to",
             "corrupt": filler + "\n\nWhen Alice and Peter went to the shop, Grace gave a bag to", "target": " Mary", "foil": " John"}
    detector = Circuits(gemma)
    for forward in detector.passes(detector.check_probe(probe, "probe"), 0):
        lens.capture(gemma, forward.tokens, forward.needs, forward.interventions)
        forward.done()
    (pair,) = detector._pairs["ioi"]
    window, info = gemma.hf.config.sliding_window, gemma.info
    assert len(pair.clean) > window + 50
    # Batch element 0 patches one head of a sliding layer; element 1 every head but head 0, on every layer.
    replace = torch.zeros(2, info.n_layers, info.n_heads, dtype=torch.bool)
    replace[0, _sliding_layers(gemma)[-1], 0] = True
    replace[1, :, 1:] = True
    detector.params.batch_size = 1  # two batches: the second continues the cache cropped back to the prefix
    patched = detector._final_token_lds(pair, replace, pair.z_corrupt)

    edits = [lens.ReplaceZ(layer, [-1], pair.z_corrupt[layer][None, None], replace[:, layer]) for layer in range(info.n_layers)]
    logits = []
    lens.capture(gemma, pair.clean.expand(2, -1), [lens.Logits(logits.append)], edits)  # both patches in one batched forward
    expected = logit_difference(logits[0][:, -1].float().cpu(), torch.tensor([pair.target] * 2), torch.tensor([pair.foil] * 2))
    torch.testing.assert_close(patched, expected, atol=2e-4, rtol=0)  # measured 4e-6
    assert abs(float(patched[1]) - pair.ld_clean) > 0.1, "patching most heads moves the logit difference"
