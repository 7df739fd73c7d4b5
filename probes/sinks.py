"""Attention sinks: first-token, hidden later-token and secondary sinks, massive activations, calibration.

One forward pass per probe collects, reduced layer by layer inside the pass:
- attention received by every key, summed over all query rows (``AttentionRows``);
- per layer, the hidden-state norm of every position, its cosine with the first token, the largest
  residual entries and the median magnitude (``Residual("resid_post")``), and the MLP output norms
  (``Residual("mlp_out")``);
- the next-token loss before calibration, from logits streamed a chunk of positions at a time
  (``LogitChunks``; a custom metric gets all the logits at once).

Reports:
- ``sinks``: per head, the first token's importance (mean over queries of A[t, 0]) averaged over prompts
  with its bootstrap interval over prompts, and the percent of prompts where it exceeds eps (0.3).
  Sink_1^eps (Gu et al. 2025) thresholds each prompt first, then averages the indicator over prompts,
  layers and heads (``summary``: ``sinks.sink_rate``, interval by bootstrap over prompts).
- ``sink_tokens``: ACT's token-level sinks, importance sum_t A[t, s] / (T - s) > tau (0.1), keys seen by
  at least ``min_queries`` queries; the first detected sink of each head is marked ``is_first``.
- ``secondary_sinks``: positions whose hidden state is aligned (|cos| > 0.9) with the first token's in
  layers where the first token's norm is raised (Wong et al.), labelled by lifetime.
- ``massive_activations``: the largest residual entries per layer (Sun et al. 2024).
- ``sink_calibration``: ACT's calibration. A second pass per probe scales, in every head where this
  probe has sinks other than the first, the attention to those sinks by beta (0.4) and gives the mass
  back to the other keys (``lens.ScaleSinks``); the metric (default: next-token loss) before and after.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from pydantic import Field
from torch import Tensor

from lens._capture.interventions import ScaleSinks
from lens._capture.needs import AttentionBlock, AttentionRows, LogitChunks, Logits, Residual
from lens._capture.session import capture
from lens._store.schema import HEAD, LAYER, Column, ReportSchema
from lens._store.store import Report
from metrics.attention import key_importance, prefix_mass, queries_seeing, received_attention
from metrics.hidden import cosine_to_position, median_magnitude, position_norms, top_magnitudes
from metrics.loss import next_token_loss, next_token_loss_sum
from metrics.sinks import (
    aligned_with_first,
    first_sinks,
    formation,
    is_massive,
    jump_window,
    lifetime_label,
    lifetime_thresholds,
    raised_layers,
    sink_mask,
    sink_rate_per_prompt,
)
from metrics.uncertainty import column_mean_intervals
from probes._base import Claim, Detector, ForwardPass, PaperClaim, ProbeError, Params, builtin_probe_file, register, summary_report
from probes._overview import OKABE_ITO, OverviewLabel, OverviewScore

Metric = Callable[[Float[Tensor, "pos vocab"], Int[Tensor, " pos"]], float]

PROBE = Column("probe", "string", "probe id (the probe's `id` field, else its index in the probe set)")
POSITION = Column("position", "int64", "token position in the probe, from 0")
TOKEN = Column("token", "string", "text of the token at that position")

SINKS = ReportSchema(
    "sinks",
    "Head-level first-token sinks (Gu et al. 2025).",
    (
        LAYER,
        HEAD,
        Column("sink_score", "float64", "importance of the first token (attention on it, mean over all query positions), mean over prompts"),
        Column("ci_low", "float64", "lower end of the 95% bootstrap interval of sink_score over prompts (NaN with one prompt)", nullable=True),
        Column("ci_high", "float64", "upper end of that interval", nullable=True),
        Column("sink_rate", "float64", "percent of prompts where the head's first-token importance exceeds eps (Gu et al.'s indicator, per prompt)"),
        Column("is_sink", "bool", "sink_rate > 50: the head is a first-token sink on most prompts"),
        Column("eps", "float64", "the threshold used"),
        Column("sink_mass_first4", "float64", "attention on the first 4 tokens (StreamingLLM's window), mean over queries and prompts"),
        Column("first_token", "string", "text of the first token, the most common one if prompts differ"),
        Column("n_prompts", "int64", "prompts averaged over"),
        Column("n_tokens", "int64", "tokens read per prompt (0: each whole prompt; 64: Gu et al.'s protocol, the first 64)"),
    ),
)

SINK_TOKENS = ReportSchema(
    "sink_tokens",
    "Token-level attention sinks per head (ACT): keys whose mean received attention exceeds tau.",
    (
        PROBE,
        LAYER,
        HEAD,
        POSITION,
        TOKEN,
        Column("score", "float64", "attention the key receives, summed over the queries that see it, divided by their number (T - position); > tau"),
        Column("n_queries", "int64", "queries that see the key (T - position); keys seen by fewer than min_queries (8) are never listed"),
        Column("is_first", "bool", "the head's first detected sink (lowest listed position), which ACT sets aside; the others are hidden sinks"),
        Column("tau", "float64", "the threshold used"),
    ),
)

SECONDARY_SINKS = ReportSchema(
    "secondary_sinks",
    "Tokens whose hidden state aligns with the first token's where that sink is active (Wong et al.); position 0 is the primary reference.",
    (
        PROBE,
        POSITION,
        TOKEN,
        Column("formation_layer", "int64", "first layer where abs(cos(h[position], h[0])) > cos_threshold (0.9) within the active layers"),
        Column("last_layer", "int64", "last such layer"),
        Column("lifetime", "int64", "number of such layers (the first token: the number of active layers)"),
        Column("mlp_norm", "float64", "norm of the MLP output at this position in the formation layer (what wrote the sink direction)"),
        Column("mlp_norm_ratio", "float64", "mlp_norm over the median MLP-output norm of the probe's positions in that layer"),
        Column("mean_abs_cos", "float64", "mean abs(cos) with the first token over the aligned layers"),
        Column("label", "string", "later tokens: primary (lifetime >= primary_fraction x layers), noise (<= noise_fraction x layers) or secondary; position 0: primary"),
        Column("is_attention_sink", "bool", "the position is also listed in sink_tokens for this probe (some head, some layer)"),
        Column(
            "active_layers",
            "string",
            "layers where the first-token sink is active (its hidden-state norm > norm_ratio (2) x the median position norm), as ranges, e.g. 1-8,11-29",
        ),
    ),
)

MASSIVE_ACTIVATIONS = ReportSchema(
    "massive_activations",
    "The largest residual-stream entries per layer (Sun et al. 2024).",
    (
        PROBE,
        Column("layer", "int64", "layer whose output residual stream (resid_post) is read"),
        Column("rank", "int64", "1 = the largest magnitude of the layer, then 2, ..."),
        POSITION,
        TOKEN,
        Column("channel", "int64", "residual-stream dimension"),
        Column("value", "float64", "the entry (signed)"),
        Column("median", "float64", "median magnitude of all entries of the layer for this probe"),
        Column("ratio", "float64", "abs(value) / median"),
        Column("is_massive", "bool", "abs(value) > massive_value (100) and ratio > massive_ratio (1000)"),
        Column("on_sink_token", "bool", "the position is a sink token of this probe (listed in sink_tokens, any head and layer)"),
        Column("on_first_token", "bool", "the position is 0"),
    ),
)

SINK_CALIBRATION = ReportSchema(
    "sink_calibration",
    "ACT's attention calibration: scale the attention to non-first sinks by beta; a metric before and after.",
    (
        PROBE,
        Column("heads", "string", "calibrated heads as layer.head, space-separated"),
        Column("n_heads", "int64", "number of calibrated heads"),
        Column("n_sinks", "int64", "calibrated (head, sink position) pairs"),
        Column("beta", "float64", "factor on the attention to those sinks; the removed mass goes to the other keys in proportion"),
        Column("metric", "string", "what before and after measure (default next_token_loss: mean cross-entropy in nats over the probe)"),
        Column("before", "float64", "the metric without calibration"),
        Column("after", "float64", "the metric with calibration"),
        Column("change", "float64", "after - before"),
    ),
)


QUICK_PER_KIND = 1


@dataclass
class SinkParams(Params):
    # Built-in probes: "quick" (the census default: the first QUICK_PER_KIND texts of each kind) or
    # "full" (every text of probes/data/sinks.jsonl).
    probe_set: Literal["quick", "full"] = "quick"
    # Tokens read per probe: 0 reads each whole probe; 64 is Gu et al.'s protocol (the first 64 tokens
    # of each probe, which must have at least that many).
    n_tokens: Annotated[int, Field(ge=0)] = 0
    eps: Annotated[float, Field(gt=0, lt=1)] = 0.3  # a share of attention
    n_prefix: Annotated[int, Field(ge=1)] = 4
    tau: Annotated[float, Field(gt=0, lt=1)] = 0.1  # a share of attention
    min_queries: Annotated[int, Field(ge=1)] = 8
    cos_threshold: Annotated[float, Field(ge=0, lt=1)] = 0.9  # compared with |cos|
    # Active layers of the first-token sink: "ratio" (its norm > norm_ratio x the median position norm,
    # every stretch) or "jump" (the reference code's single window between the largest rise and fall).
    active_rule: Literal["ratio", "jump"] = "ratio"
    norm_ratio: Annotated[float, Field(gt=1)] = 2.0
    noise_fraction: Annotated[float, Field(ge=0, le=1)] = 0.1  # fractions of the layers
    primary_fraction: Annotated[float, Field(ge=0, le=1)] = 0.625
    top_k: Annotated[int, Field(ge=1)] = 3
    massive_value: Annotated[float, Field(gt=0)] = 100.0
    massive_ratio: Annotated[float, Field(gt=1)] = 1000.0
    beta: Annotated[float, Field(ge=0)] = 0.4  # scale of the attention to non-first sinks
    calibrate: bool = True


def layer_ranges(layers: Iterable[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``"1-3,5"``."""
    spans: list[list[int]] = []
    for layer in sorted(layers):
        if spans and layer == spans[-1][1] + 1:
            spans[-1][1] = layer
        else:
            spans.append([layer, layer])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)


