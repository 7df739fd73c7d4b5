"""The retrieval detector on the real embedded model: fast teacher-forced scores equal the decode-time
definition and transformers' own output_attentions; probes, masking and bad input."""

from __future__ import annotations

import json
import random

import pytest
import torch

import lens
from metrics.retrieval import copy_hits, retrieval_credit, unigram_recall
from probes import ProbeError
from probes.retrieval import Retrieval, RetrievalParams, ablation_heads, decode_time_scores

SHORT = {"lengths": "[200]", "depths": "[0.3, 0.9]", "ablation_ks": "[0, 5]", "ablation_draws": "1", "ablation_probes": "1"}


@pytest.fixture(scope="module")
def short_census(smollm2, tmp_path_factory):
    """A census over two built-in-style probes written to a probe file (the --probes-file path)."""
    detector = Retrieval(smollm2, RetrievalParams(lengths=[200], depths=[0.3, 0.9]))
    probes = detector.builtin_probes()
    path = tmp_path_factory.mktemp("retrieval") / "probes.jsonl"
    path.write_text("".join(json.dumps({"prompt": p["prompt"], "needle": p["needle"]}) + "\n" for p in probes))
    store = lens.ReportStore(path.parent / "store")
    result = lens.census(smollm2, ["retrieval"], store, probes_file=path, params={"retrieval": SHORT})
    return probes, store, result


def test_fast_scores_equal_decode_time_scores_and_output_attentions(smollm2, eager_reference, short_census):
    probes, store, result = short_census
    detector = Retrieval(smollm2)
    reference = eager_reference(smollm2)
    decode_credits, eager_credits, counted = [], [], []
    for probe in probes:
        tokens = smollm2.tokenize(probe["prompt"])
        span = detector.needle_span(probe["prompt"], probe["needle"])
        # The definition step by step: decode inside a capture session, reading each step's query row.
        generation, credit = decode_time_scores(smollm2, tokens, span, max_new_tokens=50)
        decode_credits.append(credit)
        counted.append(unigram_recall(probe["needle"], generation.text) > 0.5)
        # Ground truth: full eager attention over prompt + answer, rows that produced the answer.
        with torch.no_grad():
            attentions = reference(generation.tokens[None], output_attentions=True).attentions
        rows = list(generation.answer_positions.start - 1 + torch.arange(len(generation.answer_tokens)))
        top = torch.stack([a[0][:, rows].argmax(-1) for a in attentions])  # layer head row
        eager_credits.append(retrieval_credit(copy_hits(top, generation.answer_tokens, generation.tokens, span), span[1] - span[0]))
    assert all(counted), "the model recalls these short-haystack needles"

    trials = store.read("retrieval_trials", run_id=result.run_id).sort_values("probe")
    frame = store.read("retrieval", run_id=result.run_id).sort_values(["layer", "head"])
    assert len(frame) == 270 and set(frame["n_trials"]) == {2} and set(frame["n_counted"]) == {2}
    assert trials["counted"].all() and (trials["recall"] > 0.5).all()
    fast = torch.tensor(frame["retrieval_score"].to_numpy()).view(30, 9)
    # Exactly equal: same argmax keys at every step of every trial.
    assert torch.equal(fast, torch.stack(decode_credits).mean(0))
    assert torch.equal(fast, torch.stack(eager_credits).mean(0))
    assert fast.max() > 0.5, "some head copies most of the needle"
    assert (frame["is_retrieval"] == (frame["retrieval_score"] > 0.1)).all()
    assert sorted(frame["rank"]) == list(range(1, 271))


def test_census_writes_ablation_and_summary(short_census):
    _, store, result = short_census
    ablation = store.read("retrieval_ablation", run_id=result.run_id)
    assert set(zip(ablation["condition"], ablation["k"])) == {("top", 0), ("random", 0), ("top", 5), ("random", 5)}
    scores = store.read("retrieval", run_id=result.run_id)
    top5 = scores.nsmallest(5, "rank")
    expected = {f"L{l}.H{h}" for l, h in zip(top5["layer"], top5["head"])}
    assert set(ablation.set_index(["condition", "k"]).loc[("top", 5), "heads"].split()) == expected
    assert not expected & set(ablation.set_index(["condition", "k"]).loc[("random", 5), "heads"].split())
    assert ablation["accuracy"].between(0, 1).all() and (ablation["mask"] == "query").all() and not ablation["mask_prompt"].any()
    summary = store.read("summary", run_id=result.run_id).set_index("claim")["estimate"]
    assert summary["retrieval_heads_percent"] == pytest.approx(100 * scores["is_retrieval"].mean())
    assert summary["ablation_accuracy_k0"] == 1.0


