"""The circuits detector: a planted head in a tiny model, exact patching on the real model against an
independent computation (transformers' eager model with hooks on o_proj), and probe-file checks."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest
import torch

import lens
from metrics.circuits import logit_difference
from probes import ProbeError
from probes.circuits import CircuitParams, Circuits, generate_pairs


def write_probes(path, probes):
    path.write_text("".join(json.dumps(p) + "\n" for p in probes))
    return path


def test_builtin_tasks_are_well_formed(smollm2):
    tokenizer = smollm2.tokenizer
    for task in ("ioi", "colored_objects", "capitals", "induction"):
        for pair in generate_pairs(tokenizer, task, 20, random.Random(1)):
            clean, corrupt = smollm2.tokenize(pair["clean"]), smollm2.tokenize(pair["corrupt"])
            assert len(clean) == len(corrupt), pair
            assert (clean != corrupt).any(), pair
            target, foil = smollm2.tokenize(pair["target"]), smollm2.tokenize(pair["foil"])
            assert len(target) == len(foil) == 1 and target != foil, pair
    builtin = Circuits(smollm2, CircuitParams(pairs_per_task=2)).builtin_probes()
    assert [p["task"] for p in builtin[:4]] == ["ioi", "colored_objects", "capitals", "induction"]  # --limit keeps a mix
    assert len(builtin) == 8
    ioi = generate_pairs(tokenizer, "ioi", 5, random.Random(2))
    for pair in ioi:  # ABC: the corrupted prompt names neither the target nor the foil
        assert pair["target"].strip() not in pair["corrupt"] and pair["foil"].strip() not in pair["corrupt"]


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
    for method in ("attribution", "eap_ig"):  # the fast estimates rank it first too
        estimate = heads[heads["method"] == method].set_index(["layer", "head"])["importance"]
        assert estimate.abs().idxmax() == planted
    tasks = store.read("circuit_tasks", run_id=result.run_id)
    assert tasks.loc[0, "faithfulness"] == pytest.approx(1.0, abs=1e-4)  # the planted head is the whole model
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
    result = lens.census(
        smollm2, ["circuits"], tmp_path / "store", probes_file=write_probes(tmp_path / "p.jsonl", probes), params={"circuits": {"ig_steps": "2"}}
    )
    store = lens.ReportStore(tmp_path / "store")
    heads = store.read("circuit_heads", run_id=result.run_id)
    assert len(heads) == 2 * 3 * 270
    tasks = store.read("circuit_tasks", run_id=result.run_id).set_index("task")
    overlap = store.read("circuit_overlap", run_id=result.run_id)
    assert len(overlap) == 3 and set(overlap["method"]) == {"patching", "attribution", "eap_ig"}

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
