"""The contextual detector: scores against transformers' own output_attentions, the built-in probe set
and its question-level splits, frozen-input focus training (against the whole model, and its early
stop on a planted case), the census reports, saved directions and views, a held-out effect that can
come out null, and why a vector added to every key changes nothing."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import lens
from lens.views import render
from metrics.contextual import focused_set_mass, span_keys, top_heads
from metrics.uncertainty import paired_difference
from probes import ProbeError
from probes.contextual import (
    SPLITS,
    Contextual,
    ContextualParams,
    FocusDirections,
    FrozenRows,
    assign_splits,
    contains_answer,
    heads_gold_mass,
    heldout_effect,
    load_focus_directions,
    train_focus_directions,
)

GOLD = "The Velmor Bridge was designed by Ines Okri."
DISTRACTORS = ["The Tanzol is a cargo ship. Its captain is Hugo Dusk.", "Brakri is a jazz band. Its singer is Yara Quist."]
USER = "Answer using the documents.\n" + "\n".join([DISTRACTORS[0], GOLD, DISTRACTORS[1]]) + "\nQuestion: Who designed the Velmor Bridge?"


def _write(path, probes):
    path.write_text("".join(json.dumps(p) + "\n" for p in probes))
    return path


def _span(model, prompt: str, text: str) -> tuple[int, int]:
    """Token span of ``text`` from the token counts of the prompt's prefixes (texts start and end at line breaks)."""
    start = prompt.index(text)
    first, last = len(model.tokenize(prompt[:start])), len(model.tokenize(prompt[: start + len(text)]))
    assert model.tokenize(prompt)[:last].tolist() == model.tokenize(prompt[: start + len(text)]).tolist()
    return first, last


def test_scores_equal_output_attentions(smollm2, eager_reference, tmp_path):
    prompt = lens.chat_prompt(smollm2, USER)
    probes = [
        {"prompt": prompt, "gold": GOLD, "distractors": DISTRACTORS, "response": "Ines Okri designed it.", "split": "train"},
        {"prompt": prompt, "gold": GOLD, "distractors": DISTRACTORS, "answer": "Ines Okri", "split": "train"},
    ]
    params = {"max_new_tokens": "8"}
    result = lens.census(smollm2, ["contextual"], tmp_path / "store", probes_file=_write(tmp_path / "p.jsonl", probes), params={"contextual": params})
    store = lens.ReportStore(tmp_path / "store")
    frame = store.read("contextual", run_id=result.run_id).sort_values(["layer", "head"])
    assert len(frame) == 270 and set(frame["n_probes"]) == {2}

    reference = eager_reference(smollm2)
    prompt_tokens = smollm2.tokenize(prompt)
    responses = [smollm2.tokenize(probes[0]["response"]), lens.generate(smollm2, prompt_tokens, max_new_tokens=8).answer_tokens]
    gold = _span(smollm2, prompt, GOLD)
    distractors = [_span(smollm2, prompt, d) for d in DISTRACTORS]
    per_probe = []
    expected = {name: torch.zeros(30, 9) for name in ("contextual_score", "distractor_score", "first_tokens_score")}
    for response in responses:
        tokens = torch.cat([prompt_tokens, response])
        with torch.no_grad():
            attentions = torch.stack([a[0] for a in reference(tokens[None], output_attentions=True).attentions])
        rows = attentions[:, :, len(prompt_tokens) :]  # layer head response key
        per_probe.append(rows[..., gold[0] : gold[1]].sum(-1).mean(-1))
        expected["contextual_score"] += per_probe[-1] / 2
        expected["distractor_score"] += sum(rows[..., a:b].sum(-1) for a, b in distractors).mean(-1) / 2
        expected["first_tokens_score"] += rows[..., 0:2].sum(-1).mean(-1) / 2  # the reference's first tokens: keys 0 and 1
    for name, values in expected.items():
        got = torch.tensor(frame[name].to_numpy(), dtype=torch.float32).view(30, 9)
        torch.testing.assert_close(got, values, atol=1e-4, rtol=0)
    best = int(expected["contextual_score"].flatten().argmax())
    assert frame["rank"].to_numpy()[best] == 1
    # Two probes: each head's bootstrap interval lies between its two per-probe scores.
    low, high = torch.stack(per_probe).min(0).values.flatten(), torch.stack(per_probe).max(0).values.flatten()
    assert (torch.tensor(frame["ci_low"].to_numpy()) >= low - 1e-4).all() and (torch.tensor(frame["ci_high"].to_numpy()) <= high + 1e-4).all()

    summary = store.read("summary", run_id=result.run_id).set_index("claim")
    assert "contextual.focus_skipped" in summary.index  # both probes are training probes: nothing held out
    top = summary.loc["contextual.top_head_score"]
    assert top["n"] == 2 and top["estimate"] == pytest.approx(float(expected["contextual_score"].max()), abs=1e-4)
    assert store.read("focus_effect", run_id=result.run_id).empty and store.read("contextual_training", run_id=result.run_id).empty