def test_shared_prompt_cache_equals_masked_generation_from_scratch(smollm2):
    detector = Retrieval(smollm2, RetrievalParams(lengths=[150], depths=[0.5], max_new_tokens=12))
    probe = detector.builtin_probes()[0]
    tokens = detector.tokens(probe["prompt"])
    detector.trials = []
    for forward in detector.passes(probe, 0):
        lens.capture(smollm2, forward.tokens, forward.needs)
        forward.done()
    trial = detector.trials[0]
    heads = [(18, 6), (17, 4), (17, 3)]
    shared = detector._masked_answer(trial, heads, detector._prompt_cache(tokens))
    assert shared == detector._masked_answer(trial, heads)
    detector.params.mask = "output"
    assert detector._masked_answer(trial, heads, detector._prompt_cache(tokens)) == detector._masked_answer(trial, heads)


def test_builtin_probes_put_needles_at_sentence_boundaries(smollm2):
    params = RetrievalParams(lengths=[400, 1200], depths=[0.0, 0.25, 0.5, 0.75, 1.0])
    detector = Retrieval(smollm2, params)
    probes = detector.builtin_probes()
    assert len(probes) == 10 and {p["kind"] for p in probes} == {"fact", "code", "place"}
    needles = {json.dumps(n["needle"]): n for n in detector_needles()}
    previous = None
    for probe in probes:
        detector.check_probe(probe, "built-in")
        sentence = needles[json.dumps(probe["needle"])]["sentence"]
        book = probe["prompt"][probe["prompt"].index("<book>") + 6 : probe["prompt"].index("</book>")]
        before, after = book.split(sentence)
        assert before == "" or before.endswith((". ", "! ", "? ")), before[-20:]
        assert after == "" or after.startswith((" ", "\n")), after[:20]
        n_book = len(smollm2.tokenize(book))
        assert probe["length"] - 40 <= n_book <= probe["length"] + 2
        depth = len(before) / len(book)
        assert abs(depth - probe["depth"]) < 0.1
        if previous is not None and previous["length"] == probe["length"]:
            assert depth >= previous_depth
        previous, previous_depth = probe, depth
    assert probes[0]["prompt"].startswith("<|im_start|>") and probes[0]["prompt"].endswith("<|im_start|>assistant\n")


def detector_needles():
    from probes._base import builtin_probe_file

    return builtin_probe_file("retrieval_needles.jsonl")


def test_random_control_excludes_the_top_list_and_is_seeded():
    ranking = [(layer, head) for layer in range(30) for head in range(9)]
    random.Random(0).shuffle(ranking)
    conditions = ablation_heads(ranking, [0, 5, 10, 20, 30], 3, random.Random(7))
    top = set(ranking[:30])
    assert [(c, k, d) for c, k, d, _ in conditions][:2] == [("top", 0, 0), ("random", 0, 0)]
    assert len(conditions) == 2 + 4 * 4
    for condition, k, _, heads in conditions:
        assert len(set(heads)) == k
        if condition == "random":
            assert not set(heads) & top
        else:
            assert heads == ranking[:k]
    assert conditions == ablation_heads(ranking, [0, 5, 10, 20, 30], 3, random.Random(7))


def test_bad_probe_lines_name_the_line(smollm2, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "The vault code is 1234.", "needle": "1234"}) + "\n" + json.dumps({"prompt": "no needle", "needle": "1234"}) + "\n")
    with pytest.raises(ProbeError, match=rf"^{path}:2: the needle must occur exactly once"):
        lens.census(smollm2, ["retrieval"], tmp_path / "store", probes_file=path)
    path.write_text(json.dumps({"prompt": "The vault code is 1234."}) + "\n")
    with pytest.raises(ProbeError, match=rf"^{path}:1: missing or empty string field 'needle'"):
        lens.census(smollm2, ["retrieval"], tmp_path / "store", probes_file=path)
    with pytest.raises(ProbeError, match="retrieval.scoring"):
        lens.census(smollm2, ["retrieval"], tmp_path / "store", params={"retrieval": {"scoring": "fast"}})


def test_builtin_probes_run_on_tiny_model(tiny_llama, store):
    params = {"lengths": "[80]", "depths": "[0.5]", "ablation_ks": "[0, 2]", "ablation_draws": "2", "max_new_tokens": "5"}
    result = lens.census(tiny_llama, ["retrieval"], store, params={"retrieval": params})
    frame = store.read("retrieval", run_id=result.run_id)
    assert len(frame) == 2 * 4 and set(frame["n_trials"]) == {1}
    assert len(store.read("retrieval_ablation", run_id=result.run_id)) == 5  # top and random at 0, top at 2, 2 random draws
