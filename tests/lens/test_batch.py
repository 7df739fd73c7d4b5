"""Batched capture (``run_passes``): every need of every pass gets what a batch-of-one capture gives."""

from __future__ import annotations

from collections import defaultdict

import pandas.testing as pd_testing
import pytest
import torch

import lens
from lens._capture.batch import plan_batches, run_passes
from probes import builtin_probe_file
from probes._base import ForwardPass

TOLERANCE = {"atol": 2e-4, "rtol": 1e-4}


def _sink_texts(model, count: int) -> list[str]:
    """Sink texts of spread-out lengths, shortest first (in tokens)."""
    texts = sorted((p["text"] for p in builtin_probe_file("sinks.jsonl")), key=lambda text: len(model.tokenize(text)))
    return [texts[i * (len(texts) - 1) // (count - 1)] for i in range(count)]


class Recorder:
    """Needs that keep what each need received, reduced the way detectors reduce it."""

    def __init__(self, model, tokens: torch.Tensor):
        self.got: dict[str, object] = defaultdict(dict)
        n_layers, n_heads, n = model.info.n_layers, model.info.n_heads, len(tokens)
        received = torch.zeros(n_layers, n_heads, n)  # sinks: attention each key receives, summed over rows
        rows_seen = torch.zeros(n_layers, n)
        self.got["received"], self.got["rows_seen"] = received, rows_seen

        def every_row(block: lens.AttentionBlock) -> None:
            assert block.probs.shape[0] == 1 and block.n_keys <= n and int(block.positions.max()) < n
            received[block.layer, :, : block.n_keys] += block.probs[0].sum(dim=-2)
            rows_seen[block.layer, block.positions] += 1

        def last_rows(block: lens.AttentionBlock) -> None:
            self.got["last_row"][block.layer] = (block.positions.tolist(), block.probs[0].clone())

        def residual(name):
            return lambda layer, x: self.got[name].__setitem__(layer, x[0].clone())

        def chunk(positions, logits):  # reduced: Gemma's vocabulary makes whole chunks large
            self.got["chunks"][int(positions[0])] = (positions.tolist(), logits[0].logsumexp(-1), logits[0, :, :512].clone())

        self.needs = [
            lens.AttentionRows(every_row),
            lens.AttentionRows(last_rows, positions=[0, -1], layers=[0, 5, n_layers - 1]),
            lens.Residual(residual("resid_post")),
            lens.Residual(residual("mlp_out"), kind="mlp_out"),
            lens.Logits(lambda logits: self.got.__setitem__("logits", logits.clone()), positions=[-1, 2]),
            lens.LogitChunks(chunk, chunk=40),
        ]


def _assert_same(batched, alone, where=""):
    if isinstance(batched, dict):
        assert batched.keys() == alone.keys(), where
        for key in batched:
            _assert_same(batched[key], alone[key], f"{where}/{key}")
    elif isinstance(batched, tuple | list):
        assert len(batched) == len(alone), where
        for index, (b, a) in enumerate(zip(batched, alone)):
            _assert_same(b, a, f"{where}[{index}]")
    elif isinstance(batched, torch.Tensor):
        assert batched.shape == alone.shape, where
        torch.testing.assert_close(batched, alone, **TOLERANCE, msg=lambda m: f"{where}: {m}")
    else:
        assert batched == alone, where


def test_plan_batches_groups_by_length_within_budget():
    batches = plan_batches([10, 100, 90, 40, 60, 12], max_tokens=300)
    assert batches == [[1, 2, 4], [3], [5, 0]]
    assert plan_batches([500, 20], max_tokens=300) == [[0], [1]]  # a long item runs alone


def test_every_need_equals_a_batch_of_one(smollm2):
    """Sink texts of different lengths and circuit pairs (8-62 tokens) in batched passes: attention
    reduced as the sinks detector does, selected rows, residuals and logits equal each pass run alone,
    and padding is never counted (every real row seen once per layer, no key past the item's end)."""
    texts = _sink_texts(smollm2, 4)
    pairs = _circuit_prompts(smollm2, 3)
    token_lists = [smollm2.tokenize(text) for text in texts + pairs]
    token_lists.append(token_lists[0].clone())  # the same tokens twice share one batch row
    batched = [Recorder(smollm2, tokens) for tokens in token_lists]
    done = []
    passes = [ForwardPass(tokens, r.needs, done=lambda i=i: done.append(i)) for i, (tokens, r) in enumerate(zip(token_lists, batched))]
    n_forward = run_passes(smollm2, passes)
    assert done == list(range(len(passes)))  # in the order given
    assert n_forward < len(passes) - 3

    for tokens, recorder in zip(token_lists, batched):
        alone = Recorder(smollm2, tokens)
        lens.capture(smollm2, tokens, alone.needs)
        assert torch.equal(recorder.got["rows_seen"], torch.ones_like(recorder.got["rows_seen"]))
        _assert_same(dict(recorder.got), dict(alone.got), f"{len(tokens)} tokens")


def _circuit_prompts(model, count: int) -> list[str]:
    """Clean and corrupt prompts of ``count`` of the circuits detector's built-in pairs, tasks mixed."""
    import probes

    pairs = probes.get("circuits")(model).builtin_probes()
    return [p[side] for p in pairs[:: max(1, len(pairs) // count)][:count] for side in ("clean", "corrupt")]


def _edits(model, tokens):
    """One edit of each kind, on layers 3 and 7 (ScaleSinks forces the blockwise path there)."""
    d_head, n = model.info.d_head, len(tokens)
    torch.manual_seed(0)
    return {
        "ZeroQuery": [lens.ZeroQuery(3, heads=[0, 4])],
        "AddToQuery": [lens.AddToQuery(3, heads=[1, 2], vectors=torch.randn(2, d_head), scale=2.0)],
        "ScaleSinks": [lens.ScaleSinks(7, heads=[0, 1, 2], sink_positions=[0, 5, n - 3], beta=0.2)],
        "ReplaceZ": [lens.ReplaceZ(7, positions=[-1, 4], values=torch.randn(1, 2, model.info.n_heads, d_head), where=torch.ones(1, model.info.n_heads, dtype=torch.bool))],
    }


@pytest.mark.parametrize("kind", ["ZeroQuery", "AddToQuery", "ScaleSinks", "ReplaceZ"])
def test_interventions_act_on_their_own_item(smollm2, kind):
    """Three texts of different lengths in one batch, only the middle one (batch row 1) edited: the
    others get the unedited result, the edited one what a forward pass of it alone with the edit
    gives (ReplaceZ's -1 is its own last token), and the edit changes that result."""
    texts = _sink_texts(smollm2, 6)[2:5]
    token_lists = [smollm2.tokenize(text) for text in texts]
    longest = token_lists[-1]  # row 0 (longest first); the edited text is row 1
    edits = _edits(smollm2, token_lists[1])[kind]
    batched = [Recorder(smollm2, tokens) for tokens in token_lists]
    passes = [ForwardPass(tokens, r.needs, edits if i == 1 else []) for i, (tokens, r) in enumerate(zip(token_lists, batched))]
    assert run_passes(smollm2, passes) == 1
    assert len(longest) > len(token_lists[1]) > len(token_lists[0])

    for index, (tokens, recorder) in enumerate(zip(token_lists, batched)):
        alone = Recorder(smollm2, tokens)
        lens.capture(smollm2, tokens, alone.needs, edits if index == 1 else [])
        _assert_same(dict(recorder.got), dict(alone.got), f"item {index}")
    unedited = Recorder(smollm2, token_lists[1])
    lens.capture(smollm2, token_lists[1], unedited.needs)
    assert (batched[1].got["logits"] - unedited.got["logits"]).abs().max() > 1e-2


def _lockstep(detector, probes_list, run) -> None:
    """Advance every probe's passes one step at a time, running each step's passes with ``run``."""
    for step in lens.lockstep(detector.passes(probe, index) for index, probe in enumerate(probes_list)):
        run(step)


def _one_by_one(model):
    def run(step):
        for forward in step:
            lens.capture(model, forward.tokens, forward.needs, forward.interventions)
            forward.done()

    return run


def test_sinks_reports_equal_batched_and_unbatched(smollm2):
    """The sinks detector on four probes (detection, then calibration with ScaleSinks edits) writes
    the same reports whether its passes run batched or one at a time."""
    import probes

    reports = []
    for run in (_one_by_one(smollm2), lambda step: run_passes(smollm2, step)):
        detector = probes.get("sinks")(smollm2)
        _lockstep(detector, [{"text": text} for text in _sink_texts(smollm2, 4)], run)
        reports.append({r.type: r.frame for r in detector.finish()})
    assert reports[0].keys() == reports[1].keys()
    assert len(reports[0]["sink_calibration"]) > 0
    for name, frame in reports[0].items():
        pd_testing.assert_frame_equal(reports[1][name], frame, check_exact=False, rtol=1e-4, atol=1e-5, obj=name)


def test_circuits_pair_passes_equal_batched_and_unbatched(smollm2):
    """The circuits detector's clean and corrupted passes (per-head z taps at the last token, logits
    there) of pairs of different lengths give the same logit differences and head outputs batched."""
    import probes

    pairs = []
    for run in (_one_by_one(smollm2), lambda step: run_passes(smollm2, step)):
        detector = probes.get("circuits")(smollm2)
        probe_list = detector.builtin_probes()
        _lockstep(detector, probe_list[:: max(1, len(probe_list) // 4)][:4], run)
        pairs.append([pair for task in sorted(detector._pairs) for pair in detector._pairs[task]])
    assert len({len(pair.clean) for pair in pairs[0]}) > 1
    for batched, alone in zip(pairs[1], pairs[0]):
        assert batched.ld_clean == pytest.approx(alone.ld_clean, abs=1e-4)
        assert batched.ld_corrupt == pytest.approx(alone.ld_corrupt, abs=1e-4)
        torch.testing.assert_close(batched.z_clean, alone.z_clean, **TOLERANCE)
        torch.testing.assert_close(batched.z_corrupt, alone.z_corrupt, **TOLERANCE)


def test_sliding_window_rows_equal_a_batch_of_one():
    """Gemma 3 (sliding layers, window 512): two texts longer than the window, padded in one batch,
    give the batch-of-one attention sums, residuals and logits (the window masks by position)."""
    gemma = lens.load("gemma3-270m")
    window = gemma.hf.config.sliding_window
    corpus = " ".join(p["text"] for p in builtin_probe_file("sinks.jsonl"))
    token_lists = [gemma.tokenize(corpus)[:length] for length in (window + 90, window + 40)]
    batched = [Recorder(gemma, tokens) for tokens in token_lists]
    assert run_passes(gemma, [ForwardPass(tokens, r.needs) for tokens, r in zip(token_lists, batched)]) == 1
    for tokens, recorder in zip(token_lists, batched):
        alone = Recorder(gemma, tokens)
        lens.capture(gemma, tokens, alone.needs)
        _assert_same(dict(recorder.got), dict(alone.got), f"{len(tokens)} tokens")
