"""The retrieval detector on the real embedded model: fast teacher-forced scores equal the decode-time
definition and transformers' own output_attentions; the probe set; the masking test, which finds the
effect of heads planted as the top list, finds none for a random score table, and says when it cannot run."""

from __future__ import annotations

import json

import pytest
import torch

import lens
from metrics.retrieval import copy_hits, rank_heads, retrieval_credit, unigram_recall
from probes import ProbeError
from probes._base import builtin_probe_file
from probes.retrieval import PRESETS, Retrieval, RetrievalParams, ZeroHeadOutput, decode_time_scores, masking_plans, prose_paragraphs

SHORT = {"lengths": "[200]", "depths": "[0.3, 0.9]", "ablation_ks": "[5, 300]", "ablation_draws": "2", "ablation_trials": "1", "max_new_tokens": "30"}


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
        generation, credit = decode_time_scores(smollm2, tokens, span, max_new_tokens=30)
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
    # Each head's interval over the two counted trials spans its two credits' range (percentile bootstrap of a mean of 2).
    credits = torch.stack(eager_credits).view(2, 270).numpy()
    assert (frame["ci_low"].to_numpy() >= credits.min(0) - 1e-12).all() and (frame["ci_high"].to_numpy() <= credits.max(0) + 1e-12).all()
    assert (frame["ci_low"] <= frame["retrieval_score"]).all() and (frame["retrieval_score"] <= frame["ci_high"]).all()
    # Rank follows the score, ties in the seeded order the masking test uses.
    expected = rank_heads(fast, seed=0)
    assert [(r.layer, r.head) for r in frame.sort_values("rank").itertuples()] == expected


def test_census_writes_masking_test_and_claims(short_census):
    _, store, result = short_census
    scores = store.read("retrieval", run_id=result.run_id)
    ablation = store.read("retrieval_ablation", run_id=result.run_id)
    masking = store.read("retrieval_masking", run_id=result.run_id).set_index(["k_requested", "control"])
    positive = int((scores["retrieval_score"] > 0).sum())
    assert 5 < positive < 270
    # K = 300 asks for more heads than score above 0: capped, and the report says so.
    assert masking.loc[(5, "random"), "k_used"] == 5 and masking.loc[(300, "random"), "k_used"] == positive
    top5 = scores[scores["rank"] <= 5]
    expected = {f"L{l}.H{h}" for l, h in zip(top5["layer"], top5["head"])}
    at5 = ablation[ablation["k_requested"] == 5]
    assert set(at5.loc[at5["condition"] == "top", "heads"].iloc[0].split()) == expected
    top_all = set(ablation.loc[(ablation["k_requested"] == 300) & (ablation["condition"] == "top"), "heads"].iloc[0].split())
    for row in at5[at5["condition"] != "top"].itertuples():
        assert len(row.heads.split()) == 5 and not set(row.heads.split()) & top_all, "controls come from outside the top list"
    matched = at5[at5["condition"] == "layer_matched"]
    layers = sorted(h.split(".")[0] for h in expected)
    assert all(sorted(h.split(".")[0] for h in heads.split()) == layers for heads in matched["heads"])
    assert set(at5.groupby("condition")["draw"].nunique()) == {1, 2}
    # K = 300: the uniform control needs as many heads outside the top list as in it; the layer-matched one
    # cannot run where a layer has more top heads than others.
    uniform_fits = positive <= 270 - positive
    assert (masking.loc[(300, "random"), "status"] == "run") == uniform_fits
    assert uniform_fits or masking.loc[(300, "random"), "status"].startswith(f"not run: cannot draw {positive} heads")
    assert masking.loc[(300, "layer_matched"), "status"] == "run" or masking.loc[(300, "layer_matched"), "status"].startswith("not run: layer ")
    assert masking.loc[(5, "random"), "status"] == "run" and masking.loc[(5, "random"), "n_trials"] == 1
    trials = store.read("retrieval_trials", run_id=result.run_id)
    assert trials["masked"].sum() == 1 and trials.loc[trials["masked"], "exact"].all()
    summary = store.read("summary", run_id=result.run_id).set_index("claim")
    assert summary.loc["retrieval.fraction_of_heads", "estimate"] == pytest.approx(scores["is_retrieval"].mean())
    assert summary.loc["retrieval.fraction_of_heads", "n"] == 270 and summary.loc["retrieval.fraction_of_heads", "ci_low"] >= 0
    assert summary.loc["retrieval.recall_rate", "estimate"] == 1.0 and summary.loc["retrieval.recall_rate", "n"] == 2
    assert summary.loc["retrieval.masking_trials", "estimate"] == 1
    assert summary.loc["retrieval.masking_effect_k5_random", "n"] == 1
    assert ("retrieval.masking_effect_k300_random" in summary.index) == uniform_fits, "claims only for contrasts that ran"