def calibration_interventions(targets: dict[tuple[int, int], list[int]], beta: float) -> list[ScaleSinks]:
    """One ``ScaleSinks`` per (layer, sink-position set), covering every targeted head."""
    grouped: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for (layer, head), positions in sorted(targets.items()):
        grouped.setdefault((layer, tuple(positions)), []).append(head)
    return [ScaleSinks(layer, heads, list(positions), beta) for (layer, positions), heads in grouped.items()]


@register
class Sinks(Detector):
    name = "sinks"
    description = "attention sinks: first-token (Sink_1^eps), hidden later-token and secondary sinks, massive activations, ACT calibration"
    reports = (SINKS, SINK_TOKENS, SECONDARY_SINKS, MASSIVE_ACTIVATIONS, SINK_CALIBRATION)
    probe_fields = ("text",)
    prompt_field = "text"
    # Gu et al. report Sink_1^0.3 per model; what carries over to any model is their claim that the
    # first-token sink is universal, even in small models: a rate above 0.
    paper_claims = {
        "sinks.sink_rate": PaperClaim(
            "Gu et al. 2025 (ICLR), Sink_1^eps with eps = 0.3: attention sinks emerge in every auto-regressive LM they test, small ones included",
            null=0.0, direction="above",
        ),
    }
    ParamsType = SinkParams
    color = OKABE_ITO["vermillion"]
    overview_labels = (OverviewLabel("sink", "sinks", "is_sink", "circle", (-0.22, 0.2)),)
    overview_scores = (OverviewScore("sink_score", "sinks", "sink_score"),)
    presets = {"full": {"probe_set": "full"}}
    accumulates = ("_probe_ids", "_first_importance", "_prefix_mass", "_first_tokens", "_rows")

    # Python API (``calibrate_sinks``): the calibration metric, and the heads allowed to be calibrated
    # (None: every head with a non-first sink on the probe).
    metric: Metric = staticmethod(next_token_loss)
    calibration_heads: Collection[tuple[int, int]] | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        info = self.model.info
        # Per probe, in order: its id, the first token's importance and the first-4 mass per (layer, head).
        self._probe_ids: list[str] = []
        self._first_importance: list[Tensor] = []
        self._prefix_mass: list[Tensor] = []
        self._first_tokens: Counter[str] = Counter()
        self._n_layers, self._n_heads = info.n_layers, info.n_heads
        self._rows: dict[str, list[pd.DataFrame]] = {schema.name: [] for schema in self.reports if schema.name != "sinks"}

    def builtin_probes(self) -> list[dict]:
        probes = builtin_probe_file("sinks.jsonl")
        if self.params.probe_set == "full":
            return probes
        seen: Counter[str] = Counter()
        quick = []
        for probe in probes:
            seen[probe["kind"]] += 1
            if seen[probe["kind"]] <= QUICK_PER_KIND:
                quick.append(probe)
        return quick

    def check_probe(self, probe, where: str) -> dict:
        probe = super().check_probe(probe, where)
        n_tokens = self.params.n_tokens
        if n_tokens and len(self.tokens(probe["text"])) < n_tokens:
            raise ProbeError(
                f"{where}: {len(self.tokens(probe['text']))} tokens, fewer than sinks.n_tokens={n_tokens} (every probe must have at least that many)"
            )
        return probe

    def passes(self, probe: dict, index: int):
        tokens = self.tokens(probe["text"])
        if self.params.n_tokens:
            tokens = tokens[: self.params.n_tokens]
        probe_id = str(probe.get("id", index))
        info = self.model.info
        n_layers, seq_len = info.n_layers, len(tokens)
        received = torch.zeros(n_layers, info.n_heads, seq_len, device=self.model.device)
        hidden = HiddenStats(n_layers, seq_len, self.params.top_k)

        def accumulate(block: AttentionBlock) -> None:
            received[block.layer, :, : block.n_keys] += received_attention(block.probs[0])

        calibrate = self.params.calibrate and seq_len > 1
        needs = [AttentionRows(accumulate), Residual(hidden.resid_post), Residual(hidden.mlp_out, kind="mlp_out")]
        before: list[float] = []
        if calibrate:
            needs.append(self._metric_need(tokens, before))
        targets: dict[tuple[int, int], list[int]] = {}

        def done() -> None:
            targets.update(self._reduce(probe_id, tokens, received.cpu(), hidden))

        yield ForwardPass(tokens, needs, done=done)

        if not calibrate or not targets:
            return
        after: list[float] = []

        def done_calibrated() -> None:
            heads = sorted(targets)
            self._rows["sink_calibration"].append(
                pd.DataFrame(
                    {
                        "probe": [probe_id],
                        "heads": [" ".join(f"{layer}.{head}" for layer, head in heads)],
                        "n_heads": [len(heads)],
                        "n_sinks": [sum(len(p) for p in targets.values())],
                        "beta": [self.params.beta],
                        "metric": [getattr(self.metric, "__name__", "metric")],
                        "before": before,
                        "after": after,
                        "change": [after[0] - before[0]],
                    }
                )
            )

        yield ForwardPass(tokens, [self._metric_need(tokens, after)], calibration_interventions(targets, self.params.beta), done=done_calibrated)

    def _metric_need(self, tokens: Tensor, out: list[float]) -> LogitChunks | Logits:
        """Logits for the calibration metric, appending its value to ``out``. The default loss is
        summed chunk by chunk, so no [positions, vocab] tensor is held; a custom metric gets them all."""
        seq_len = len(tokens)
        if self.metric is next_token_loss:
            total = [0.0, 0]

            def add(positions: Tensor, logits: Tensor) -> None:
                total[0] += next_token_loss_sum(logits[0], positions, tokens)
                total[1] += len(positions)
                if total[1] == seq_len:
                    out.append(total[0] / (seq_len - 1))

            return LogitChunks(add)
        return Logits(lambda logits: out.append(float(self.metric(logits[0].float(), tokens))), positions=list(range(seq_len)))

    def _reduce(self, probe_id: str, tokens: Tensor, received: Tensor, hidden: HiddenStats) -> dict[tuple[int, int], list[int]]:
        p = self.params
        n_layers = self.model.info.n_layers
        texts = self.model.token_strings(tokens)
        importance = key_importance(received)
        self._probe_ids.append(probe_id)
        self._first_importance.append(importance[..., 0].double())
        self._prefix_mass.append(prefix_mass(received, p.n_prefix).double())
        self._first_tokens[texts[0]] += 1

        n_queries = queries_seeing(len(tokens))
        is_sink = sink_mask(importance, n_queries, p.tau, p.min_queries)
        is_first = first_sinks(is_sink)
        layer, head, position = is_sink.nonzero(as_tuple=True)
        self._rows["sink_tokens"].append(
            pd.DataFrame(
                {
                    "probe": probe_id,
                    "layer": layer.numpy(),
                    "head": head.numpy(),
                    "position": position.numpy(),
                    "token": [texts[i] for i in position.tolist()],
                    "score": importance[layer, head, position].double().numpy(),
                    "n_queries": n_queries[position].long().numpy(),
                    "is_first": is_first[layer, head, position].numpy(),
                    "tau": p.tau,
                }
            )
        )
        sink_positions = set(position.tolist())

        if p.active_rule == "ratio":
            active = raised_layers(hidden.norms[:, 0], hidden.norms.median(dim=1).values, p.norm_ratio)
        else:
            active = jump_window(hidden.norms[:, 0])
        aligned = aligned_with_first(hidden.cosine, active, p.cos_threshold)
        first_layer, last_layer, lifetime = formation(aligned)
        found = (lifetime > 0).nonzero().flatten()
        formed_at = first_layer[found]
        mlp_norm = hidden.mlp_norms[formed_at, found]
        mlp_median = hidden.mlp_norms.median(dim=1).values[formed_at]
        mean_cos = (hidden.cosine.abs() * aligned).sum(0)[found] / lifetime[found].clamp_min(1)
        self._rows["secondary_sinks"].append(
            pd.DataFrame(
                {
                    "probe": probe_id,
                    "position": found.numpy(),
                    "token": [texts[i] for i in found.tolist()],
                    "formation_layer": formed_at.numpy(),
                    "last_layer": last_layer[found].numpy(),
                    "lifetime": lifetime[found].numpy(),
                    "mlp_norm": mlp_norm.double().numpy(),
                    "mlp_norm_ratio": (mlp_norm / mlp_median).double().numpy(),
                    "mean_abs_cos": mean_cos.double().numpy(),
                    # The first token is the primary sink by definition; later tokens are labelled by lifetime.
                    "label": [
                        "primary" if i == 0 else lifetime_label(int(n), n_layers, p.noise_fraction, p.primary_fraction)
                        for i, n in zip(found.tolist(), lifetime[found].tolist())
                    ],
                    "is_attention_sink": [i in sink_positions for i in found.tolist()],
                    "active_layers": layer_ranges(active.nonzero().flatten().tolist()),
                }
            )
        )

        top_positions = hidden.top_positions.flatten()
        values, medians = hidden.top_values.flatten(), hidden.medians[:, None].expand_as(hidden.top_values).flatten()
        k = hidden.top_values.shape[1]
        self._rows["massive_activations"].append(
            pd.DataFrame(
                {
                    "probe": probe_id,
                    "layer": torch.arange(n_layers).repeat_interleave(k).numpy(),
                    "rank": torch.arange(1, k + 1).repeat(n_layers).numpy(),
                    "position": top_positions.numpy(),
                    "token": [texts[i] for i in top_positions.tolist()],
                    "channel": hidden.top_channels.flatten().numpy(),
                    "value": values.double().numpy(),
                    "median": medians.double().numpy(),
                    "ratio": (values.abs() / medians).double().numpy(),
                    "is_massive": is_massive(values, medians, p.massive_value, p.massive_ratio).numpy(),
                    "on_sink_token": [i in sink_positions for i in top_positions.tolist()],
                    "on_first_token": (top_positions == 0).numpy(),
                }
            )
        )

        # Calibration targets: each head's sinks other than its first (ACT), in the allowed heads.
        targets: dict[tuple[int, int], list[int]] = {}
        for layer_index, head_index, sink in zip(*(t.tolist() for t in (is_sink & ~is_first).nonzero(as_tuple=True))):
            if self.calibration_heads is None or (layer_index, head_index) in self.calibration_heads:
                targets.setdefault((layer_index, head_index), []).append(sink)
        return targets

    def finish(self) -> list[Report]:
        p = self.params
        n_layers, n_heads = self._n_layers, self._n_heads
        empty = torch.zeros(0, n_layers, n_heads, dtype=torch.float64)
        importance = torch.stack(self._first_importance) if self._first_importance else empty
        mass = torch.stack(self._prefix_mass) if self._prefix_mass else empty
        low, high, _ = column_mean_intervals(importance.flatten(1).numpy(), seed=self.seed)
        layer, head = torch.meshgrid(torch.arange(n_layers), torch.arange(n_heads), indexing="ij")
        rate = (importance > p.eps).double().mean(dim=0) * 100.0
        frame = pd.DataFrame(
            {
                "layer": layer.flatten().numpy(),
                "head": head.flatten().numpy(),
                "sink_score": importance.mean(dim=0).flatten().numpy(),
                "ci_low": low,
                "ci_high": high,
                "sink_rate": rate.flatten().numpy(),
                "is_sink": (rate > 50.0).flatten().numpy(),
                "eps": p.eps,
                "sink_mass_first4": mass.mean(dim=0).flatten().numpy(),
                "first_token": self._first_tokens.most_common(1)[0][0] if self._first_tokens else "",
                "n_prompts": len(importance),
                "n_tokens": p.n_tokens,
            }
        )
        reports = [Report("sinks", frame)]
        for schema in self.reports[1:]:
            parts = [part for part in self._rows[schema.name] if len(part)]
            body = pd.concat(parts, ignore_index=True) if parts else schema.empty_rows()
            reports.append(Report(schema.name, body))
        frames = {r.type: r.frame for r in reports}
        return reports + [summary_report(self._summary(importance, frames))]

    def _per_probe(self, frame: pd.DataFrame) -> np.ndarray:
        """Rows of ``frame`` per probe, in probe order, 0 for probes with none."""
        return frame.groupby("probe").size().reindex(self._probe_ids, fill_value=0).to_numpy(dtype=np.float64)

    def _summary(self, importance: Tensor, frames: dict[str, pd.DataFrame]) -> list[Claim]:
        p, seed = self.params, self.seed
        n_layers, n_heads = self._n_layers, self._n_heads
        tokens, secondary = frames["sink_tokens"], frames["secondary_sinks"]
        massive, calibration = frames["massive_activations"], frames["sink_calibration"]
        hidden = tokens[~tokens["is_first"]]
        later = secondary[secondary["position"] > 0]
        is_secondary = later[later["label"] == "secondary"]
        big = massive[massive["is_massive"]]
        noise_max, primary_min = lifetime_thresholds(n_layers, p.noise_fraction, p.primary_fraction)
        read = f"the first {p.n_tokens} tokens of each probe" if p.n_tokens else "each whole probe"
        hidden_rule = f"score > {p.tau:g}, seen by >= {p.min_queries} queries"
        claims = [
            Claim.mean(
                "sinks.sink_rate",
                sink_rate_per_prompt(importance, p.eps).numpy(),
                "probes",
                f"Sink_1^{p.eps:g} (Gu et al.): percent of (probe, layer, head) where the first token's importance (mean over queries "
                f"of A[t, 0]) exceeds {p.eps:g}, thresholded per probe; {n_layers * n_heads} heads, {read}",
                seed=seed,
            ),
            Claim.mean(
                "sinks.first_token_importance",
                importance.mean(dim=(1, 2)).numpy(),
                "probes",
                f"the first token's importance averaged over the {n_layers * n_heads} heads ({read})",
                seed=seed,
            ),
            Claim.mean(
                "sinks.hidden_sinks_per_probe",
                self._per_probe(hidden),
                "probes",
                f"(layer, head, position) sinks other than each head's first, per probe (ACT: {hidden_rule})",
                seed=seed,
            ),
            Claim.mean(
                "sinks.hidden_sink_tokens_per_probe",
                self._per_probe(hidden[["probe", "position"]].drop_duplicates()),
                "probes",
                "positions that are a hidden sink in some head, per probe",
                seed=seed,
            ),
            Claim.mean(
                "sinks.heads_with_hidden_sinks",
                100.0 * self._per_probe(hidden[["probe", "layer", "head"]].drop_duplicates()) / (n_layers * n_heads),
                "probes",
                "percent of heads with at least one hidden sink, per probe",
                seed=seed,
            ),
            Claim.mean(
                "sinks.secondary_sinks_per_probe",
                self._per_probe(is_secondary),
                "probes",
                f"later tokens aligned with the first token (Wong et al.) for {noise_max:g} < lifetime < {primary_min:g} layers, per probe",
                seed=seed,
            ),
            Claim.count("sinks.sink_levels", is_secondary["formation_layer"].nunique(), "layers", "distinct formation layers of secondary sinks"),
            Claim.mean(
                "sinks.massive_activations_per_probe",
                self._per_probe(big),
                "probes",
                f"of the top-{p.top_k} residual entries per layer, those with |value| > {p.massive_value:g} and > {p.massive_ratio:g} x the "
                "layer's median magnitude (Sun et al.), per probe",
                seed=seed,
            ),
        ]
        if len(big):
            claims.append(
                Claim.pooled(
                    "sinks.massive_on_sink_tokens",
                    lambda on_sink, total, axis=-1: 100.0 * on_sink.sum(axis=axis) / total.sum(axis=axis),
                    [self._per_probe(big[big["on_sink_token"]]), self._per_probe(big)],
                    "probes",
                    "percent of massive activations that sit on a sink token (any head and layer of the probe)",
                    seed=seed,
                )
            )
        if len(calibration):
            claims.append(
                Claim.paired(
                    "sinks.calibration_effect",
                    calibration["after"].to_numpy(),
                    calibration["before"].to_numpy(),
                    "probes",
                    f"ACT calibration: {calibration['metric'].iloc[0]} with each head's hidden sinks scaled by beta = {p.beta:g}, minus "
                    "without, per calibrated probe (negative: calibration helps); probes with no hidden sink are not calibrated",
                    seed=seed,
                )
            )
        claims.append(Claim.count("sinks.calibrated_probes", len(calibration), "probes", "probes with at least one hidden sink to calibrate"))
        return claims


