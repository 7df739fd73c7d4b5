"""The preplan_anchor detector on the real embedded model against transformers' own output_attentions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lens
from lens.views import render
from probes import ProbeError

QUESTIONS = [
    ("sum", "Compute (14 + 6) * 3. Show each step.", "First, 14 + 6 = 20. Then, 20 * 3 = 60. So the answer is 60."),
    ("pens", "Ana has 9 pens and buys 4 more. How many pens does she have?", "Ana starts with 9 pens. She buys 4 more, so 9 + 4 = 13. She has 13 pens."),
]


def eager_outputs(model, reference, probes):
    """(start, full attention [layer head query key], logits) per probe from transformers' eager attention."""
    outputs = []
    for prompt, response in probes:
        tokens = model.tokenize(prompt + response)
        with torch.no_grad():
            out = reference(tokens[None], output_attentions=True)
        outputs.append((len(model.tokenize(prompt)), torch.stack([a[0] for a in out.attentions]).double(), out.logits[0]))
    return outputs


def direct(outputs, dropped_keys):
    """Every quantity from full attention, following the definitions literally."""
    traces, distance_sum, n_rows = [], torch.zeros(30, 9, dtype=torch.float64), 0
    for start, attention, logits in outputs:
        if dropped_keys is not None:
            attention = attention.clone()
            attention[..., dropped_keys] = 0
            attention = attention / attention.sum(-1, keepdim=True)
        T = attention.shape[-1]
        offset = torch.arange(T)[:, None] - torch.arange(T)[None, :]
        rows = attention[:, :, start:]
        distance_sum += (rows * offset[start:].clamp_min(0)).sum(-1).sum(-1)
        n_rows += T - start
        log_probs = torch.log_softmax(logits.double(), -1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        traces.append((attention, start, T, entropy, offset))
    d = distance_sum / n_rows
    order = torch.argsort(d.flatten(), stable=True)
    n_group = round(0.3 * 270)
    local, global_ = torch.zeros(270, dtype=torch.bool), torch.zeros(270, dtype=torch.bool)
    local[order[:n_group]] = True
    global_[torch.argsort(-d.flatten(), stable=True)[:n_group]] = True
    local, global_ = local.view(30, 9), global_.view(30, 9)
    per_probe = []
    for attention, start, T, entropy, offset in traces:
        a_loc, a_glob = attention[local].mean(0), attention[global_].mean(0)
        waad = (a_loc[start:] * offset[start:].clamp(0, 10)).sum(-1)
        response = torch.arange(start, T)
        gap = response[:, None] - response[None, :]  # t - s over response rows and response keys
        columns = a_glob[start:, start:]
        window, later = ((gap >= 10) & (gap <= 100)).double(), (gap >= 1).double()
        fai, fai_all = (columns * window).sum(0) / window.sum(0), (columns * later).sum(0) / later.sum(0)
        per_probe.append(dict(waad=waad, fai=fai, fai_all=fai_all,
                              next_entropy=entropy[start:T], token_entropy=entropy[start - 1 : T - 1]))
    return d, local, global_, per_probe


@pytest.fixture(scope="module")
def census_run(smollm2, tmp_path_factory):
    folder = tmp_path_factory.mktemp("preplan")
    probes = [(lens.chat_prompt(smollm2, question), response) for _, question, response in QUESTIONS]
    lines = [json.dumps({"id": name, "prompt": prompt, "response": response}) for (name, _, _), (prompt, response) in zip(QUESTIONS, probes)]
    (folder / "probes.jsonl").write_text("\n".join(lines) + "\n")
    result = lens.census(smollm2, ["preplan_anchor"], folder / "store", probes_file=folder / "probes.jsonl")
    return lens.ReportStore(folder / "store"), result, probes


@pytest.fixture(scope="module")
def reference_outputs(smollm2, eager_reference, census_run):
    return eager_outputs(smollm2, eager_reference(smollm2), census_run[2])


@pytest.mark.parametrize("variant", ["all", "no_sink"])
def test_metrics_equal_output_attentions(census_run, reference_outputs, variant):
    store, result, _ = census_run
    d, local, global_, per_probe = direct(reference_outputs, None if variant == "all" else [0])

    heads = store.read("head_locality", run_id=result.run_id).query("variant == @variant").sort_values(["layer", "head"])
    got_d = torch.tensor(heads["mean_distance"].to_numpy()).view(30, 9)
    torch.testing.assert_close(got_d, d, atol=1e-4, rtol=1e-5)
    groups = heads["group"].to_numpy().reshape(30, 9)
    assert np.array_equal(groups == "local", local.numpy()) and np.array_equal(groups == "global", global_.numpy())

    tokens = store.read("reasoning_tokens", run_id=result.run_id).query("variant == @variant")
    for (name, _, _), expected in zip(QUESTIONS, per_probe):
        rows = tokens[tokens["probe_id"] == name].sort_values("index")
        for column in ("waad", "fai", "fai_all", "next_entropy", "token_entropy"):
            got = torch.tensor(rows[column].to_numpy())
            torch.testing.assert_close(got, expected[column].double(), atol=1e-4, rtol=1e-4, equal_nan=True, msg=lambda m: f"{name} {column}: {m}")
        delta = (expected["waad"][:-1] - expected["waad"][1:]).abs()
        top = torch.argsort(-delta, stable=True)[: round(0.4 * len(delta))]
        assert set(np.flatnonzero(rows["is_preplan"].to_numpy())) == set(top.tolist())
        fai = expected["fai"]
        defined = torch.nonzero(~torch.isnan(fai)).flatten()
        top_fai = defined[torch.argsort(-fai[defined], stable=True)[: round(0.4 * len(defined))]]
        assert set(np.flatnonzero(rows["is_anchor"].to_numpy())) == set(top_fai.tolist())
        assert (rows["source"] == "given").all()


def test_excerpt_and_summary(census_run, reference_outputs):
    store, result, _ = census_run
    excerpt = store.read("locality_excerpt", run_id=result.run_id)
    _, attention, _ = reference_outputs[0]
    assert set(excerpt["role"]) == {"local", "global"} and set(excerpt["variant"]) == {"all", "no_sink"}
    for (layer, head), cells in excerpt.groupby(["layer", "head"]):
        expected = attention[layer, head][torch.tensor(cells["query_pos"].to_numpy()), torch.tensor(cells["key_pos"].to_numpy())]
        torch.testing.assert_close(torch.tensor(cells["attention"].to_numpy()), expected.double(), atol=1e-5, rtol=0)
    assert (excerpt["key_pos"] <= excerpt["query_pos"]).all() and excerpt["query_pos"].min() == max(0, attention.shape[-1] - 128)

    summary = store.read("summary", run_id=result.run_id).set_index("claim")
    rows = store.read("reasoning_tokens", run_id=result.run_id).query("variant == 'no_sink'")
    per_probe = rows.groupby("probe_id")
    punctuation = per_probe.apply(lambda g: g.loc[g["is_anchor"], "is_punctuation"].mean() - g["is_punctuation"].mean())
    claim = summary.loc["preplan_anchor.punctuation_share_anchors_minus_all[no_sink]"]
    assert claim["estimate"] == pytest.approx(punctuation.mean()) and claim["n"] == 2 and claim["unit"] == "probes"
    defined = rows[rows["delta_waad"].notna()]
    entropy = defined.groupby("probe_id").apply(
        lambda g: g.loc[g["is_preplan"], "next_entropy"].mean() - g.loc[~g["is_preplan"], "next_entropy"].mean())
    claim = summary.loc["preplan_anchor.next_entropy_preplan_minus_other[no_sink]"]
    assert claim["estimate"] == pytest.approx(entropy.mean()) and 0 <= claim["p_value"] <= 1
    anchors = rows[rows["is_anchor"]]
    coupled = summary.loc["preplan_anchor.coupled_share[no_sink]"]
    assert coupled["estimate"] == pytest.approx(anchors["coupled"].mean()) and coupled["ci_low"] <= coupled["estimate"] <= coupled["ci_high"]
    assert summary.loc["preplan_anchor.n_probes", "estimate"] == 2

    for name in ("preplan_anchor.token_strip", "preplan_anchor.head_map", "preplan_anchor.attention_maps"):
        figure = render(store, name, run_id=result.run_id)
        assert len(figure.data) > 0


def test_generated_responses_are_the_models_own(smollm2, eager_reference, tmp_path):
    result = lens.census(smollm2, ["preplan_anchor"], tmp_path / "store", limit=1,
                         params={"preplan_anchor": {"max_new_tokens": "8", "sink_keys": "detected"}})
    store = lens.ReportStore(tmp_path / "store")
    tokens = store.read("reasoning_tokens", run_id=result.run_id).query("variant == 'all'")
    from probes.preplan_anchor import PreplanAnchor

    probe = PreplanAnchor(smollm2, seed=0).builtin_probes()[0]
    answer = lens.generate(smollm2, smollm2.tokenize(probe["prompt"]), max_new_tokens=8, stop_at_newline=False)
    assert tokens["token"].tolist() == smollm2.token_strings(answer.answer_tokens)
    assert (tokens["source"] == "generated").all() and (tokens["probe_id"] == probe["id"]).all()
    assert result.n_forward_passes == 3  # sink detection, the analysis, the attention excerpt
    # Detected sinks: keys drawing more than sink_eps (0.05) of the response rows' attention, over every head.
    with torch.no_grad():
        attentions = eager_reference(smollm2)(answer.tokens[None], output_attentions=True).attentions
    start = answer.answer_positions.start
    share = torch.stack([a[0, :, start:] for a in attentions]).mean(dim=(0, 1, 2))
    expected = sorted({0, *torch.nonzero(share > 0.05).flatten().tolist()})
    assert set(tokens["sink_keys"]) == {",".join(map(str, expected))}


def test_bad_probe_lines(smollm2, tmp_path):
    probe_file = tmp_path / "bad.jsonl"
    probe_file.write_text(json.dumps({"prompt": "hello", "response": 3}) + "\n")
    with pytest.raises(ProbeError, match=r"bad.jsonl:1: field 'response' must be a string"):
        lens.census(smollm2, ["preplan_anchor"], tmp_path / "store", probes_file=probe_file)
    probe_file.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(ProbeError, match=r"bad.jsonl:1: missing or empty string field 'prompt'"):
        lens.census(smollm2, ["preplan_anchor"], tmp_path / "store", probes_file=probe_file)
