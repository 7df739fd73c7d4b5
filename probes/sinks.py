"""Attention sinks, head level: how much attention each head parks on the first token.

sink_score[l, h] = importance of the first key, mean over all query positions t of A[t, 0], then mean
over prompts (Gu et al., "When Attention Sink Emerges in Language Models", ICLR 2025).
is_sink = sink_score > eps (0.3). Sink_1^eps = percent of heads over eps.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pandas as pd
import torch

from lens._capture.needs import AttentionBlock, AttentionRows
from lens._store.schema import Column, ReportSchema
from lens._store.store import Report
from metrics.attention import key_importance, prefix_mass, received_attention
from metrics.sinks import sink_rate
from probes._base import Detector, ForwardPass, Params, builtin_probe_file, register, summary_report

SINKS = ReportSchema(
    "sinks",
    "Head-level first-token sinks (Gu et al. 2025).",
    (
        Column("layer", "int64", "layer index, from 0"),
        Column("head", "int64", "query-head index within the layer, from 0"),
        Column("sink_score", "float64", "attention on the first token, mean over all query positions, then over prompts"),
        Column("is_sink", "bool", "sink_score > eps"),
        Column("eps", "float64", "the threshold used"),
        Column("sink_mass_first4", "float64", "attention on the first 4 tokens (StreamingLLM's window), mean over queries and prompts"),
        Column("first_token", "string", "text of the first token, the most common one if prompts differ"),
        Column("n_prompts", "int64", "prompts averaged over"),
    ),
)


@dataclass
class SinkParams(Params):
    eps: float = 0.3
    n_prefix: int = 4


@register
class Sinks(Detector):
    name = "sinks"
    description = "first-token attention sinks per head (Sink_1^eps)"
    reports = (SINKS,)
    probe_fields = ("text",)
    prompt_field = "text"
    ParamsType = SinkParams

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        info = self.model.info
        self._sink_scores = torch.zeros(info.n_layers, info.n_heads, dtype=torch.float64)
        self._prefix_mass = torch.zeros_like(self._sink_scores)
        self._first_tokens: Counter[str] = Counter()
        self._n_prompts = 0

    def builtin_probes(self) -> list[dict]:
        return builtin_probe_file("sinks.jsonl")

    def passes(self, probe: dict, index: int):
        tokens = self.tokens(probe["text"])
        info = self.model.info
        received = torch.zeros(info.n_layers, info.n_heads, len(tokens))

        def accumulate(block: AttentionBlock) -> None:
            received[block.layer, :, : block.n_keys] += received_attention(block.probs[0])

        def done() -> None:
            self._sink_scores += key_importance(received)[..., 0].double()
            self._prefix_mass += prefix_mass(received, self.params.n_prefix).double()
            self._first_tokens[self.model.tokenizer.decode(tokens[:1])] += 1
            self._n_prompts += 1

        yield ForwardPass(tokens, [AttentionRows(accumulate)], done=done)

    def finish(self) -> list[Report]:
        n = max(self._n_prompts, 1)
        scores, mass = self._sink_scores / n, self._prefix_mass / n
        layer, head = torch.meshgrid(torch.arange(scores.shape[0]), torch.arange(scores.shape[1]), indexing="ij")
        eps = self.params.eps
        frame = pd.DataFrame(
            {
                "layer": layer.flatten().numpy(),
                "head": head.flatten().numpy(),
                "sink_score": scores.flatten().numpy(),
                "is_sink": (scores > eps).flatten().numpy(),
                "eps": eps,
                "sink_mass_first4": mass.flatten().numpy(),
                "first_token": self._first_tokens.most_common(1)[0][0] if self._first_tokens else "",
                "n_prompts": self._n_prompts,
            }
        )
        rate = sink_rate(scores, eps)
        summary = summary_report(
            [(f"sink_rate_eps{eps:g}", rate, f"Sink_1^{eps:g}: percent of {scores.numel()} heads whose first-token score exceeds {eps:g}")]
        )
        return [Report("sinks", frame), summary]
