"""Preplan and anchor tokens in the model's own reasoning, read from local and global heads.

Source: "Attention Illuminates LLM Reasoning: The Preplan-and-Anchor Rhythm Enables Fine-Grained Policy
Optimization" (2025); definitions in metrics/preplan_anchor.py. Per probe the model answers a reasoning
question (or a given response is read as is); one teacher-forced pass over prompt + response R yields,
for every head, reductions of length |R| (distance, WAAD and FAI sums). After the last probe the heads
are grouped by their mean distance d over all response tokens (bottom / top ``share``: local / global)
and each probe's WAAD (local heads) and FAI (global heads) are formed from those reductions. Memory is
O(probes x heads x |R|); no head's full pattern is ever held.

Two variants, reported side by side (column ``variant``):
- ``all``: attention as it is. In small models heads that park attention on the first token get
  d ~ t and land in the global group, which then measures the sink rather than long-range reference;
- ``no_sink``: the sink keys (the first token, or with ``sink_keys=detected`` every key that draws
  more than ``sink_eps`` of the response's attention on average) are removed from every attention row
  and the row renormalised before d, WAAD and FAI are formed: where heads look when not at the sink.

Labels per response: preplan tokens are the top ``preplan_share`` by |WAAD_t - WAAD_{t+1}|, anchors the
top ``anchor_share`` by FAI; an anchor is coupled when a preplan token precedes or coincides with it
within ``coupling_k`` tokens. Locally dominated anchors (the paper's threshold left open): anchors whose
WAAD is at or below the response's ``local_waad_quantile`` (median) and that follow a preplan token by
1..``coupling_k`` tokens.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from torch import Tensor

from lens._capture.needs import AttentionBlock, AttentionRows, Logits
from lens._generate import chat_prompt, generate
from lens._store.schema import HEAD, LAYER, Column, ReportSchema
from lens._store.store import Report
from metrics import preplan_anchor as pa
from probes._base import Claim, Detector, ForwardPass, PaperClaim, Params, ProbeError, builtin_probe_file, register, summary_report
from probes._overview import OKABE_ITO, OverviewLabel, OverviewScore, Rows

VARIANTS = ("all", "no_sink")

HEAD_LOCALITY = ReportSchema(
    "head_locality",
    "Mean backward attention distance d per head over the responses, and its local/global group.",
    (
        Column("variant", "string", "'all' (attention as is) or 'no_sink' (sink keys removed, rows renormalised)"),
        LAYER,
        HEAD,
        Column("mean_distance", "float64", "d: mean over response tokens t of sum_s A[t,s]*(t-s)"),
        Column("group", "string", "'local' (bottom share by d), 'global' (top share), 'middle', or 'excluded' (outside the middle layers when restricted)"),
        Column("first_token_attention", "float64", "mean over response tokens of A[t,0], raw attention (shows sink heads)"),
        Column("share", "float64", "share of the eligible heads in each group"),
        Column("n_tokens", "int64", "response tokens averaged over"),
    ),
)

REASONING_TOKENS = ReportSchema(
    "reasoning_tokens",
    "WAAD, FAI and preplan/anchor labels of every response token.",
    (
        Column("probe_id", "string", "probe identifier"),
        Column("variant", "string", "'all' or 'no_sink' (which heads and attention formed the values)"),
        Column("position", "int64", "token position in prompt + response"),
        Column("index", "int64", "position within the response, from 0"),
        Column("token", "string", "the token's text"),
        Column("waad", "float64", "WAAD_t = sum_s A_loc[t,s]*min(t-s, W), A_loc the mean over local heads"),
        Column("delta_waad", "float64", "|WAAD_t - WAAD_{t+1}| (NaN for the last token)", nullable=True),
        Column("fai", "float64", "FAI over the window lo <= t-s <= hi, t in the response (NaN where no t falls inside)", nullable=True),
        Column("fai_all", "float64", "FAI over every later response token (NaN for the last token)", nullable=True),
        Column("is_preplan", "bool", "top preplan_share of the response by delta_waad"),
        Column("is_anchor", "bool", "top anchor_share of the response by FAI (the anchor_fai column)"),
        Column("coupled", "bool", "anchor with a preplan token 0..coupling_k tokens before it"),
        Column("locally_dominated", "bool", "anchor with WAAD <= the response's local_waad_quantile, 1..coupling_k tokens after a preplan token"),
        Column("is_punctuation", "bool", "the token's text is punctuation only (spaces aside)"),
        Column("next_entropy", "float64", "entropy (nats) of the next-token distribution at this position"),
        Column("token_entropy", "float64", "entropy (nats) of the distribution this token was drawn from"),
        Column("source", "string", "'generated' (the model's own answer) or 'given' (response from the probe file)"),
        Column("sink_keys", "string", "positions the no_sink variant removed for this probe, comma-separated"),
    ),
)

LOCALITY_EXCERPT = ReportSchema(
    "locality_excerpt",
    "Raw attention of the most local and the most global head of the first probe, on a window of its trace.",
    (
        Column("probe_id", "string", "probe identifier"),
        Column("variant", "string", "the variant whose d chose the head"),
        Column("role", "string", "'local' (smallest d on this probe) or 'global' (largest d)"),
        LAYER,
        HEAD,
        Column("query_pos", "int64", "query position (the last excerpt_size positions of the trace)"),
        Column("key_pos", "int64", "key position: the window's positions, plus the first token"),
        Column("attention", "float64", "raw post-softmax attention A[query_pos, key_pos]"),
    ),
)


@dataclass
class PreplanAnchorParams(Params):
    n_probes: Annotated[int, Field(ge=1)] = 4
    max_new_tokens: Annotated[int, Field(ge=2)] = 150
    temperature: Annotated[float, Field(ge=0)] = 0.0  # 0: greedy; > 0: sampling seeded by the run's seed and the probe index
    share: Annotated[float, Field(gt=0, le=0.5)] = 0.3
    middle_layers: bool = False
    window: Annotated[int, Field(ge=1)] = 10
    fai_lo: Annotated[int, Field(ge=1)] = 10
    fai_hi: Annotated[int, Field(ge=1)] = 100
    anchor_fai: Literal["window", "all"] = "window"  # "window" (fai) or "all" (fai_all, every later token)
    preplan_share: Annotated[float, Field(gt=0, le=1)] = 0.4
    anchor_share: Annotated[float, Field(gt=0, le=1)] = 0.4
    coupling_k: Annotated[int, Field(ge=0)] = 3
    local_waad_quantile: Annotated[float, Field(ge=0, le=1)] = 0.5
    sink_keys: Literal["first", "detected"] = "first"
    sink_eps: Annotated[float, Field(gt=0, lt=1)] = 0.05
    excerpt_size: Annotated[int, Field(ge=1)] = 128


@dataclass
class Trace:
    """One probe's response and its per-head reductions (per variant: [layer, head, |R|])."""

    probe_id: str
    source: str
    start: int  # first response position
    tokens: list[str]
    sinks: list[int]  # keys the no_sink variant removes
    distance: dict[str, Tensor] = field(default_factory=dict)
    waad: dict[str, Tensor] = field(default_factory=dict)
    fai: dict[str, Tensor] = field(default_factory=dict)
    fai_all: dict[str, Tensor] = field(default_factory=dict)
    first_token: Tensor | None = None
    next_entropy: Tensor | None = None
    token_entropy: Tensor | None = None