@dataclass
class HiddenStats:
    """Per-layer reductions of the hidden states of one probe, filled inside the forward pass."""

    n_layers: int
    seq_len: int
    top_k: int

    def __post_init__(self):
        shape = (self.n_layers, self.seq_len)
        self.norms, self.cosine, self.mlp_norms = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
        self.top_values = torch.zeros(self.n_layers, self.top_k)
        self.top_positions = torch.zeros(self.n_layers, self.top_k, dtype=torch.long)
        self.top_channels = torch.zeros(self.n_layers, self.top_k, dtype=torch.long)
        self.medians = torch.zeros(self.n_layers)

    def resid_post(self, layer: int, x: Tensor) -> None:
        h = x[0].detach()
        self.norms[layer] = position_norms(h)
        self.cosine[layer] = cosine_to_position(h, 0)
        values, positions, channels = top_magnitudes(h, self.top_values.shape[1])
        self.top_values[layer], self.top_positions[layer], self.top_channels[layer] = values, positions, channels
        self.medians[layer] = median_magnitude(h)

    def mlp_out(self, layer: int, x: Tensor) -> None:
        self.mlp_norms[layer] = position_norms(x[0].detach())


def calibrate_sinks(
    model,
    probes: Iterable[str | dict],
    *,
    metric: Metric = next_token_loss,
    heads: Collection[tuple[int, int]] | None = None,
    seed: int = 0,
    **params,
) -> pd.DataFrame:
    """ACT's calibration from Python with any metric: ``metric(logits[pos, vocab], tokens[pos]) -> float``.

    ``heads`` restricts the calibrated heads (``(layer, head)`` pairs; default every head with a
    non-first sink on the probe); ``params`` are ``SinkParams`` fields (``beta``, ``tau``, ...).
    Returns the ``sink_calibration`` rows (nothing is written to a store).
    """
    detector = Sinks(model, SinkParams(**params), seed=seed)
    detector.metric = metric
    detector.calibration_heads = None if heads is None else {tuple(head) for head in heads}
    for index, probe in enumerate(probes):
        probe = {"text": probe} if isinstance(probe, str) else probe
        for forward in detector.passes(detector.check_probe(probe, f"probe {index + 1}"), index):
            capture(model, forward.tokens, forward.needs, forward.interventions)
            forward.done()
    return next(r.frame for r in detector.finish() if r.type == "sink_calibration")
