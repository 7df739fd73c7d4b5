"""The contextual detector on the real embedded model: scores against transformers' own
output_attentions, focus-direction training, the census reports and saved directions, and why a
vector added to every key changes nothing."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

import lens
from lens.views import render
from metrics.contextual import heads_mean, top_heads
from probes import ProbeError
from probes.contextual import Contextual, ContextualParams, heads_gold_mass, load_focus_directions, train_focus_directions

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
    expected = {name: torch.zeros(30, 9) for name in ("contextual_score", "distractor_score", "first_token_score")}
    for response in responses:
        tokens = torch.cat([prompt_tokens, response])
        with torch.no_grad():
            attentions = torch.stack([a[0] for a in reference(tokens[None], output_attentions=True).attentions])
        rows = attentions[:, :, len(prompt_tokens) :]  # layer head response key
        expected["contextual_score"] += rows[..., gold[0] : gold[1]].sum(-1).mean(-1) / 2
        expected["distractor_score"] += sum(rows[..., a:b].sum(-1) for a, b in distractors).mean(-1) / 2
        expected["first_token_score"] += rows[..., 0].mean(-1) / 2
    for name, values in expected.items():
        got = torch.tensor(frame[name].to_numpy(), dtype=torch.float32).view(30, 9)
        torch.testing.assert_close(got, values, atol=1e-4, rtol=0)
    best = int(expected["contextual_score"].flatten().argmax())
    assert frame["rank"].to_numpy()[best] == 1

    summary = store.read("summary", run_id=result.run_id).set_index("claim")["estimate"]
    assert "focus_skipped" in summary.index  # both probes are training probes: nothing held out
    assert store.read("focus_effect", run_id=result.run_id).empty


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


def _answered(model, params, n_probes):
    detector = Contextual(model, params, seed=0)
    probes = detector.builtin_probes()[:n_probes]
    for index, probe in enumerate(probes):
        for forward in detector.passes(detector.check_probe(probe, f"built-in {index}"), index):
            lens.capture(model, forward.tokens, forward.needs, forward.interventions)
            forward.done()
    return detector.answered


def test_focus_directions_raise_gold_mass_on_training_probes(smollm2):
    examples = _answered(smollm2, ContextualParams(n_documents=4, max_new_tokens=6), 3)
    assert len(examples) == 3
    scores = torch.stack([e.mass[0] for e in examples]).mean(0)
    heads = top_heads(scores.float(), 20)
    before = torch.stack([heads_gold_mass(smollm2, e, heads, None) for e in examples])
    # The census pass (streamed rows) and this evaluation path agree.
    torch.testing.assert_close(before.mean(-1), torch.stack([heads_mean(e.mass[0], heads) for e in examples]).float(), atol=1e-5, rtol=0)

    flags = [p.requires_grad for p in smollm2.hf.parameters()]
    focus, history = train_focus_directions(smollm2, examples, heads, epochs=3, learning_rate=0.05, generator=torch.Generator().manual_seed(0))
    assert [p.requires_grad for p in smollm2.hf.parameters()] == flags
    assert all(p.grad is None for p in smollm2.hf.parameters())
    assert focus.vectors.shape == (20, 64) and len(history) == 3
    after = torch.stack([heads_gold_mass(smollm2, e, heads, focus) for e in examples])
    assert after.mean() > before.mean() + 0.02, (before.mean().item(), after.mean().item())


def test_census_writes_reports_directions_and_views(smollm2, tmp_path):
    params = {"n_documents": "3", "n_questions": "2", "train_epochs": "1", "max_new_tokens": "6"}
    result = lens.census(smollm2, ["contextual"], tmp_path / "store", params={"contextual": params})
    store = lens.ReportStore(tmp_path / "store")
    contextual = store.read("contextual", run_id=result.run_id)
    assert len(contextual) == 270 and contextual["contextual_score"].between(0, 1).all()
    assert (contextual["contextual_score"] + contextual["distractor_score"] + contextual["first_token_score"] <= 1 + 1e-6).all()

    effect = store.read("focus_effect", run_id=result.run_id)
    assert sorted(effect["gold_position"].unique()) == [0, 1, 2]
    assert len(effect) == 6 and set(effect["n_probes"]) == {1}
    assert effect["accuracy"].between(0, 1).all() and set(effect["top_k"]) == {20} and set(effect["scale"]) == {0.25}
    path = effect["path"].iloc[0]
    assert path == f"artifacts/focus_directions/{result.run_id}.safetensors"
    focus = load_focus_directions(tmp_path / "store" / path)
    assert len(focus.heads) == 20 and focus.vectors.shape == (20, 64) and focus.scale == 0.25

    summary = store.read("summary", run_id=result.run_id).set_index("claim")["estimate"]
    base = effect[~effect["focus"]]["gold_mass_top_heads"].mean()
    assert summary["heldout_gold_mass_top_heads_base"] == pytest.approx(base)
    assert {"heldout_accuracy_base", "heldout_accuracy_focus", "focus_train_gold_mass_first_epoch"} <= set(summary.index)
    for name in ("contextual.heatmap", "contextual.accuracy_by_position", "contextual.focus_shift"):
        assert render(store, name, run_id=result.run_id).data


@pytest.mark.parametrize(
    "line, message",
    [
        ({"prompt": "Some documents.", "gold": "absent"}, "occurs 0 times"),
        ({"prompt": "a b a", "gold": "a"}, "occurs 2 times"),
        ({"prompt": "one two", "gold": "one", "distractors": ["three"]}, "occurs 0 times"),
        ({"prompt": "one two", "gold": "one", "split": "dev"}, "'split' must be one of"),
        ({"prompt": "one two", "gold": "one", "gold_position": -2}, "'gold_position'"),
        ({"prompt": "one two", "gold": "one", "response": ""}, "'response' must be"),
    ],
)
def test_bad_probe_lines_name_the_line(tiny_llama, tmp_path, line, message):
    path = _write(tmp_path / "p.jsonl", [line])
    with pytest.raises(ProbeError, match=f"p.jsonl:1: .*{message}"):
        lens.census(tiny_llama, ["contextual"], tmp_path / "store", probes_file=path)