def is_punctuation(text: str) -> bool:
    stripped = text.strip()
    return bool(stripped) and all(unicodedata.category(ch).startswith("P") for ch in stripped)


def common_prefix(a: Tensor, b: Tensor) -> int:
    n = min(len(a), len(b))
    differs = torch.nonzero(a[:n] != b[:n])
    return int(differs[0]) if len(differs) else n


# Local heads in a lighter shade of the detector's colour, global heads in it.
LOCALITY_COLORS = {"global": OKABE_ITO["bluish_green"], "local": "#8FD3BF"}
# The rows of head_locality the overview reads: attention as is (not with the sink removed).
ALL_ATTENTION = Rows("variant", "all")


@register
class PreplanAnchor(Detector):
    name = "preplan_anchor"
    description = "local/global heads, WAAD and FAI over the model's reasoning: preplan and anchor tokens"
    reports = (HEAD_LOCALITY, REASONING_TOKENS, LOCALITY_EXCERPT)
    probe_fields = ("prompt",)
    prompt_field = "prompt"
    # The paper's effects as directions (it gives no numbers these claims can be set against).
    paper_claims = {
        "preplan_anchor.lift_within_*": PaperClaim(
            "Attention Illuminates LLM Reasoning (2025): FAI peaks (anchors) follow or coincide with WAAD peaks (preplan tokens)",
            null=1.0, direction="above",
        ),
        "preplan_anchor.token_entropy_preplan_minus_other*": PaperClaim(
            "Attention Illuminates LLM Reasoning (2025): token entropy is higher at WAAD peaks", null=0.0, direction="above",
        ),
        "preplan_anchor.punctuation_share_anchors_minus_all*": PaperClaim(
            "Attention Illuminates LLM Reasoning (2025): punctuation tends to get high FAI", null=0.0, direction="above",
        ),
    }
    ParamsType = PreplanAnchorParams
    color = OKABE_ITO["bluish_green"]
    overview_labels = tuple(
        OverviewLabel(group, "head_locality", "group", symbol, (-0.22, -0.2), equals=group, color=LOCALITY_COLORS[group], rows=ALL_ATTENTION)
        for group, symbol in (("local", "triangle-down"), ("global", "triangle-up"))
    )
    overview_scores = (OverviewScore("mean_distance", "head_locality", "mean_distance", rows=ALL_ATTENTION),)
    presets = {"full": {"n_probes": "26"}}  # every problem template once
    accumulates = ("traces", "excerpt", "n_skipped")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.traces: list[Trace] = []
        self.excerpt: pd.DataFrame | None = None
        self.n_skipped = 0

    # -- probes ---------------------------------------------------------------------------------
    def builtin_probes(self) -> list[dict]:
        """``n_probes`` problems: the templates in order, cycled with fresh numbers past the last one
        (numbers drawn from the run's seed)."""
        templates = builtin_probe_file("preplan_problems.jsonl")
        probes = []
        for index in range(self.params.n_probes):
            template = templates[index % len(templates)]
            numbers = {"a": self.rng.randint(12, 48), "b": self.rng.randint(2, 11), "c": self.rng.randint(3, 19)}
            question = template["template"].format(**numbers)
            draw = index // len(templates)
            probes.append({"id": template["id"] + (f"-{draw + 1}" if draw else ""), "prompt": chat_prompt(self.model, question)})
        return probes

    def check_probe(self, probe, where: str) -> dict:
        if not isinstance(probe, dict):
            raise ProbeError(f"{where}: expected a JSON object, got {type(probe).__name__}")
        if not isinstance(probe.get("prompt"), str) or not probe["prompt"]:
            raise ProbeError(f"{where}: missing or empty string field 'prompt' (the preplan_anchor detector needs 'prompt', optionally 'response')")
        if "response" not in probe:
            self.model.check_length(len(self.tokens(probe["prompt"])) + self.extra_tokens(), what=f"{where}: prompt plus answer")
            return probe
        if not isinstance(probe["response"], str):
            raise ProbeError(f"{where}: field 'response' must be a string")
        full, prompt = self.tokens(probe["prompt"] + probe["response"]), self.tokens(probe["prompt"])
        if len(full) - common_prefix(full, prompt) < 2:
            raise ProbeError(f"{where}: the response has fewer than 2 tokens")
        self.model.check_length(len(full), what=f"{where}: prompt plus response")
        return probe

    def extra_tokens(self) -> int:
        return self.params.max_new_tokens

    def _response(self, probe: dict, index: int) -> tuple[Tensor, int, str]:
        """Tokens of prompt + response, the first response position, and where the response came from."""
        if "response" in probe:
            full = self.tokens(probe["prompt"] + probe["response"])
            return full, common_prefix(full, self.tokens(probe["prompt"])), "given"
        params = self.params
        answer = generate(
            self.model, self.tokens(probe["prompt"]), max_new_tokens=params.max_new_tokens, stop_at_newline=False,
            temperature=params.temperature, seed=self.seed + index,
        )
        return answer.tokens, answer.answer_positions.start, "generated"

    # -- running --------------------------------------------------------------------------------
    def passes(self, probe: dict, index: int):
        tokens, start, source = self._response(probe, index)
        if len(tokens) - start < 2:
            self.n_skipped += 1
            return
        response = list(range(start, len(tokens)))
        sinks = torch.tensor([0])
        if self.params.sink_keys == "detected":
            received = torch.zeros(len(tokens), dtype=torch.float64)

            def receive(block: AttentionBlock) -> None:
                received[: block.n_keys] += block.probs[0].sum(dim=(0, 1)).double().cpu()

            yield ForwardPass(tokens, [AttentionRows(receive, positions=response)])
            share = received / (self.model.info.n_layers * self.model.info.n_heads * len(response))
            sinks = torch.unique(torch.cat([sinks, torch.nonzero(share > self.params.sink_eps).flatten()]))

        trace = Trace(str(probe.get("id", f"probe-{index + 1}")), source, start, self.model.token_strings(tokens[start:]), sinks.tolist())
        needs, finalize = self._reductions(trace, response, sinks)
        yield ForwardPass(tokens, needs, done=lambda: (finalize(), self.traces.append(trace)))
        if index == 0:  # the excerpt view shows the first probe
            yield self._excerpt_pass(trace, tokens)

    def _reductions(self, trace: Trace, response: list[int], sinks: Tensor):
        """Needs that fill ``trace`` with per-head reductions over the response rows, and the step that
        turns the logits into entropies once the pass is done."""
        info, params, device = self.model.info, self.params, self.model.device
        n = len(response)
        keys = torch.tensor(response, device=device)
        dropped = {"all": None, "no_sink": sinks.to(device)}
        # Reductions stay on the model's device during the pass and move to the CPU in finalize.
        for variant in VARIANTS:
            trace.distance[variant] = torch.zeros(info.n_layers, info.n_heads, dtype=torch.float64, device=device)
            for reduction in (trace.waad, trace.fai, trace.fai_all):
                reduction[variant] = torch.zeros(info.n_layers, info.n_heads, n, device=device)
        trace.first_token = torch.zeros(info.n_layers, info.n_heads, dtype=torch.float64, device=device)

        def reduce(block: AttentionBlock) -> None:
            probs, positions, layer = block.probs[0].float(), block.positions, block.layer
            rows = positions - trace.start
            trace.first_token[layer] += probs[..., 0].sum(dim=-1).double()
            for variant, keys_out in dropped.items():
                kept = probs if keys_out is None else pa.drop_keys(probs, keys_out)
                trace.distance[variant][layer] += pa.attention_distance(kept, positions).sum(dim=-1).double()
                trace.waad[variant][layer][:, rows] = pa.windowed_distance(kept, positions, params.window)
                trace.fai[variant][layer] += pa.future_influence_sums(kept, positions, keys, params.fai_lo, params.fai_hi)
                trace.fai_all[variant][layer] += pa.future_influence_sums(kept, positions, keys, 1, None)

        logits: list[Tensor] = []
        # Logits at start-1 .. end-1: position p predicts token p + 1.
        needs = [AttentionRows(reduce, positions=response), Logits(logits.append, positions=[p - 1 for p in response] + [response[-1]])]

        def finalize() -> None:
            for reduction in (trace.distance, trace.waad, trace.fai, trace.fai_all):
                for variant in VARIANTS:
                    reduction[variant] = reduction[variant].cpu()
            trace.first_token = trace.first_token.cpu()
            entropies = pa.entropy(logits[0][0]).float().cpu()
            trace.token_entropy, trace.next_entropy = entropies[:-1], entropies[1:]
            logits.clear()

        return needs, finalize

    def _excerpt_pass(self, trace: Trace, tokens: Tensor) -> ForwardPass:
        """A pass for the raw attention of the most local and most global head of this probe (per variant)
        on the last ``excerpt_size`` positions, plus the first token as a key."""
        n_rows = len(trace.tokens)
        eligible = self._eligible()
        chosen: dict[tuple[int, int], list[tuple[str, str]]] = {}
        for variant in VARIANTS:
            distance = (trace.distance[variant] / n_rows).float().masked_fill(~eligible, float("nan"))
            flat = distance.flatten()
            for role, index in (("local", int(torch.argmin(flat.nan_to_num(float("inf"))))), ("global", int(torch.argmax(flat.nan_to_num(float("-inf")))))):
                chosen.setdefault(divmod(index, distance.shape[1]), []).append((variant, role))
        window_start = max(0, len(tokens) - self.params.excerpt_size)
        positions = list(range(window_start, len(tokens)))
        rows: list[pd.DataFrame] = []

        def keep(block: AttentionBlock) -> None:
            key_positions = torch.tensor(sorted({0, *range(window_start, block.n_keys)}))
            for (layer, head), labels in chosen.items():
                if layer != block.layer:
                    continue
                values = block.probs[0, head][:, key_positions.to(block.probs.device)].cpu()
                query, key = torch.meshgrid(block.positions.cpu(), key_positions, indexing="ij")
                causal = (key <= query).flatten()
                for variant, role in labels:
                    rows.append(pd.DataFrame({
                        "probe_id": trace.probe_id, "variant": variant, "role": role, "layer": layer, "head": head,
                        "query_pos": query.flatten()[causal].numpy(), "key_pos": key.flatten()[causal].numpy(),
                        "attention": values.flatten()[causal].double().numpy(),
                    }))

        def done() -> None:
            self.excerpt = pd.concat(rows, ignore_index=True)

        layers = sorted({layer for layer, _ in chosen})
        return ForwardPass(tokens, [AttentionRows(keep, positions=positions, layers=layers)], done=done)

    def _eligible(self) -> Tensor:
        n_layers, n_heads = self.model.info.n_layers, self.model.info.n_heads
        eligible = torch.ones(n_layers, n_heads, dtype=torch.bool)
        if self.params.middle_layers:
            layer = torch.arange(n_layers)[:, None].expand(n_layers, n_heads)
            eligible = (layer >= n_layers // 3) & (layer < 2 * n_layers // 3)
        return eligible

    # -- reports --------------------------------------------------------------------------------
    def finish(self) -> list[Report]:
        params, info = self.params, self.model.info
        n_tokens = sum(len(t.tokens) for t in self.traces)
        eligible = self._eligible()
        locality, token_frames, summary = [], [], []
        for variant in VARIANTS:
            if not self.traces:
                break
            distance = (sum(t.distance[variant] for t in self.traces) / n_tokens).float()
            local, global_ = pa.head_groups(distance, params.share, eligible)
            first_token = (sum(t.first_token for t in self.traces) / n_tokens).float()
            group = pd.Series(["middle"] * distance.numel())
            group[~eligible.flatten().numpy()] = "excluded"
            group[local.flatten().numpy()] = "local"
            group[global_.flatten().numpy()] = "global"
            layer, head = torch.meshgrid(torch.arange(info.n_layers), torch.arange(info.n_heads), indexing="ij")
            locality.append(pd.DataFrame({
                "variant": variant, "layer": layer.flatten().numpy(), "head": head.flatten().numpy(),
                "mean_distance": distance.flatten().double().numpy(), "group": group.to_numpy(),
                "first_token_attention": first_token.flatten().double().numpy(), "share": params.share, "n_tokens": n_tokens,
            }))
            frames = [self._token_frame(trace, variant, local, global_) for trace in self.traces]
            token_frames += frames
            summary += self._summary(variant, pd.concat(frames, ignore_index=True), local, global_)
        reports = [
            Report("head_locality", pd.concat(locality, ignore_index=True) if locality else HEAD_LOCALITY.empty_rows()),
            Report("reasoning_tokens", pd.concat(token_frames, ignore_index=True) if token_frames else REASONING_TOKENS.empty_rows()),
            Report("locality_excerpt", self.excerpt if self.excerpt is not None else LOCALITY_EXCERPT.empty_rows()),
        ]
        summary.append(Claim.count(f"{self.name}.n_probes", len(self.traces), "probes", f"responses analysed ({self.n_skipped} skipped: fewer than 2 response tokens)"))
        summary.append(Claim.count(f"{self.name}.n_response_tokens", n_tokens, "tokens", "response tokens over all probes"))
        # A statistic undefined on this run (e.g. no anchors in responses shorter than the FAI window) is left out.
        return [*reports, summary_report([claim for claim in summary if not math.isnan(claim.estimate)])]

    def _token_frame(self, trace: Trace, variant: str, local: Tensor, global_: Tensor) -> pd.DataFrame:
        params = self.params
        n = len(trace.tokens)
        positions = torch.arange(trace.start, trace.start + n)
        waad = trace.waad[variant][local].mean(dim=0)
        fai = trace.fai[variant][global_].mean(dim=0) / pa.future_counts(positions, positions, params.fai_lo, params.fai_hi)
        fai_all = trace.fai_all[variant][global_].mean(dim=0) / pa.future_counts(positions, positions, 1, None)
        delta = pa.waad_change(waad)
        is_preplan = pa.top_share(delta, params.preplan_share)
        is_anchor = pa.top_share(fai if params.anchor_fai == "window" else fai_all, params.anchor_share)
        coupled = is_anchor & pa.preceded_within(is_preplan, params.coupling_k)
        dominated = pa.locally_dominated(is_anchor, is_preplan, waad, params.coupling_k, params.local_waad_quantile)
        return pd.DataFrame({
            "probe_id": trace.probe_id, "variant": variant, "position": positions.numpy(), "index": range(n), "token": trace.tokens,
            "waad": waad.double().numpy(), "delta_waad": delta.double().numpy(), "fai": fai.double().numpy(), "fai_all": fai_all.double().numpy(),
            "is_preplan": is_preplan.numpy(), "is_anchor": is_anchor.numpy(), "coupled": coupled.numpy(), "locally_dominated": dominated.numpy(),
            "is_punctuation": [is_punctuation(t) for t in trace.tokens],
            "next_entropy": trace.next_entropy.double().numpy(), "token_entropy": trace.token_entropy.double().numpy(), "source": trace.source,
            "sink_keys": ",".join(map(str, trace.sinks)),
        })

    def _summary(self, variant: str, tokens: pd.DataFrame, local: Tensor, global_: Tensor) -> list[Claim]:
        """The paper's descriptive statistics. The probe (one response) is the sampling unit: pooled
        ratios get a cluster bootstrap over probes, contrasts a paired difference per probe."""
        params, seed = self.params, self.seed
        responses = [group for _, group in tokens.groupby("probe_id", sort=False)]

        def name(what: str) -> str:
            return f"{self.name}.{what}[{variant}]"

        def column(group: pd.DataFrame, label: str) -> Tensor:
            return torch.tensor(group[label].to_numpy())

        def per_probe(count) -> np.ndarray:
            return np.array([float(count(group)) for group in responses])

        def share(claim: str, part, whole, detail: str) -> Claim:
            """Pooled share sum(part) / sum(whole), resampling probes."""
            return Claim.pooled(claim, pa.ratio_of_sums, (per_probe(part), per_probe(whole)), "probes", detail, seed=seed)

        def anchor(group):
            return column(group, "is_anchor")

        claims = []
        for k in range(1, params.coupling_k + 1):
            claims.append(self._lift(name(f"lift_within_{k}"), responses, lambda m, k=k: pa.preceded_within(m, k),
                                     f"P(anchor | preplan 0..{k} tokens before) / P(anchor); 1 = no coupling"))
        for k in range(0, params.coupling_k + 1):
            claims.append(self._lift(name(f"lift_at_{k}"), responses, lambda m, k=k: pa.preceded_at(m, k),
                                     f"P(anchor | preplan exactly {k} tokens before) / P(anchor); 1 = no coupling"))
        for label, what in (("next_entropy", "next-token entropy (nats) at the token"), ("token_entropy", "entropy (nats) of the distribution the token came from")):
            at_peak, elsewhere = [], []
            for group in responses:
                defined = group["delta_waad"].notna().to_numpy()
                preplan = group["is_preplan"].to_numpy()
                at_peak.append(group.loc[preplan & defined, label].mean())
                elsewhere.append(group.loc[~preplan & defined, label].mean())
            claims.append(Claim.paired(name(f"{label}_preplan_minus_other"), at_peak, elsewhere, "probes",
                                       f"mean {what} at preplan tokens (WAAD peaks) minus at other tokens, per response", seed=seed))
        claims += [
            Claim.paired(name("punctuation_share_anchors_minus_all"),
                         per_probe(lambda g: column(g, "is_punctuation")[anchor(g)].double().mean()),
                         per_probe(lambda g: column(g, "is_punctuation").double().mean()), "probes",
                         "share of anchors that are punctuation minus share of all response tokens, per response", seed=seed),
            share(name("coupled_share"), lambda g: column(g, "coupled").sum(), lambda g: anchor(g).sum(),
                  f"share of anchors with a preplan token 0..{params.coupling_k} before"),
            share(name("locally_dominated_share"), lambda g: column(g, "locally_dominated").sum(), lambda g: anchor(g).sum(),
                  f"share of anchors with WAAD <= quantile {params.local_waad_quantile:g} of the response, 1..{params.coupling_k} after a preplan token"),
            share(name("fai_mean_anchors"), lambda g: g.loc[g["is_anchor"], "fai" if params.anchor_fai == "window" else "fai_all"].sum(),
                  lambda g: anchor(g).sum(), "mean FAI of anchor tokens"),
        ]
        for group_name, heads in (("local", local), ("global", global_)):
            claims.append(Claim.pooled(
                name(f"d_{group_name}"), pa.ratio_of_sums,
                (np.array([float(t.distance[variant][heads].mean()) for t in self.traces]), np.array([len(t.tokens) for t in self.traces], dtype=float)),
                "probes", f"mean d of the {int(heads.sum())} {group_name} heads (share {params.share:g})", seed=seed,
            ))
        claims.append(Claim.pooled(
            name("first_token_attention_global"), pa.ratio_of_sums,
            (np.array([float(t.first_token[global_].mean()) for t in self.traces]), np.array([len(t.tokens) for t in self.traces], dtype=float)),
            "probes", "mean raw attention of the global heads on the first token", seed=seed,
        ))
        return claims

    def _lift(self, claim: str, responses: list[pd.DataFrame], condition, detail: str) -> Claim:
        """Lift pooled over every response token, with responses resampled (windows never cross probes)."""
        both, given, anchors, total = (np.zeros(len(responses)) for _ in range(4))
        for i, group in enumerate(responses):
            anchor = torch.tensor(group["is_anchor"].to_numpy())
            cond = condition(torch.tensor(group["is_preplan"].to_numpy()))
            both[i], given[i], anchors[i], total[i] = int((anchor & cond).sum()), int(cond.sum()), int(anchor.sum()), len(group)
        return Claim.pooled(claim, pa.pooled_lift, (both, given, anchors, total), "probes", detail, seed=self.seed)
