"""The sinks detector on the real embedded model against a full cache (transformers' eager attention,
output_attentions and every layer's hidden states), and on planted tensors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import lens
from probes import ProbeError
from probes.sinks import HiddenStats, SinkParams, Sinks, calibrate_sinks, layer_ranges

PROBES = [
    "The lighthouse keeper counted the ships every evening and wrote the names of the ships in a ledger.",
    "<|im_start|>user\nName three colours of the rainbow.<|im_end|>\n<|im_start|>assistant\nRed, orange and yellow.<|im_end|>\n",
]
TAU, MIN_QUERIES, BETA = 0.1, 8, 0.4


@pytest.fixture(scope="module")
def census_run(smollm2, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sinks")
    probe_file = folder / "probes.jsonl"
    probe_file.write_text("\n".join(json.dumps({"id": f"p{i}", "text": text}) for i, text in enumerate(PROBES)) + "\n")
    result = lens.census(smollm2, ["sinks"], folder / "store", probes_file=probe_file)
    store = lens.ReportStore(folder / "store")
    return {report: store.read(report, run_id=result.run_id) for report in store_reports()} | {"runs": store.runs(run_id=result.run_id)}


def store_reports() -> list[str]:
    return [schema.name for schema in Sinks.reports] + ["summary"]


@pytest.fixture(scope="module")
def full_cache(smollm2, eager_reference):
    """Per probe: attention of every layer, every layer's output and MLP output, and all logits."""
    reference = eager_reference(smollm2)
    caches = []
    for text in PROBES:
        tokens = smollm2.tokenize(text)
        resid, mlp = {}, {}
        handles = []
        for index, layer in enumerate(reference.model.layers):
            handles.append(layer.register_forward_hook(lambda _m, _i, out, index=index: resid.__setitem__(index, (out[0] if isinstance(out, tuple) else out)[0])))
            handles.append(layer.mlp.register_forward_hook(lambda _m, _i, out, index=index: mlp.__setitem__(index, out[0])))
        try:
            with torch.no_grad():
                out = reference(tokens[None], output_attentions=True)
        finally:
            for handle in handles:
                handle.remove()
        caches.append(
            {
                "tokens": tokens,
                "attention": torch.stack([a[0] for a in out.attentions]),  # layer head query key
                "resid": torch.stack([resid[i] for i in range(len(resid))]),  # layer pos d_model
                "mlp": torch.stack([mlp[i] for i in range(len(mlp))]),
                "logits": out.logits[0],
            }
        )
    return caches


