"""The circuits detector: planted heads in a tiny model (activation and path patching), exact patching on
the real model against independent computations (transformers' eager model with hooks on o_proj, and
TransformerLens's activation patching on the bridge), path patching to the logits against activation
patching, and probe-file checks."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest
import torch

import lens
from metrics.circuits import logit_difference
from probes import ProbeError
from lens._capture.interventions import ReplaceZ
from lens._capture.needs import Logits
from probes.circuits import BUILTIN_TASKS, CircuitParams, Circuits, Pair, Stage, ZTap, generate_pairs, task_stages


def write_probes(path, probes):
    path.write_text("".join(json.dumps(p) + "\n" for p in probes))
    return path


def test_builtin_tasks_are_well_formed(smollm2):
    tokenizer = smollm2.tokenizer
    for task in BUILTIN_TASKS:
        for pair in generate_pairs(tokenizer, task, 20, random.Random(1)):
            clean, corrupt = smollm2.tokenize(pair["clean"]), smollm2.tokenize(pair["corrupt"])
            assert len(clean) == len(corrupt), pair
            assert int((clean != corrupt).sum()) == 1, pair  # a minimal difference: one token
            target, foil = smollm2.tokenize(pair["target"]), smollm2.tokenize(pair["foil"])
            assert len(target) == len(foil) == 1 and target != foil, pair
    builtin = Circuits(smollm2, CircuitParams(pairs_per_task=2)).builtin_probes()
    assert [p["task"] for p in builtin[:5]] == ["ioi", "colored_objects", "colored_object", "capitals", "induction"]  # --limit keeps a mix
    assert len(builtin) == 10
    for pair in generate_pairs(tokenizer, "ioi", 6, random.Random(2)):
        # S2 becomes the indirect object: the clean prompt names the subject twice, the corrupted one the target.
        subject, io = pair["foil"].strip(), pair["target"].strip()
        assert pair["clean"].count(subject) == 2 and pair["clean"].count(io) == 1
        assert pair["corrupt"].count(subject) == 1 and pair["corrupt"].count(io) == 2
    orders = {p["clean"].index(p["target"].strip()) < p["clean"].index(p["foil"].strip()) for p in generate_pairs(tokenizer, "ioi", 4, random.Random(3))}
    assert orders == {True, False}  # ABBA and BABA both present
    # The one-object task is Colored Objects with one object a scene: its lists and its three path stages.
    assert task_stages("colored_object") == task_stages("colored_objects") and len(task_stages("colored_object")) == 3
    assert all(p["clean"].count(" color is the ") == 2 and p["clean"].count(", and ") == 0 for p in generate_pairs(tokenizer, "colored_object", 8, random.Random(5)))


def test_the_one_object_colour_task_is_one_the_model_can_do(smollm2):
    # Neither embedded model binds colours to objects in Merullo et al.'s three-object scenes (clean
    # accuracy near chance); the one-object task is there so that the reuse question can still be asked.
    pairs = generate_pairs(smollm2.tokenizer, "colored_object", 24, random.Random(4))
    correct = 0
    with smollm2.continuing(None) as run, torch.no_grad():
        for pair in pairs:
            logits = smollm2.unembed(run(smollm2.tokenize(pair["clean"], bos="auto")[None])[0, -1])
            target, foil = smollm2.tokenize(pair["target"])[0], smollm2.tokenize(pair["foil"])[0]
            correct += bool(logits[target] > logits[foil])
    assert correct >= 20, f"{correct} of 24"


def test_patching_finds_a_planted_head(tmp_path):
    """Only head (1, 2) writes to the residual stream (every other head's o_proj columns are zero),
    so it alone carries the prompt's earlier tokens to the final position: patching it reproduces
    the whole corruption (score 1) and patching any other head does nothing (score 0)."""
    model = lens.load("tiny-llama")  # a private copy: its weights are edited
    d_head = model.info.d_head
    planted = (1, 2)
    with torch.no_grad():
        for layer_index, layer in enumerate(model.hf.model.layers):
            for head in range(model.info.n_heads):
                if (layer_index, head) != planted:
                    layer.self_attn.o_proj.weight[:, head * d_head : (head + 1) * d_head] = 0.0
    probes = generate_pairs(model.tokenizer, "induction", 3, random.Random(0))
    result = lens.census(model, ["circuits"], tmp_path / "store", probes_file=write_probes(tmp_path / "p.jsonl", probes))
    store = lens.ReportStore(tmp_path / "store")
    heads = store.read("circuit_heads", run_id=result.run_id)
    exact = heads[heads["method"] == "patching"].set_index(["layer", "head"])
    assert exact.loc[planted, "importance"] == pytest.approx(1.0, abs=1e-4)
    others = exact.drop(index=[planted])
    assert others["importance"].abs().max() < 1e-4
    assert exact["in_circuit"].sum() == 1 and exact.loc[planted, "in_circuit"]
    path = heads[heads["method"] == "path_patching"]
    assert list(dict.fromkeys(path["stage"])) == ["induction", "previous_token"]  # the task's declared stages, in order
    to_logits = path[path["stage"] == "induction"].set_index(["layer", "head"])
    assert to_logits.loc[planted, "importance"] == pytest.approx(1.0, abs=1e-4) and to_logits.loc[planted, "in_circuit"]
    for method in ("attribution", "eap_ig"):  # the fast estimates rank it first too
        estimate = heads[heads["method"] == method].set_index(["layer", "head"])["importance"]
        assert estimate.abs().idxmax() == planted
    tasks = store.read("circuit_tasks", run_id=result.run_id)
    assert tasks.loc[0, "faithfulness"] == pytest.approx(1.0, abs=1e-4)  # the planted head is the whole model
    assert tasks.loc[0, "n_in_circuit"] == 1  # cut at one head: it alone reaches the target
    curve = store.read("circuit_faithfulness", run_id=result.run_id).set_index("n_heads")["faithfulness"]
    assert curve.loc[0] == pytest.approx(0.0, abs=1e-6) and (curve.loc[1:] - 1.0).abs().max() < 1e-4
    assert pd.isna(tasks.loc[0, "repair_accuracy"])  # repair is off by default

    # Repair with scale 1 leaves the planted head as it is: accuracy unchanged.
    identity = lens.census(model, ["circuits"], tmp_path / "store", probes_file=tmp_path / "p.jsonl", params={"circuits": {"repair_heads": "1", "repair_scale": "1.0"}})
    repaired = store.read("circuit_tasks", run_id=identity.run_id)
    assert repaired.loc[0, "repair_accuracy"] == repaired.loc[0, "clean_accuracy"]


def eager_patched_ld(reference, clean, corrupt, target, foil, layer, head, d_head):
    """LD of ``clean`` with head (layer, head)'s input to o_proj at the last position taken from ``corrupt``."""
    o_proj = reference.model.layers[layer].self_attn.o_proj
    columns = slice(head * d_head, (head + 1) * d_head)
    recorded = {}

    def record(_module, inputs):
        recorded["z"] = inputs[0][0, -1, columns].clone()

    def patch(_module, inputs):
        z = inputs[0].clone()
        z[0, -1, columns] = recorded["z"]
        return (z,)

    with torch.no_grad():
        handle = o_proj.register_forward_pre_hook(record)
        reference(corrupt[None])
        handle.remove()
        handle = o_proj.register_forward_pre_hook(patch)
        logits = reference(clean[None]).logits[0, -1]
        handle.remove()
    return float(logit_difference(logits, torch.tensor(target), torch.tensor(foil)))


def test_exact_patching_on_real_model_equals_eager_hooks(smollm2, eager_reference, tmp_path):
    rng = random.Random(3)
    probes = generate_pairs(smollm2.tokenizer, "ioi", 2, rng) + generate_pairs(smollm2.tokenizer, "capitals", 2, rng)
    params = {"circuits": {"ig_steps": "2", "bootstrap": "200", "null_draws": "1000", "path_stages": "0"}}  # path patching: tests below
    result = lens.census(smollm2, ["circuits"], tmp_path / "store", probes_file=write_probes(tmp_path / "p.jsonl", probes), params=params)
    store = lens.ReportStore(tmp_path / "store")
    heads = store.read("circuit_heads", run_id=result.run_id)
    assert len(heads) == 2 * 3 * 270 and set(heads["method"]) == {"patching", "attribution", "eap_ig"}
    assert (heads["ci_low"] <= heads["importance"] + 1e-9).all() and (heads["importance"] <= heads["ci_high"] + 1e-9).all()
    tasks = store.read("circuit_tasks", run_id=result.run_id).set_index("task")
    # Two pairs cannot show a task is done above chance (Wilson interval), so neither enters the overlap.
    assert not tasks["can_do"].any() and store.read("circuit_overlap", run_id=result.run_id).empty
    summary = store.read("summary", run_id=result.run_id).set_index("claim")
    assert summary.loc["circuits.tasks_excluded", "estimate"] == 2
    curve = store.read("circuit_faithfulness", run_id=result.run_id)
    assert len(curve) == 2 * 271 and curve[curve["n_heads"] == 270]["faithfulness"].sub(1).abs().max() < 1e-4  # all heads kept: 1
    assert curve[curve["n_heads"] == 0]["faithfulness"].abs().max() < 1e-6  # none kept: 0

    reference = eager_reference(smollm2)
    ioi = [p for p in probes if p["task"] == "ioi"]
    encoded = [
        (smollm2.tokenize(p["clean"]), smollm2.tokenize(p["corrupt"]), int(smollm2.tokenize(p["target"])[0]), int(smollm2.tokenize(p["foil"])[0]))
        for p in ioi
    ]
    ld = {}
    with torch.no_grad():
        for kind in (0, 1):
            ld[kind] = torch.tensor(
                [float(logit_difference(reference(e[kind][None]).logits[0, -1], torch.tensor(e[2]), torch.tensor(e[3]))) for e in encoded]
            )
    assert tasks.loc["ioi", "mean_logit_diff"] == pytest.approx(float(ld[0].mean()), abs=1e-4)
    assert tasks.loc["ioi", "clean_accuracy"] == pytest.approx(float((ld[0] > 0).double().mean()))

    exact = heads[(heads["task"] == "ioi") & (heads["method"] == "patching")].set_index(["layer", "head"])["importance"]
    strongest = exact.abs().idxmax()
    for layer, head in [strongest, (0, 0), (14, 4)]:
        patched = torch.tensor([eager_patched_ld(reference, *e, layer, head, smollm2.info.d_head) for e in encoded])
        expected = float((patched.mean() - ld[0].mean()) / (ld[1].mean() - ld[0].mean()))
        assert exact.loc[(layer, head)] == pytest.approx(expected, abs=2e-4), (layer, head)
    assert abs(exact.loc[strongest]) > 0.05  # a head that matters, not only near-zero ones


def test_unequal_lengths_name_the_line(tiny_llama, tmp_path):
    good = {"task": "t", "clean": "When Mary and John", "corrupt": "When Alice and Bob", "target": " Mary", "foil": " John"}
    bad = dict(good, corrupt="When Alice and Bob and Tom")
    path = write_probes(tmp_path / "p.jsonl", [good, bad])
    with pytest.raises(ProbeError, match=r"p\.jsonl:2: clean has \d+ tokens but corrupt has \d+"):
        lens.census(tiny_llama, ["circuits"], tmp_path / "store", probes_file=path)
    with pytest.raises(ProbeError, match=r"p\.jsonl:1: clean and corrupt are the same tokens"):
        lens.census(tiny_llama, ["circuits"], tmp_path / "store", probes_file=write_probes(tmp_path / "p.jsonl", [dict(good, corrupt=good["clean"])]))
    same = dict(good, foil=" Mary")
    with pytest.raises(ProbeError, match=r"p\.jsonl:1: target"):
        lens.census(tiny_llama, ["circuits"], tmp_path / "store", probes_file=write_probes(tmp_path / "p.jsonl", [same]))


def test_patching_batches_bounded_by_cache_memory_agree(tmp_path, monkeypatch):
    """Long prompts patch in smaller batches (BATCHED_CACHE_BYTES); the scores must not change."""
    model = lens.load("tiny-llama")
    probes = write_probes(tmp_path / "p.jsonl", generate_pairs(model.tokenizer, "induction", 2, random.Random(0)))
    scores = []
    for budget in (2**40, 1):  # every head in one batch, then one head per batch
        monkeypatch.setattr("probes.circuits.BATCHED_CACHE_BYTES", budget)
        result = lens.census(model, ["circuits"], tmp_path / "store", probes_file=probes)
        heads = lens.ReportStore(tmp_path / "store").read("circuit_heads", run_id=result.run_id)
        scores.append(heads[heads["method"] == "patching"].sort_values(["layer", "head"])["importance"].to_numpy())
    assert abs(scores[0]).max() > 0
    torch.testing.assert_close(torch.tensor(scores[1]), torch.tensor(scores[0]), atol=1e-5, rtol=0)


def run_pairs(model, task: str, n: int, seed: int = 0) -> tuple[Circuits, list[Pair]]:
    """A detector that has run the census's forward passes for ``n`` built-in pairs of ``task``."""
    detector = Circuits(model, CircuitParams(pairs_per_task=n), seed=seed)
    for index, probe in enumerate(generate_pairs(model.tokenizer, task, n, random.Random(seed))):
        for forward in detector.passes(detector.check_probe(probe, "test"), index):
            lens.capture(model, forward.tokens[None], forward.needs, forward.interventions)
            forward.done()
    return detector, detector._pairs[task]


def activation_patching(detector: Circuits, pair: Pair) -> torch.Tensor:
    info = detector.model.info
    n = info.n_layers * info.n_heads
    return detector._final_token_lds(pair, torch.eye(n, dtype=torch.bool).view(n, info.n_layers, info.n_heads), pair.z_corrupt)


def test_path_patching_recovers_planted_paths():
    """Only heads (0, 1) and (1, 2) write to the residual stream. To the logits, path patching of the
    last layer equals activation patching (nothing downstream to freeze), and without freezing it
    equals activation patching everywhere. Through the receiver (1, 2)'s query (final position) or
    its keys and values (where clean and corrupt differ), only the planted sender (0, 1) has an effect."""
    model = lens.load("tiny-llama")
    d_head = model.info.d_head
    with torch.no_grad():
        for layer_index, layer in enumerate(model.hf.model.layers):
            for head in range(model.info.n_heads):
                if (layer_index, head) not in {(0, 1), (1, 2)}:
                    layer.self_attn.o_proj.weight[:, head * d_head : (head + 1) * d_head] = 0.0
        # Loud writes, so that the sender moves the receiver and the receiver moves the logits.
        model.hf.model.layers[0].self_attn.o_proj.weight[:, d_head : 2 * d_head] *= 30.0
        model.hf.model.layers[1].self_attn.o_proj.weight[:, 2 * d_head : 3 * d_head] *= 30.0
    detector, pairs = run_pairs(model, "induction", 2)
    receivers = torch.zeros(2, 4, dtype=torch.bool)
    receivers[1, 2] = True
    for pair in pairs:
        exact = activation_patching(detector, pair)
        to_logits = detector._path_patch(pair, Stage("movers", "logits"), None)
        torch.testing.assert_close(to_logits[4:], exact[4:], atol=1e-5, rtol=0)
        torch.testing.assert_close(detector._path_patch(pair, Stage("movers", "logits"), None, freeze=False), exact, atol=1e-5, rtol=0)
        for stage in (Stage("inhibition", "movers", "q"), Stage("previous", "movers", "kv", "first_difference")):
            effect = detector._path_patch(pair, stage, receivers) - pair.ld_clean
            assert abs(float(effect[1])) > 3e-5, stage  # the planted sender moves the receiver (others: float noise)
            assert effect[[0, 2, 3]].abs().max() < 1e-6 and effect[4:].abs().max() == 0, stage  # no one else does


def test_path_patching_to_logits_is_activation_patching_on_the_real_model(smollm2):
    """SmolLM2, an IOI pair: path patching to the logits without freezing is exact activation patching
    for every head; with freezing (the paper's definition), the last layer's heads still equal it."""
    detector, (pair,) = run_pairs(smollm2, "ioi", 1)
    exact = activation_patching(detector, pair)
    free = detector._path_patch(pair, Stage("movers", "logits"), None, freeze=False)
    torch.testing.assert_close(free, exact, atol=2e-4, rtol=0)
    frozen = detector._path_patch(pair, Stage("movers", "logits"), None)
    last = slice((smollm2.info.n_layers - 1) * smollm2.info.n_heads, None)
    torch.testing.assert_close(frozen[last], exact[last], atol=2e-4, rtol=0)
    assert (frozen - exact).abs().max() > 1e-3  # freezing matters for earlier heads: not the same measurement


def full_prompt_path_patch(detector: Circuits, pair: Pair, stage: Stage, receivers: torch.Tensor, senders: list[int]) -> torch.Tensor:
    """Path patching the plain way: whole-prompt forward passes, no prefix cache, no shortcut. Pass 1
    patches the sender's z at the stage's position (every other head frozen to clean) and records the
    receivers' q/k/v rows there; pass 2 replaces only those rows. LD_patched per sender."""
    model, info = detector.model, detector.model.info
    start = len(pair.clean) - 1 if stage.position == "final" else pair.first_difference

    def z_at(tokens):
        taps = [ZTap(layer, row=start) for layer in range(info.n_layers)]
        lens.capture(model, tokens[None], [], taps)
        return torch.stack([tap.z[0] for tap in taps]).float()

    def hooked_ld(interventions, edit_row):
        handles = [model.projection(layer, name).register_forward_hook(edit_row(layer, name, columns)) for layer, name, columns in slots]
        logits = []
        try:
            lens.capture(model, pair.clean[None], [Logits(logits.append)], interventions)
        finally:
            for handle in handles:
                handle.remove()
        final = logits[0][0, -1].float()
        return float(final[pair.target] - final[pair.foil])

    z_clean, z_corrupt = z_at(pair.clean), z_at(pair.corrupt)
    top = int(receivers.nonzero()[:, 0].max())
    slots = detector._receiver_slots(receivers, stage.via)
    every_head = torch.ones(1, info.n_heads, dtype=torch.bool)
    patched = []
    for sender in senders:
        values = z_clean.clone()
        values[sender // info.n_heads, sender % info.n_heads] = z_corrupt[sender // info.n_heads, sender % info.n_heads]
        recorded = {}

        def record(layer, name, columns):
            def hook(_module, _inputs, output):
                recorded[layer, name, columns.start] = output[:, start, columns].detach().clone()
            return hook

        def replace(layer, name, columns):
            def hook(_module, _inputs, output):
                output = output.clone()
                output[:, start, columns] = recorded[layer, name, columns.start]
                return output
            return hook

        hooked_ld([ReplaceZ(layer, [start], values[layer][None, None], every_head) for layer in range(top + 1)], record)
        patched.append(hooked_ld([], replace))
    return torch.tensor(patched)


@pytest.mark.parametrize("stage", [Stage("inhibition", "movers", "q"), Stage("induction", "inhibition", "kv", "first_difference")], ids=["q-final", "kv-first-difference"])
def test_path_patching_through_receivers_equals_whole_prompt_passes_on_the_real_model(smollm2, stage):
    """SmolLM2, an IOI pair, receivers in a middle layer: the detector's path patching (prefix cache,
    pass 1 run one token deep and stopped after the top receiver's layer) equals plain whole-prompt
    forward passes, for senders below the receivers, and the patch moves the LD."""
    detector, (pair,) = run_pairs(smollm2, "ioi", 1)
    n_heads = smollm2.info.n_heads
    receivers = torch.zeros(smollm2.info.n_layers, n_heads, dtype=torch.bool)
    receivers[12, [1, 4]] = True
    receivers[15, 0] = True
    fast = detector._path_patch(pair, stage, receivers)
    senders = [0, 3 * n_heads + 2, 8 * n_heads + 5, 11 * n_heads + 8, 14 * n_heads + 7]
    torch.testing.assert_close(fast[senders], full_prompt_path_patch(detector, pair, stage, receivers, senders), atol=2e-4, rtol=0)
    assert (fast[: 15 * n_heads] - pair.ld_clean).abs().max() > 1e-3  # some sender moves the receivers
    assert (fast[15 * n_heads :] == pair.ld_clean).all()  # heads at or above the top receiver's layer send nothing


def test_activation_patching_equals_transformer_lens_on_the_bridge(smollm2):
    """The workbench's batched prefix-cache patching against TransformerLens 4.3's
    ``generic_activation_patch`` on ``model.bridge`` (hook_z at the final position), on SmolLM2."""
    from transformer_lens.patching import generic_activation_patch, layer_pos_head_vector_patch_setter

    detector, (pair,) = run_pairs(smollm2, "ioi", 1)
    exact = activation_patching(detector, pair)
    n_heads = smollm2.info.n_heads
    chosen = [int(exact.sub(pair.ld_clean).abs().argmax()), 0, 5 * n_heads + 3, 29 * n_heads + 8]
    bridge = smollm2.bridge
    _, corrupt_cache = bridge.run_with_cache(pair.corrupt[None])
    position = len(pair.clean) - 1
    index = pd.DataFrame({"layer": [i // n_heads for i in chosen], "pos": [position] * len(chosen), "head_index": [i % n_heads for i in chosen]})

    def metric(logits):
        return logits[0, -1, pair.target] - logits[0, -1, pair.foil]

    reference = generic_activation_patch(bridge, pair.clean[None], corrupt_cache, metric, layer_pos_head_vector_patch_setter, "z", index_df=index)
    torch.testing.assert_close(exact[chosen], reference.float().cpu(), atol=2e-3, rtol=0)
    assert (exact[chosen] - pair.ld_clean).abs().max() > 0.05  # a head that matters is among them