@pytest.fixture(scope="module")
def causal_trials(smollm2):
    """Eight short needle trials, scored: the units of the planted masking tests. Six correct answers at
    least, since a sign-flip test on n trials cannot go below p = 2^(1-n) (0.031 at 6). Two control draws
    (the detector's default is 10) keep the test short."""
    params = RetrievalParams(lengths=[200], depths=[0.0, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0], needles_per_cell=1, max_new_tokens=40,
                             ablation_ks=[5], ablation_draws=2, ablation_trials=8)
    detector = Retrieval(smollm2, params, seed=3)
    for index, probe in enumerate(detector.builtin_probes()):
        for forward in detector.passes(probe, index):
            lens.capture(smollm2, forward.tokens, forward.needs)
            forward.done()
    assert sum(t.exact for t in detector.trials) >= 6, [t.generation.text for t in detector.trials]
    return detector


def test_masking_planted_retrieval_heads_shows_an_effect(causal_trials):
    # The top list is planted: five heads that copy needles on this model (measured by the census).
    scores = torch.zeros(30, 9, dtype=torch.float64)
    for rank, head in enumerate([(18, 6), (18, 7), (17, 3), (17, 4), (23, 2)]):
        scores[head] = 1.0 - 0.1 * rank
    ablation, masking, claims, masked = causal_trials.masking_test(scores)
    n = sum(t.exact for t in causal_trials.trials)
    assert len(masked) == n and (masking["status"] == "run").all()
    effect = {c.claim: c for c in claims}
    for row in masking.itertuples():
        claim = effect[f"retrieval.masking_effect_k5_{row.control}"]
        # Raw p below 0.05 (the least possible at n = 6 is 0.031); the summary's p is Holm-adjusted over both controls.
        assert claim.n == n and claim.estimate < -0.5 and claim.ci_high < 0 and row.p_value < 0.05, (claim, row.p_value)
        assert claim.p_value == pytest.approx(min(1.0, row.p_holm)) and row.p_holm >= row.p_value