def direct_sinks(attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ACT's definition written out: mean over t >= s of A[t, s]; keys seen by >= MIN_QUERIES queries."""
    n = attention.shape[-1]
    importance = torch.stack([attention[..., s:, s].mean(-1) for s in range(n)], dim=-1)
    seen = torch.tensor([n - s >= MIN_QUERIES for s in range(n)])
    return importance, (importance > TAU) & seen


def test_sinks_census_equals_output_attentions(census_run, full_cache, smollm2):
    frame = census_run["sinks"].sort_values(["layer", "head"])
    assert len(frame) == smollm2.info.n_layers * smollm2.info.n_heads == 270
    per_prompt = torch.stack([c["attention"][..., :, 0].mean(-1) for c in full_cache])  # prompt layer head
    first4 = sum(c["attention"][..., :, :4].sum(-1).mean(-1) for c in full_cache) / len(PROBES)
    got = torch.tensor(frame["sink_score"].to_numpy(), dtype=torch.float32).view(30, 9)
    torch.testing.assert_close(got, per_prompt.mean(0), atol=1e-4, rtol=0)
    got4 = torch.tensor(frame["sink_mass_first4"].to_numpy(), dtype=torch.float32).view(30, 9)
    torch.testing.assert_close(got4, first4, atol=1e-4, rtol=0)
    # Per head: the percent of prompts over eps (thresholded per prompt), and a sink on most prompts.
    clear = ((per_prompt - 0.3).abs() > 1e-4).all(0)
    rate = (per_prompt > 0.3).double().mean(0) * 100
    got_rate = torch.tensor(frame["sink_rate"].to_numpy()).view(30, 9)
    assert torch.equal(got_rate[clear], rate[clear])
    assert (frame["is_sink"] == (frame["sink_rate"] > 50)).all()
    # The interval over the two prompts holds the mean and lies within the prompts' range.
    assert (frame["ci_low"] <= frame["sink_score"] + 1e-9).all() and (frame["sink_score"] <= frame["ci_high"] + 1e-9).all()
    low = torch.tensor(frame["ci_low"].to_numpy(), dtype=torch.float32).view(30, 9)
    assert (low >= per_prompt.min(0).values - 1e-4).all()
    assert set(frame["n_prompts"]) == {2} and set(frame["n_tokens"]) == {0} and set(frame["first_token"]) <= {"The", "<|im_start|>"}

    # Sink_1^0.3: the indicator over (prompt, layer, head), thresholded per prompt (Gu et al.'s reference).
    summary = census_run["summary"].set_index("claim")
    row = summary.loc["sinks.sink_rate"]
    assert row["estimate"] == pytest.approx(100.0 * (per_prompt > 0.3).double().mean().item(), abs=0.4)
    assert row["n"] == 2 and row["unit"] == "probes" and row["ci_low"] <= row["estimate"] <= row["ci_high"]

    runs = census_run["runs"]
    assert runs.loc[0, "model_fingerprint"] == smollm2.info.fingerprint
    assert json.loads(runs.loc[0, "params"]) == SinkParams().__dict__
    assert "torch" in json.loads(runs.loc[0, "versions"])
    # SmolLM2's tokenizer adds no BOS, so the default policy adds none.
    assert (runs.loc[0, "bos"], runs.loc[0, "bos_added"]) == ("auto", False)


def test_sink_tokens_equal_direct_importance(census_run, full_cache, smollm2):
    frame = census_run["sink_tokens"]
    for index, cache in enumerate(full_cache):
        importance, mask = direct_sinks(cache["attention"])
        rows = frame[frame["probe"] == f"p{index}"]
        got = torch.zeros_like(mask)
        index_of_rows = tuple(torch.as_tensor(rows[c].to_numpy().copy()) for c in ("layer", "head", "position"))
        got[index_of_rows] = True
        # Scores within 1e-4 of tau may fall either way between two float32 implementations.
        clear = (importance - TAU).abs() > 1e-4
        assert torch.equal(got & clear, mask & clear)
        scores = importance[index_of_rows]
        torch.testing.assert_close(torch.tensor(rows["score"].to_numpy(), dtype=torch.float32), scores, atol=1e-4, rtol=0)
        n = len(cache["tokens"])
        assert (rows["n_queries"] == n - rows["position"]).all() and (rows["n_queries"] >= MIN_QUERIES).all()
        lowest = rows.groupby(["layer", "head"])["position"].transform("min")
        assert (rows["is_first"] == (rows["position"] == lowest)).all()
        assert (rows["token"] == [smollm2.token_strings(cache["tokens"])[p] for p in rows["position"]]).all()
        # The phenomenon itself: the first token is most heads' first sink, and later sinks exist.
        assert (rows[rows["is_first"]]["position"] == 0).mean() > 0.8
        assert (~rows["is_first"]).sum() > 0


def test_secondary_sinks_equal_direct_hidden_states(census_run, full_cache, smollm2):
    frame = census_run["secondary_sinks"]
    n_layers = smollm2.info.n_layers
    for index, cache in enumerate(full_cache):
        resid, mlp = cache["resid"], cache["mlp"]
        norms = resid.norm(dim=-1)
        active = norms[:, 0] > 2.0 * norms.median(dim=1).values
        cosine = torch.nn.functional.cosine_similarity(resid, resid[:, :1], dim=-1)
        aligned = (cosine.abs() > 0.9) & active[:, None]
        rows = frame[frame["probe"] == f"p{index}"].set_index("position")
        expected_positions = [p for p in range(resid.shape[1]) if aligned[:, p].any()]
        assert rows.index.tolist() == expected_positions
        assert set(rows["active_layers"]) == {layer_ranges(active.nonzero().flatten().tolist())}
        for position in expected_positions:
            layers = aligned[:, position].nonzero().flatten()
            row = rows.loc[position]
            assert (row["formation_layer"], row["last_layer"], row["lifetime"]) == (layers[0], layers[-1], len(layers))
            formed = int(layers[0])
            assert row["mlp_norm"] == pytest.approx(float(mlp[formed, position].norm()), rel=1e-4)
            assert row["mlp_norm_ratio"] == pytest.approx(float(mlp[formed, position].norm() / mlp[formed].norm(dim=-1).median()), rel=1e-4)
            assert row["mean_abs_cos"] == pytest.approx(float(cosine[layers, position].abs().mean()), abs=1e-4)
            by_lifetime = "primary" if len(layers) >= 0.625 * n_layers else "noise" if len(layers) <= 0.1 * n_layers else "secondary"
            expected_label = "primary" if position == 0 else by_lifetime
            assert row["label"] == expected_label
    # SmolLM2 forms secondary sinks on later tokens ("the", "user") in its early layers.
    assert (frame[frame["position"] > 0]["label"] == "secondary").sum() >= 2
    assert (frame[frame["position"] == 0]["label"] == "primary").all()


def test_massive_activations_equal_direct_hidden_states(census_run, full_cache):
    frame = census_run["massive_activations"]
    sinks = census_run["sink_tokens"]
    for index, cache in enumerate(full_cache):
        resid = cache["resid"]
        rows = frame[frame["probe"] == f"p{index}"].sort_values(["layer", "rank"])
        flat = resid.flatten(1)
        top = flat.abs().topk(3, dim=-1)
        median = flat.abs().median(dim=-1).values
        torch.testing.assert_close(
            torch.tensor(rows["value"].to_numpy(), dtype=torch.float32).view(-1, 3).abs(), top.values, rtol=1e-4, atol=1e-3
        )
        assert rows["position"].tolist() == (top.indices // resid.shape[-1]).flatten().tolist()
        assert rows["channel"].tolist() == (top.indices % resid.shape[-1]).flatten().tolist()
        torch.testing.assert_close(torch.tensor(rows["median"].to_numpy(), dtype=torch.float32)[::3], median, rtol=1e-4, atol=1e-6)
        magnitude = top.values.flatten()
        expected = (magnitude > 100) & (magnitude > 1000 * median.repeat_interleave(3))
        assert rows["is_massive"].tolist() == expected.tolist()
        sink_positions = set(sinks[sinks["probe"] == f"p{index}"]["position"])
        assert rows["on_sink_token"].tolist() == [p in sink_positions for p in rows["position"]]
    # SmolLM2: from layer 11 the first token carries an entry above 10^4 in one channel.
    assert frame[(frame["layer"] == 15) & (frame["rank"] == 1)]["is_massive"].all()


def _act_reference_attention(targets: dict[tuple[int, int], list[int]], beta: float):
    """Eager attention with ACT's edit written out, for an independent forward pass."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
        n = query.shape[2]
        scores = (query @ key.transpose(-1, -2)) * scaling
        scores = scores.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool)), float("-inf"))
        probs = scores.float().softmax(-1)
        for (layer, head), sinks in targets.items():
            if layer != module.layer_idx:
                continue
            row = probs[0, head]
            is_sink = torch.zeros(n, dtype=torch.bool)
            is_sink[sinks] = True
            sink_mass = (row * is_sink).sum(-1, keepdim=True)
            rest = row * ~is_sink
            probs[0, head] = row * is_sink * beta + rest + (1 - beta) * sink_mass * rest / rest.sum(-1, keepdim=True)
        return (probs.to(value.dtype) @ value).transpose(1, 2).contiguous(), probs

    return attention


def test_calibration_equals_eager_forward_with_act_edit(census_run, full_cache, smollm2, eager_reference):
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    frame = census_run["sink_calibration"].set_index("probe")
    sinks = census_run["sink_tokens"]
    reference = eager_reference(smollm2)
    assert len(frame) == len(PROBES)
    for index, cache in enumerate(full_cache):
        tokens, logits = cache["tokens"], cache["logits"]
        row = frame.loc[f"p{index}"]
        before = torch.nn.functional.cross_entropy(logits[:-1], tokens[1:]).item()
        assert row["before"] == pytest.approx(before, abs=1e-4)

        hidden = sinks[(sinks["probe"] == f"p{index}") & ~sinks["is_first"]]
        targets: dict[tuple[int, int], list[int]] = {}
        for layer, head, position in hidden[["layer", "head", "position"]].itertuples(index=False):
            targets.setdefault((layer, head), []).append(position)
        assert row["heads"] == " ".join(f"{layer}.{head}" for layer, head in sorted(targets))
        assert (row["n_heads"], row["n_sinks"], row["beta"]) == (len(targets), len(hidden), BETA)

        AttentionInterface.register("act_reference", _act_reference_attention(targets, BETA))
        ALL_MASK_ATTENTION_FUNCTIONS.register("act_reference", sdpa_mask)
        reference.config._attn_implementation = "act_reference"
        try:
            with torch.no_grad():
                calibrated = reference(tokens[None]).logits[0]
        finally:
            reference.config._attn_implementation = "eager"
        after = torch.nn.functional.cross_entropy(calibrated[:-1], tokens[1:]).item()
        assert row["after"] == pytest.approx(after, abs=1e-4)
        assert row["change"] == pytest.approx(after - before, abs=1e-4)
        assert abs(after - before) > 1e-3  # the edit changes the model


def test_calibration_python_api_takes_a_metric_and_a_head_set(smollm2, full_cache):
    def last_token_loss(logits, tokens):
        return float(torch.nn.functional.cross_entropy(logits[-2:-1], tokens[-1:]))

    cache = full_cache[0]
    everything = calibrate_sinks(smollm2, [PROBES[0]], metric=last_token_loss)
    assert everything.loc[0, "metric"] == "last_token_loss"
    direct = torch.nn.functional.cross_entropy(cache["logits"][-2:-1], cache["tokens"][-1:]).item()
    assert everything.loc[0, "before"] == pytest.approx(direct, abs=1e-4)
    chosen = everything.loc[0, "heads"].split()[:2]
    heads = [tuple(int(x) for x in name.split(".")) for name in chosen]
    restricted = calibrate_sinks(smollm2, [PROBES[0]], metric=last_token_loss, heads=heads, beta=0.0)
    assert restricted.loc[0, "heads"].split() == chosen and restricted.loc[0, "beta"] == 0.0
    assert restricted.loc[0, "before"] == pytest.approx(everything.loc[0, "before"], abs=1e-6)


def test_planted_sinks_are_found_by_the_detector(tiny_llama):
    """Plant a first-token sink, a later-token sink, an aligned hidden state and a massive activation
    in the detector's per-probe reductions and read them back from its reports."""
    detector = Sinks(tiny_llama, SinkParams(top_k=2))
    n_layers, n_heads = tiny_llama.info.n_layers, tiny_llama.info.n_heads
    tokens = tiny_llama.tokenize("one two three four five six seven eight nine ten eleven twelve")
    n = len(tokens)
    assert n >= 12
    probs = torch.zeros(n_layers, n_heads, n, n)
    probs[..., 0] = 1.0  # every head: all attention on the first token
    probs[1, 1, 4:] *= 0.5  # layer 1 head 1: half of every row from 4 on to position 3
    probs[1, 1, 4:, 3] += 0.5
    received = probs.sum(dim=-2)

    torch.manual_seed(0)
    hidden = HiddenStats(n_layers, n, top_k=2)
    d_model = tiny_llama.info.d_model
    for layer in range(n_layers):
        h = torch.randn(1, n, d_model)
        h[0, 0] *= 10.0  # a raised first token in every layer
        h[0, 0, 5] = 5000.0  # a massive activation on it
        if layer == 1:
            h[0, 3] = -0.5 * h[0, 0]  # position 3 aligned with the first token in layer 1 only
        hidden.resid_post(layer, h)
        hidden.mlp_out(layer, torch.ones(1, n, d_model) * (1 + torch.arange(n)[None, :, None]))

    targets = detector._reduce("planted", tokens, received, hidden)
    reports = {r.type: r.frame for r in detector.finish()}
    found = reports["sink_tokens"]
    assert set(found[found["is_first"]]["position"]) == {0}
    hidden_sinks = found[~found["is_first"]]
    assert [(1, 1, 3)] == [tuple(r) for r in hidden_sinks[["layer", "head", "position"]].to_numpy()]
    assert targets == {(1, 1): [3]}
    secondary = reports["secondary_sinks"].set_index("position")
    assert secondary.loc[3, "formation_layer"] == 1 and secondary.loc[3, "lifetime"] == 1
    assert secondary.loc[3, "mlp_norm"] == pytest.approx(4 * d_model**0.5)
    assert secondary.loc[3, "is_attention_sink"] and secondary.loc[0, "lifetime"] == n_layers
    massive = reports["massive_activations"]
    top = massive[massive["rank"] == 1]
    assert (top["position"] == 0).all() and (top["channel"] == 5).all() and top["is_massive"].all()
    assert top["on_sink_token"].all() and top["on_first_token"].all()
    second = massive[massive["rank"] == 2].set_index("layer")
    assert second.loc[1, "position"] == 3 and second.loc[1, "is_massive"] and second.loc[1, "on_sink_token"]
    assert not second.drop(index=1)["is_massive"].any()
    summary = reports["summary"].set_index("claim")["estimate"]
    assert summary["sinks.hidden_sinks_per_probe"] == 1 and summary["sinks.hidden_sink_tokens_per_probe"] == 1
    assert summary["sinks.massive_activations_per_probe"] == n_layers + 1


def test_sink_rate_thresholds_each_probe_before_averaging(tiny_llama):
    """Two planted probes: on the first every head puts all attention on the first token (importance 1),
    on the second attention is uniform (importance of the first token about 0.26 < 0.3). Gu et al. count
    each head on one probe of two: 50%. Thresholding the mean importance (0.63) would say 100%."""
    detector = Sinks(tiny_llama, SinkParams(calibrate=False))
    n_layers, n_heads = tiny_llama.info.n_layers, tiny_llama.info.n_heads
    tokens = tiny_llama.tokenize("one two three four five six seven eight nine ten eleven twelve")
    n = len(tokens)
    sink = torch.zeros(n_layers, n_heads, n, n)
    sink[..., 0] = 1.0
    uniform = (torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]).expand(n_layers, n_heads, n, n)
    for index, probs in enumerate((sink, uniform)):
        hidden = HiddenStats(n_layers, n, top_k=2)
        for layer in range(n_layers):
            hidden.resid_post(layer, torch.randn(1, n, tiny_llama.info.d_model, generator=torch.Generator().manual_seed(layer)))
            hidden.mlp_out(layer, torch.ones(1, n, tiny_llama.info.d_model))
        detector._reduce(f"p{index}", tokens, probs.sum(dim=-2), hidden)
    reports = {r.type: r.frame for r in detector.finish()}
    uniform_first = float(uniform[0, 0, :, 0].mean())
    assert uniform_first < 0.3 < (1 + uniform_first) / 2
    heads = reports["sinks"]
    assert heads["sink_score"].to_numpy() == pytest.approx((1 + uniform_first) / 2)
    assert (heads["sink_rate"] == 50.0).all() and not heads["is_sink"].any()
    assert heads["ci_low"].to_numpy() == pytest.approx(uniform_first) and heads["ci_high"].to_numpy() == pytest.approx(1.0)
    claim = reports["summary"].set_index("claim").loc["sinks.sink_rate"]
    assert claim["estimate"] == 50.0 and (claim["ci_low"], claim["ci_high"]) == (0.0, 100.0) and claim["n"] == 2


def test_builtin_sinks_probes_run_on_tiny_model(tiny_llama, store):
    result = lens.census(tiny_llama, ["sinks"], store, limit=2)
    frame = store.read("sinks", run_id=result.run_id)
    assert len(frame) == 2 * 4 and frame["sink_score"].between(0, 1).all()
    for report in store_reports():
        assert isinstance(store.read(report, run_id=result.run_id), pd.DataFrame)


def test_bad_active_rule_is_one_clear_error(tiny_llama, store):
    with pytest.raises(ProbeError, match="active_rule"):
        lens.census(tiny_llama, ["sinks"], store, limit=1, params={"sinks": {"active_rule": "median"}})


def test_token_strip_and_lifetime_views_show_the_stored_rows(census_run):
    import numpy as np

    from lens.views import VIEWS

    tokens, secondary = census_run["sink_tokens"], census_run["secondary_sinks"]
    strip = VIEWS["sinks.token_strip"].make({"sink_tokens": tokens, "secondary_sinks": secondary})
    probe = tokens[~tokens["is_first"]].groupby("probe").size().idxmax()
    assert strip.layout.title.text.endswith(f"probe {probe}")
    rows = tokens[tokens["probe"] == probe]
    z = np.asarray(strip.data[0].z, dtype=float)
    positions = [int(label.split()[0]) for label in strip.data[0].x]
    for (position, layer), count in rows.groupby(["position", "layer"]).size().items():
        assert z[layer, positions.index(position)] == count
    assert np.nansum(z) == len(rows)

    lifetime = VIEWS["sinks.secondary_lifetime"].make({"secondary_sinks": secondary})
    spans: dict[str, float] = {}
    for trace in lifetime.data:
        for name, width in zip(trace.y, trace.x):
            spans[name] = spans.get(name, 0) + width
    for row in secondary.itertuples(index=False):
        covered = spans[f"{row.probe} {row.position} {row.token!r}"]
        # The first token is aligned in every active layer; a later token may skip some inside its span.
        assert covered == row.lifetime if row.position == 0 else covered >= row.lifetime
    assert {trace.name for trace in lifetime.data} == set(secondary["label"])


def test_top_heads_view_draws_each_heads_interval_and_says_n(census_run):
    from lens.views import VIEWS

    sinks = census_run["sinks"]
    fig = VIEWS["sinks.top_heads"].make({"sinks": sinks})
    shown = sinks.sort_values("sink_score", ascending=False, kind="stable").head(20)
    bars = fig.data[0]
    assert list(bars.y) == pytest.approx(shown["sink_score"].tolist())
    assert list(bars.error_y.array) == pytest.approx((shown["ci_high"] - shown["sink_score"]).tolist())
    assert list(bars.error_y.arrayminus) == pytest.approx((shown["sink_score"] - shown["ci_low"]).tolist())
    assert "n=2 probes" in fig.layout.title.text
    assert "n=2 probes" in VIEWS["sinks.heatmap"].make({"sinks": sinks}).layout.title.text


def test_gemma_gets_its_bos_and_the_papers_protocol_equals_output_attentions(eager_reference, tmp_path):
    """Gemma 3 is trained with <bos>: by default (bos="auto") every probe starts with it, and with the
    paper's protocol (first 64 tokens) Sink_1^0.3 equals Gu et al.'s computation from output_attentions.
    Without BOS (the old default) the first-token sink rate collapses."""
    gemma = lens.load("gemma3-270m")
    texts = [p["text"] for p in Sinks(gemma, SinkParams(probe_set="full")).builtin_probes()[:2]]
    probes = {"sinks": [{"id": f"g{i}", "text": text} for i, text in enumerate(texts)]}
    params = {"sinks": {"n_tokens": "64", "calibrate": "false"}}
    store = lens.ReportStore(tmp_path / "store")
    rates = {}
    for bos in ("auto", "never"):
        run = lens.census(gemma, ["sinks"], store, probes=probes, params=params, bos=bos).run_id
        rates[bos] = store.read("summary", run_id=run).set_index("claim").loc["sinks.sink_rate", "estimate"]
        if bos == "auto":
            frame = store.read("sinks", run_id=run).sort_values(["layer", "head"])
            manifest = store.runs(run_id=run).iloc[0]
    assert (manifest["bos"], manifest["bos_token"], manifest["bos_added"]) == ("auto", "<bos>", True)
    assert set(frame["first_token"]) == {"<bos>"} and set(frame["n_tokens"]) == {64}

    reference = eager_reference(gemma)
    per_prompt = []
    for text in texts:
        tokens = gemma.tokenize(text, bos="auto")[:64]
        assert tokens[0] == gemma.tokenizer.bos_token_id and len(tokens) == 64
        with torch.no_grad():
            attentions = reference(tokens[None], output_attentions=True).attentions
        weights = torch.stack([a[0] for a in attentions])  # layer head query key
        # eval_sink_open_source.py: importance = sum over queries of A / (T - k); threshold per sample.
        ratios = torch.arange(64, 0, -1, dtype=weights.dtype)
        per_prompt.append((weights / ratios[None, None, None, :]).sum(dim=-2)[..., 0])
    per_prompt = torch.stack(per_prompt)
    n_layers, n_heads = gemma.info.n_layers, gemma.info.n_heads
    got = torch.tensor(frame["sink_score"].to_numpy(), dtype=torch.float32).view(n_layers, n_heads)
    torch.testing.assert_close(got, per_prompt.mean(0), atol=1e-4, rtol=0)
    assert rates["auto"] == pytest.approx(100.0 * (per_prompt > 0.3).double().mean().item(), abs=100.0 / per_prompt.numel())
    assert rates["auto"] > 10.0 and rates["auto"] > rates["never"] + 10.0