@dataclass
class AddToEveryKey(lens.Intervention):
    """Adds ``vectors[kv_head]`` to every key of a layer (the reference's key directions)."""

    layer: int
    vectors: torch.Tensor

    def edit_key(self, key, positions):
        return key + self.vectors[None, :, None, :].to(key)


def test_vector_added_to_every_key_changes_nothing_on_the_real_model(smollm2):
    tokens = smollm2.tokenize(lens.chat_prompt(smollm2, USER))
    generator = torch.Generator().manual_seed(0)
    vectors = [4.0 * torch.randn(smollm2.info.n_kv_heads, smollm2.info.d_head, generator=generator) for _ in range(smollm2.info.n_layers)]

    def run(interventions):
        seen, logits = {}, []
        need = lens.AttentionRows(lambda block: seen.__setitem__(block.layer, block.probs.clone()), positions=[-3, -2, -1])
        lens.capture(smollm2, tokens, [need, lens.Logits(logits.append)], interventions)
        return torch.stack([seen[layer] for layer in range(smollm2.info.n_layers)]), logits[0]

    plain_probs, plain_logits = run([])
    key_probs, key_logits = run([AddToEveryKey(layer, vectors[layer]) for layer in range(smollm2.info.n_layers)])
    torch.testing.assert_close(key_probs, plain_probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(key_logits, plain_logits, atol=1e-3, rtol=1e-4)
    # The same vectors on the queries move attention: the comparison above could fail.
    on_queries = [lens.AddToQuery(layer, list(range(9)), vectors[layer].repeat_interleave(3, 0)) for layer in range(smollm2.info.n_layers)]
    query_probs, _ = run(on_queries)
    assert (query_probs - plain_probs).abs().max() > 0.1


# -- probes and splits ---------------------------------------------------------------------------

def test_builtin_probes_put_every_question_at_every_position_and_hold_out_whole_questions(smollm2):
    detector = Contextual(smollm2, ContextualParams(n_questions=0, n_documents=6, gold_positions="all"), seed=3)
    probes = detector.builtin_probes()
    assert len(probes) == 48 * 6
    by_question = {}
    for probe in probes:
        by_question.setdefault(probe["question"], []).append(probe)
        assert probe["prompt"].count(probe["gold"]) == 1 and len(probe["distractors"]) == 5
        assert contains_answer(probe["gold"], probe["answer"]) and not any(contains_answer(d, probe["answer"]) for d in probe["distractors"])
        assert probe["gold_prompt"].count(probe["gold"]) == 1 and not any(d in probe["gold_prompt"] for d in probe["distractors"])
    assert len(by_question) == 48
    for question, group in by_question.items():
        assert sorted(p["gold_position"] for p in group) == list(range(6))
        assert len({p["split"] for p in group}) == 1  # a question never straddles splits
        for probe in group:  # the gold document is the (position + 1)-th listed
            assert probe["prompt"].index(f"Document [{probe['gold_position'] + 1}](Title: {question})") >= 0
    splits = {question: group[0]["split"] for question, group in by_question.items()}
    assert [sum(s == name for s in splits.values()) for name in SPLITS] == [16, 8, 24]
    # No held-out fact is read while training: held-out gold documents appear in no other split's prompt.
    held_out = {group[0]["gold"] for group in by_question.values() if group[0]["split"] == "test"}
    assert not any(d in held_out for p in probes if p["split"] != "test" for d in p["distractors"])
    # The quick default keeps the proportions and the paper's grid.
    quick = Contextual(smollm2, ContextualParams(), seed=3).builtin_probes()
    assert len(quick) == 8 * 5 and sorted({p["gold_position"] for p in quick}) == [0, 1, 3, 5, 7]
    assert [sum(p["split"] == name for p in quick) for name in SPLITS] == [15, 5, 20]


def test_assign_splits_keeps_given_splits_and_carves_a_validation_group():
    groups = ["a", "a", "b", "c", "c", "d", "e", "f"]
    splits = assign_splits(groups, {"a": "test", "b": "train", "c": "train", "d": "train"}, seed=0)
    assert splits["a"] == "test" and set(splits) == set(groups) and "validation" in splits.values()
    assert sum(s == "validation" for s in splits.values()) >= 1
    assert assign_splits(groups, {g: "validation" if g == "b" else "train" for g in groups}, seed=0)["b"] == "validation"
    assert assign_splits(groups, {}, seed=1) == assign_splits(groups, {}, seed=1)


# -- training on frozen inputs -------------------------------------------------------------------

def _rows(probs, keys, gold):
    return FrozenRows(torch.tensor(probs)[None, None], torch.tensor(keys, dtype=torch.float32)[None], torch.ones(1), span_keys(len(probs), [gold]))


def test_training_stops_when_the_validation_loss_turns():
    # Training pushes the direction towards +e0 (the gold key) and away from e1, e2. On the validation
    # probe the gold key is e0 but a rare distractor is 2 e0: its gold mass first rises, then falls
    # once the distractor takes over. Training must stop `patience` epochs after the best epoch and
    # keep the directions of that epoch.
    train = [_rows([0.2, 0.4, 0.4], torch.eye(3).tolist(), (0, 1))]
    validation = [_rows([0.3, 0.001, 0.699], [[1, 0, 0], [2, 0, 0], [0, 1, -1]], (0, 1))]
    vectors, curve, kept = train_focus_directions(train, validation, learning_rate=0.25, max_epochs=100, patience=3, generator=torch.Generator().manual_seed(0))
    losses = [epoch.validation_loss for epoch in curve]
    assert curve[-1].epoch == kept + 3 < 100
    assert 0 < kept and kept == int(np.argmin(losses)) and losses[-1] > losses[kept]
    assert validation[0].loss(vectors).item() == pytest.approx(losses[kept])
    assert [epoch.step for epoch in curve] == list(range(len(curve)))  # one training probe: one step an epoch


def test_training_runs_to_the_cap_while_the_validation_loss_falls():
    train = [_rows([0.2, 0.4, 0.4], torch.eye(3).tolist(), (0, 1))]
    vectors, curve, kept = train_focus_directions(train, train, learning_rate=0.05, max_epochs=6, patience=2, generator=torch.Generator().manual_seed(0))
    assert len(curve) == 7 and kept == 6
    assert curve[-1].validation_loss < curve[0].validation_loss - 0.05
    assert vectors[0, 0] > 0 and (vectors[0, 1:] < 0).all()  # towards the gold key


def _answered(model, params, probes):
    detector = Contextual(model, params, seed=0)
    for index, probe in enumerate(probes):
        for forward in detector.passes(detector.check_probe(probe, f"probe {index}"), index):
            lens.capture(model, forward.tokens, forward.needs, forward.interventions)
            forward.done()
    return detector


def test_frozen_rows_predict_the_model_with_directions_on_one_layer(smollm2):
    """Training reads the unmodified model's rows and keys; applied to one layer only (whose inputs
    the directions cannot change), the trained objective equals what the whole model then does."""
    prompt = lens.chat_prompt(smollm2, USER)
    detector = _answered(smollm2, ContextualParams(max_new_tokens=6), [{"prompt": prompt, "gold": GOLD, "distractors": DISTRACTORS}])
    example = detector.answered[0]
    heads = [(17, 3), (17, 5), (8, 0)]
    rows = detector._frozen_rows(example, heads)
    assert rows.probs.shape == (3, len(example.response_positions), len(example.tokens))
    directions = 0.5 * torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    predicted = focused_set_mass(rows.probs, rows.keys, directions, rows.scaling, rows.gold).mean(-1)
    # Before any direction, the frozen rows hold the census pass's own masses.
    torch.testing.assert_close(focused_set_mass(rows.probs, rows.keys, torch.zeros(3, 64), rows.scaling, rows.gold).mean(-1).double(),
                               heads_gold_mass(smollm2, example, heads), atol=1e-5, rtol=0)
    one_layer = FocusDirections(heads[:2], directions[:2])
    measured = heads_gold_mass(smollm2, example, heads[:2], one_layer.interventions())
    torch.testing.assert_close(predicted[:2].double(), measured, atol=1e-4, rtol=0)
    assert (measured - heads_gold_mass(smollm2, example, heads[:2])).abs().max() > 0.01  # the direction did move attention


# -- the census ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_census(smollm2, tmp_path_factory):
    store = lens.ReportStore(tmp_path_factory.mktemp("contextual") / "store")
    params = {"n_questions": "6", "n_documents": "3", "max_new_tokens": "6", "scale_sweep": "0.5"}
    result = lens.census(smollm2, ["contextual"], store, params={"contextual": params})
    return store, result.run_id


def test_census_writes_reports_training_curve_directions_and_views(small_census):
    store, run_id = small_census
    contextual = store.read("contextual", run_id=run_id)
    assert len(contextual) == 270 and contextual["contextual_score"].between(0, 1).all() and set(contextual["n_probes"]) == {18}
    assert (contextual["ci_low"] <= contextual["contextual_score"] + 1e-9).all() and (contextual["contextual_score"] <= contextual["ci_high"] + 1e-9).all()
    assert (contextual["contextual_score"] + contextual["distractor_score"] + contextual["first_tokens_score"] <= 1 + 1e-6).all()

    training = store.read("contextual_training", run_id=run_id).sort_values("epoch")
    assert training["epoch"].tolist() == list(range(len(training))) and training["kept"].sum() == 1
    kept = int(training.loc[training["kept"], "epoch"].iloc[0])
    assert training["validation_loss"].min() == training.loc[training["kept"], "validation_loss"].iloc[0]
    assert len(training) - 1 in (kept + 5, 200)  # stopped by patience, or at the cap
    # 6 questions: 3 held out, 2 train, 1 validates (3 positions each).
    assert set(training["n_train"]) == {6} and set(training["n_validation"]) == {3}

    effect = store.read("focus_effect", run_id=run_id)
    assert sorted(effect["scale"].unique()) == [0.0, 0.5, 1.0]
    assert sorted(effect["gold_position"].unique()) == [-1, 0, 1, 2]
    pooled = effect[effect["gold_position"] == -1].set_index("scale")
    assert set(pooled["n_probes"]) == {9} and set(effect.loc[effect["gold_position"] >= 0, "n_probes"]) == {3}
    assert (effect["accuracy_ci_low"] <= effect["accuracy"]).all() and (effect["accuracy"] <= effect["accuracy_ci_high"]).all()
    path = effect["path"].iloc[0]
    assert path == f"artifacts/focus_directions/{run_id}.safetensors"
    focus = load_focus_directions(store.path / path)
    assert len(focus.heads) == 20 and focus.vectors.shape == (20, 64)

    summary = store.read("summary", run_id=run_id).set_index("claim")
    gold = summary.loc["contextual.focus_effect_gold_mass"]
    assert gold["n"] == 9 and gold["unit"] == "held-out probes"
    assert gold["estimate"] == pytest.approx(pooled.loc[1.0, "gold_mass_top_heads"] - pooled.loc[0.0, "gold_mass_top_heads"])
    accuracy = summary.loc["contextual.focus_effect_accuracy"]
    assert accuracy["estimate"] == pytest.approx(pooled.loc[1.0, "accuracy"] - pooled.loc[0.0, "accuracy"])
    assert summary.loc["contextual.heldout_gold_mass", "estimate"] == pytest.approx(pooled.loc[0.0, "gold_mass_top_heads"])
    assert "Holm" in summary.loc["contextual.focus_effect_gold_mass_scale_0.5", "method"]
    assert summary.loc["contextual.top_head_score", "n"] == 18
    for name in ("contextual.heatmap", "contextual.top_heads", "contextual.accuracy_by_position", "contextual.focus_shift",
                 "contextual.training", "contextual.scale_sweep"):
        assert render(store, name, run_id=run_id).data


def test_random_directions_of_the_same_norm_give_no_significant_effect(smollm2, small_census):
    """The held-out effect test can come out null: directions of the trained norms pointing at random
    change neither the top heads' gold attention nor the accuracy significantly (paired permutation
    p > 0.05), where the trained directions' test, run the same way, gives p < 0.01 on the gold mass."""
    store, run_id = small_census
    trained = load_focus_directions(store.path / store.read("focus_effect", run_id=run_id)["path"].iloc[0])
    probes = Contextual(smollm2, ContextualParams(n_questions=6, n_documents=3, max_new_tokens=6), seed=0).builtin_probes()
    detector = _answered(smollm2, ContextualParams(n_documents=3, max_new_tokens=6), [p for p in probes if p["split"] == "test"])
    test = detector.answered
    control = trained.random_like(torch.Generator().manual_seed(1))
    torch.testing.assert_close(control.vectors.norm(dim=-1), trained.vectors.norm(dim=-1))
    mass, correct = heldout_effect(smollm2, test, control, 1.0, max_new_tokens=6)
    base_mass = np.array([heads_gold_mass(smollm2, a, control.heads).mean().item() for a in test])
    base_correct = np.array([float(a.correct) for a in test])
    assert paired_difference(mass, base_mass).p_value > 0.05
    assert paired_difference(correct, base_correct).p_value > 0.05


@pytest.mark.parametrize(
    "line, message",
    [
        ({"prompt": "Some documents.", "gold": "absent"}, "occurs 0 times"),
        ({"prompt": "a b a", "gold": "a"}, "occurs 2 times"),
        ({"prompt": "one two", "gold": "one", "distractors": ["three"]}, "occurs 0 times"),
        ({"prompt": "one two", "gold": "one", "split": "dev"}, "'split' must be one of"),
        ({"prompt": "one two", "gold": "one", "gold_position": -2}, "'gold_position'"),
        ({"prompt": "one two", "gold": "one", "response": ""}, "'response' must be"),
        ({"prompt": "one two", "gold": "one", "question": 3}, "'question' must be"),
    ],
)
def test_bad_probe_lines_name_the_line(tiny_llama, tmp_path, line, message):
    path = _write(tmp_path / "p.jsonl", [line])
    with pytest.raises(ProbeError, match=f"p.jsonl:1: .*{message}"):
        lens.census(tiny_llama, ["contextual"], tmp_path / "store", probes_file=path)


def test_bad_parameters_are_one_line_errors(tiny_llama, tmp_path):
    for params, message in [({"gold_positions": "some"}, "gold_positions"), ({"n_questions": "99"}, "n_questions"), ({"scale_sweep": "a,b"}, "scale_sweep")]:
        with pytest.raises(ProbeError, match=message):
            lens.census(tiny_llama, ["contextual"], tmp_path / "store", params={"contextual": {"n_documents": "3", **params}}, limit=0)