def test_masking_random_score_table_shows_no_effect(causal_trials):
    scores = torch.rand(30, 9, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    ablation, masking, claims, _ = causal_trials.masking_test(scores)
    assert (masking["status"] == "run").all()
    for claim in claims[1:]:
        assert claim.n >= 6 and (claim.p_value > 0.05 or claim.ci_low <= 0 <= claim.ci_high), claim


def test_masking_is_not_run_without_a_correct_trial(smollm2, tmp_path):
    # One answer token cannot hold the needle: no trial is eligible, and the census still writes its reports.
    params = {"lengths": "[120]", "depths": "[0.5]", "max_new_tokens": "1"}
    result = lens.census(smollm2, ["retrieval"], tmp_path / "store", params={"retrieval": params})
    store = lens.ReportStore(tmp_path / "store")
    masking = store.read("retrieval_masking", run_id=result.run_id)
    assert len(masking) == 2 and masking["status"].str.startswith("not run: no unmasked answer").all() and (masking["n_trials"] == 0).all()
    assert store.read("retrieval_ablation", run_id=result.run_id).empty
    summary = store.read("summary", run_id=result.run_id).set_index("claim")
    assert summary.loc["retrieval.masking_trials", "estimate"] == 0 and "not run" in summary.loc["retrieval.masking_trials", "method"]


def test_masking_plans_cap_k_and_say_why_a_control_cannot_run():
    scores = torch.zeros(4, 3, dtype=torch.float64)
    scores[3, 0], scores[3, 1], scores[3, 2], scores[0, 0] = 0.9, 0.8, 0.7, 0.1
    plans = masking_plans(scores, rank_heads(scores, 0), [2, 10], n_draws=10, seed=0)
    assert [(p.k_requested, len(p.top)) for p in plans] == [(2, 2), (10, 4)]
    assert plans[0].top == [(3, 0), (3, 1)] and plans[0].status["random"] == "run" and len(plans[0].draws["random"]) == 10
    # Controls avoid the top list at the largest K: all four heads scoring above 0.
    assert all(not set(draw) & {(3, 0), (3, 1), (3, 2), (0, 0)} for draw in plans[0].draws["random"])
    # Layer 3 is all in the top list: no layer-matched control, and the plan says why.
    assert plans[0].status["layer_matched"] == "not run: layer 3 has 0 heads outside the top list, 2 needed"
    spread = torch.zeros(4, 3, dtype=torch.float64)
    spread[3, 0], spread[0, 0] = 0.9, 0.8
    plans = masking_plans(spread, rank_heads(spread, 0), [2], n_draws=10, seed=0)
    assert plans[0].status["layer_matched"] == "run"
    for draw in plans[0].draws["layer_matched"]:
        assert sorted(layer for layer, _ in draw) == [0, 3] and not set(draw) & {(3, 0), (0, 0)}
    assert len({tuple(draw) for draw in plans[0].draws["layer_matched"]}) > 1, "draws differ"
    assert masking_plans(torch.zeros(4, 3), rank_heads(torch.zeros(4, 3), 0), [5], 10, 0)[0].status["random"] == "not run: no head scored above 0"


def test_builtin_probes_are_real_prose_with_needles_at_sentence_boundaries(smollm2):
    params = RetrievalParams(lengths=[400, 1200], depths=[0.0, 0.25, 0.5, 0.75, 1.0])
    detector = Retrieval(smollm2, params)
    probes = detector.builtin_probes()
    assert len(probes) == 10 and {p["kind"] for p in probes} == {"fact", "number", "name", "code", "place"}
    needles = {n["needle"]: n for n in builtin_probe_file("retrieval_needles.jsonl")}
    paragraphs = set(prose_paragraphs())
    for probe in probes:
        detector.check_probe(probe, "built-in")
        sentence = needles[probe["needle"]]["sentence"]
        book = probe["prompt"][probe["prompt"].index("<book>") + 6 : probe["prompt"].index("</book>")]
        before, after = book.split(sentence)
        assert before == "" or before.endswith((". ", "! ", "? ", ") ")), before[-20:]
        assert after == "" or after.startswith((" ", "\n")), after[:20]
        # Python's own documentation, each paragraph once (the last one may be cut at a sentence).
        pieces = book.replace(sentence, "").split("\n\n")
        assert len(pieces) == len(set(pieces)) and sum(p.strip() in paragraphs for p in pieces) >= len(pieces) - 2
        n_book = len(smollm2.tokenize(book))
        assert probe["length"] - 60 <= n_book <= probe["length"] + 2
        # The last sentence end at or before the depth: sentences here run up to about 120 tokens.
        n_before = len(smollm2.tokenize(before))
        assert probe["depth"] * n_book - 130 <= n_before <= probe["depth"] * n_book + 3
    assert probes[0]["prompt"].startswith("<|im_start|>") and probes[0]["prompt"].endswith("<|im_start|>assistant\n")
    assert len({p["haystack_start"] for p in probes}) > 5, "haystacks start at seeded paragraphs"


def test_presets_and_needle_set():
    needles = builtin_probe_file("retrieval_needles.jsonl")
    kinds = [n["kind"] for n in needles]
    assert len(needles) >= 20 and all(kinds.count(k) >= 4 for k in ("fact", "number", "name", "code"))
    assert all(n["sentence"].count(n["needle"]) == 1 for n in needles)
    full = PRESETS["full"]
    assert len(full["lengths"]) * len(full["depths"]) * full["needles_per_cell"] >= 50
    quick = RetrievalParams().resolved()
    assert quick.lengths == PRESETS["quick"]["lengths"] and RetrievalParams(preset="full", lengths=[300]).resolved().lengths == [300]
    assert sum(len(p) for p in prose_paragraphs()) > 100_000


def test_batched_masked_answers_equal_each_masked_generation_from_scratch(smollm2):
    """The masking test decodes every head set of a trial as one batch after a shared unmasked prefix;
    each answer equals that head set masked alone, decoded from the first prompt token."""
    detector = Retrieval(smollm2, RetrievalParams(lengths=[150], depths=[0.5], max_new_tokens=12))
    probe = detector.builtin_probes()[0]
    for forward in detector.passes(probe, 0):
        lens.capture(smollm2, forward.tokens, forward.needs)
        forward.done()
    trial = detector.trials[0]
    n_prompt = len(trial.prompt_tokens)
    decoding = list(range(n_prompt - 1, n_prompt - 1 + 12))
    head_sets = [[(18, 6), (17, 4), (17, 3)], [], [(18, 6), (17, 4), (17, 3)], [(2, 1), (20, 5)], [(layer, head) for layer in (0, 1, 2) for head in range(9)]]
    for mask, edit in (("query", lens.ZeroQuery), ("output", ZeroHeadOutput)):
        detector.params.mask = mask
        alone = []
        for heads in head_sets:
            with lens.session(smollm2, interventions=[edit(layer, [head], decoding) for layer, head in heads]):
                alone.append(lens.generate(smollm2, trial.prompt_tokens, max_new_tokens=12).text)
        assert detector._masked_answers(trial, head_sets) == alone
        assert len(set(alone)) >= 2, f"with mask={mask}, some head set must change the answer for the comparison to mean anything"


def test_views_draw_intervals_and_say_n(short_census):
    from lens.views import render

    _, store, result = short_census
    ranked = render(store, "retrieval.ranked", run_id=result.run_id)
    assert ranked.data[0].error_y.array is not None and "n=2" in ranked.layout.title.text
    ablation = render(store, "retrieval.ablation", run_id=result.run_id)
    assert "n=1" in ablation.layout.yaxis.title.text or "n=1" in ablation.layout.title.text
    recall = render(store, "retrieval.recall_by", run_id=result.run_id)
    assert recall.data[0].error_y.array is not None and "n=2 trials" in recall.layout.title.text
    assert "n=2" in render(store, "retrieval.heatmap", run_id=result.run_id).layout.title.text
    assert "n=2 trials" in render(store, "retrieval.needle_grid", run_id=result.run_id).layout.title.text


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
    with pytest.raises(ProbeError, match="retrieval.preset='huge': Input should be 'quick' or 'full'"):
        lens.census(smollm2, ["retrieval"], tmp_path / "store", params={"retrieval": {"preset": "huge"}})
    with pytest.raises(ProbeError, match="ablation_ks"):
        lens.census(smollm2, ["retrieval"], tmp_path / "store", params={"retrieval": {"ablation_ks": "[0, 5]"}})


def test_builtin_probes_run_on_tiny_model(tiny_llama, store):
    params = {"lengths": "[80]", "depths": "[0.5]", "ablation_ks": "[2]", "ablation_draws": "2", "max_new_tokens": "5"}
    result = lens.census(tiny_llama, ["retrieval"], store, params={"retrieval": params})
    frame = store.read("retrieval", run_id=result.run_id)
    assert len(frame) == 2 * 4 and set(frame["n_trials"]) == {1}
    assert set(store.read("retrieval_masking", run_id=result.run_id)["control"]) == {"random", "layer_matched"}
