"""Retrieval heads (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context Factuality").

Needle in a haystack: a needle sentence (a fictional fact, number, name, code or place written for the
project) is inserted at a sentence boundary of real prose, and a question asks for it. The prose is the
English documentation that ships with Python (``pydoc_data.topics``): its plain paragraphs, deduplicated,
read from a seeded starting paragraph, so no haystack repeats itself. The model answers greedily (at
most ``max_new_tokens``, stopping at end of turn or at a newline once the answer has begun). At every decoding step with generated token y, head (l, h)
earns 1 / len(needle tokens) when the top-1 key of its query row lies inside the needle span and holds
y. A trial counts when the answer recalls the needle (ROUGE-1 recall > 0.5); retrieval_score is the mean
over counted trials, and a head with score > 0.1 is a retrieval head.

Scoring is two passes per trial: the answer is generated on the fast path (no hooks), then one
teacher-forced forward over prompt + answer computes attention only for the rows that produced the
answer (query position p generated token p + 1), so memory grows with the context, not its square.
Those rows give the same argmaxes as decoding (``scoring="decode"`` scores while decoding instead; the
tests show both give the same scores).

Head scores carry a 95% percentile-bootstrap interval over counted trials. Presets: ``quick`` (the census
default, 15 trials) and ``full`` (60 trials); see ``PRESETS``.

Causal test: the top list holds the heads scoring above 0, ranked by score (ties in a seeded random
order), capped at K (``k_used`` says when fewer than K qualify). The needle test is re-run on trials
drawn (seeded) from those the unmasked model answered correctly, with the top list masked and, as
controls, ``ablation_draws`` seeded draws of K heads uniformly from outside the top list and of K heads
with the same count per layer (layer-matched). The effect is the paired difference in accuracy, top
minus control (mean over draws), per trial, with its bootstrap interval and a sign-flip permutation
p-value (Holm-adjusted over the contrasts). With no correct trial the test is not run, and says why.
Masking zeroes the head's query, which makes its attention uniform over the prefix (the reference's
masking). Like the reference, only the rows that produce the answer are masked (the last prompt position
onward), the prompt itself is read unmasked; ``mask_prompt=true`` masks every position. ``mask="output"``
zero-ablates the head's output instead.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Literal

import pandas as pd
import pydoc_data.topics
import torch
from jaxtyping import Int
from pydantic import Field
from torch import Tensor

from lens._capture.interventions import Intervention, ZeroQuery, _rows
from lens._capture.needs import AttentionBlock, AttentionRows
from lens._capture.session import session
from lens._generate import Generation, chat_prompt, generate, generate_each
from lens._store.schema import HEAD, LAYER, Column, ReportSchema
from lens._store.store import Report
from metrics.retrieval import (
    RECALL_THRESHOLD,
    RETRIEVAL_THRESHOLD,
    contains_verbatim,
    copy_hits,
    layer_matched_control,
    random_control,
    rank_heads,
    retrieval_credit,
    retrieval_scores,
    top_key,
    top_list,
    unigram_recall,
)
from metrics.uncertainty import adjust_p_values, column_mean_intervals
from probes._base import Claim, Detector, ForwardPass, PaperClaim, Params, ProbeError, builtin_probe_file, register, summary_report
from probes._overview import OKABE_ITO, OverviewLabel, OverviewScore

RETRIEVAL = ReportSchema(
    "retrieval",
    "Head-level retrieval scores from needle-in-a-haystack copying (Wu et al. 2024).",
    (
        LAYER,
        HEAD,
        Column("retrieval_score", "float64", "copy credit per trial (1/needle tokens per step whose top-1 key is the needle token generated), mean over counted trials"),
        Column("ci_low", "float64", "lower end of the 95% percentile-bootstrap interval of retrieval_score over counted trials (NaN below 2)", nullable=True),
        Column("ci_high", "float64", "upper end of that interval", nullable=True),
        Column("is_retrieval", "bool", "retrieval_score > threshold"),
        Column("threshold", "float64", "the threshold used (the paper's 0.1)"),
        Column("rank", "int64", "1 for the highest score; equal scores in a seeded random order (the order the masking test's top list uses)"),
        Column("n_trials", "int64", "needle trials run"),
        Column("n_counted", "int64", "trials whose answer recalled the needle (ROUGE-1 recall > 0.5), the ones averaged"),
    ),
)

RETRIEVAL_TRIALS = ReportSchema(
    "retrieval_trials",
    "One row per needle-in-a-haystack trial of the retrieval detector.",
    (
        Column("probe", "int64", "probe index, from 0, in the order run"),
        Column("kind", "string", "needle kind (fact, number, name, code, place; 'file' for probe-file lines without one)"),
        Column("depth", "float64", "needle depth asked for (0 = start of the haystack, 1 = end); for probe-file lines, the needle's start over the prompt length"),
        Column("length", "int64", "haystack length asked for, in tokens; for probe-file lines, the prompt's length"),
        Column("haystack_start", "int64", "first paragraph of the prose corpus the haystack reads from (-1 for probe-file lines)"),
        Column("prompt_tokens", "int64", "tokens of the prompt as fed, chat template included"),
        Column("needle_start", "int64", "first token of the needle span in the prompt"),
        Column("needle_tokens", "int64", "tokens in the needle span"),
        Column("needle", "string", "the needle text a correct answer copies"),
        Column("answer", "string", "the model's greedy answer"),
        Column("stopped_by", "string", "what ended the answer: eos, newline or length"),
        Column("recall", "float64", "ROUGE-1 recall of the needle's words in the answer"),
        Column("exact", "bool", "the answer contains the needle's words verbatim (case and punctuation ignored): correct, and eligible for the masking test"),
        Column("counted", "bool", "recall > 0.5: the trial enters the retrieval scores"),
        Column("masked", "bool", "the trial was drawn for the masking test"),
        Column("top_head", "string", "head with the most copy credit in this trial, as L<layer>.H<head>"),
        Column("top_credit", "float64", "that head's credit in this trial"),
    ),
)

RETRIEVAL_ABLATION = ReportSchema(
    "retrieval_ablation",
    "One row per masked answer of the causal test: a trial under the top list or one control draw.",
    (
        Column("probe", "int64", "the trial (probe index of retrieval_trials)"),
        Column("condition", "string", "'top' (the top list), 'random' (K heads from outside the top list) or 'layer_matched' (the top list's count per layer)"),
        Column("k_requested", "int64", "K asked for"),
        Column("k_used", "int64", "heads masked: K, or fewer when fewer heads score above 0"),
        Column("draw", "int64", "control draw, from 0 (0 for top); seeded by the census seed, K and the control"),
        Column("correct", "bool", "the answer contains the needle verbatim (case and punctuation ignored)"),
        Column("recall", "float64", "ROUGE-1 recall of the needle in the answer"),
        Column("answer", "string", "the masked model's greedy answer"),
        Column("heads", "string", "the masked heads, L<layer>.H<head> separated by spaces"),
        Column("mask", "string", "'query' (zeroed query: uniform attention) or 'output' (zeroed head output)"),
        Column("mask_prompt", "bool", "false: only the rows producing the answer are masked (as the reference); true: every position"),
    ),
)

RETRIEVAL_MASKING = ReportSchema(
    "retrieval_masking",
    "The causal test per K and control: paired difference in accuracy, top list masked minus control masked, over trials.",
    (
        Column("k_requested", "int64", "K asked for"),
        Column("k_used", "int64", "heads in the top list: K, or fewer when fewer heads score above 0"),
        Column("control", "string", "'random' (uniform outside the top list) or 'layer_matched' (same count per layer, outside the top list)"),
        Column("status", "string", "'run', or 'not run: <why>'"),
        Column("n_trials", "int64", "trials masked (drawn from those the unmasked model answered correctly)"),
        Column("n_draws", "int64", "control draws per trial"),
        Column("top_accuracy", "float64", "accuracy with the top list masked, mean over trials", nullable=True),
        Column("control_accuracy", "float64", "accuracy with a control masked, mean over draws and trials", nullable=True),
        Column("effect", "float64", "mean over trials of (top accuracy - control accuracy): negative when the top heads matter more", nullable=True),
        Column("ci_low", "float64", "lower end of the effect's 95% bootstrap interval over trials", nullable=True),
        Column("ci_high", "float64", "upper end of that interval", nullable=True),
        Column("p_value", "float64", "two-sided sign-flip permutation p-value of the effect", nullable=True),
        Column("p_holm", "float64", "p_value Holm-adjusted over the run contrasts of this census", nullable=True),
        Column("mask", "string", "'query' or 'output'"),
        Column("mask_prompt", "bool", "whether the prompt rows were masked too"),
    ),
)

QUESTION = "<book>{context}</book>\nBased on the content of the book, Question: {question}\nAnswer:"
SENTENCE_ENDS = (".", "!", "?")


DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
# Grid and causal-test sizes per preset; a parameter given explicitly overrides its preset's value.
# quick (the census default): 15 trials, each needle kind 3 times, masking on 2 trials (about 2 minutes
# of CPU). full: 60 trials (each of the 25 needles 2 or 3 times), masking on 20 trials at three K.
PRESETS = {
    "quick": {"lengths": [500, 1000, 2000], "depths": DEPTHS, "needles_per_cell": 1, "ablation_ks": [10], "ablation_trials": 2},
    "full": {"lengths": [500, 1000, 2000, 4000], "depths": DEPTHS, "needles_per_cell": 3, "ablation_ks": [5, 10, 20], "ablation_trials": 20},
}
CONTROLS = {"random": random_control, "layer_matched": layer_matched_control}


@dataclass
class RetrievalParams(Params):
    preset: Literal["quick", "full"] = "quick"  # the None fields below take the preset's values
    depths: list[Annotated[float, Field(ge=0, le=1)]] | None = None
    lengths: list[Annotated[int, Field(ge=1)]] | None = None
    # Needles per (depth, length) cell; trial i gets needle i (mod 25), so consecutive trials cycle
    # through fact, number, name, code and place needles.
    needles_per_cell: Annotated[int, Field(ge=1)] | None = None
    max_new_tokens: Annotated[int, Field(ge=1)] = 50
    threshold: Annotated[float, Field(ge=0, le=1)] = RETRIEVAL_THRESHOLD
    recall_threshold: Annotated[float, Field(ge=0, le=1)] = RECALL_THRESHOLD
    scoring: Literal["teacher_forced", "decode"] = "teacher_forced"
    # The causal test re-decodes ablation_trials trials (drawn from the correct ones; 0 skips the test)
    # once per masked condition: 1 + 2 x ablation_draws answers per K and trial.
    ablation_ks: list[Annotated[int, Field(ge=1)]] | None = None
    ablation_draws: Annotated[int, Field(ge=1)] = 10
    ablation_trials: Annotated[int, Field(ge=0)] | None = None
    mask: Literal["query", "output"] = "query"
    mask_prompt: bool = False

    def resolved(self) -> RetrievalParams:
        """These parameters with every None taken from the preset."""
        if self.preset not in PRESETS:
            raise ProbeError(f"parameter retrieval.preset must be one of {sorted(PRESETS)}, not {self.preset!r}")
        preset = PRESETS[self.preset]
        return dataclasses.replace(self, **{name: value for name, value in preset.items() if getattr(self, name) is None})


@dataclass
class ZeroHeadOutput(Intervention):
    """Zero the output z of ``heads`` at query ``positions`` (None: all): the head adds nothing there."""

    layer: int
    heads: list[int]
    positions: list[int] | None = None

    def edit_z(self, z, positions):
        rows = _rows(positions, self.positions)
        z = z.clone()
        for head in self.heads:
            z[:, rows, head] = 0.0
        return z


@dataclass
class Trial:
    probe: int
    kind: str
    depth: float
    length: int
    haystack_start: int
    needle: str
    span: tuple[int, int]
    prompt_tokens: Int[Tensor, " prompt"]
    generation: Generation
    credit: Tensor  # layer head
    recall: float

    @property
    def exact(self) -> bool:
        """The answer holds the needle verbatim: correct by the masking test's measure."""
        return contains_verbatim(self.needle, self.generation.text)


def head_label(layer: int, head: int) -> str:
    return f"L{layer}.H{head}"


def head_masks(edit: type[Intervention], heads: Sequence[tuple[int, int]], positions: list[int] | None) -> list[Intervention]:
    """One ``edit(layer, heads of that layer, positions)`` per layer that ``heads`` (layer, head) touch."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    return [edit(layer, layer_heads, positions) for layer, layer_heads in sorted(by_layer.items())]


def sentence_boundaries(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token indices just after a sentence-ending token (found by decoding each token, no fixed ids), and
    every token's character span in ``text``."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ends = [i + 1 for i, token in enumerate(encoded["input_ids"]) if tokenizer.decode([token]).rstrip().endswith(SENTENCE_ENDS)]
    return ends, [tuple(span) for span in encoded["offset_mapping"]]


@cache
def prose_paragraphs() -> tuple[str, ...]:
    """The plain-prose paragraphs of Python's own documentation (``pydoc_data.topics``, about 130,000
    characters of them), topics in name order, each paragraph once: no indented block (code, grammar,
    tables), no heading, no grammar rule, at least 40 characters, ending a sentence, no sentence over 600
    characters. Lines are unwrapped."""
    paragraphs = []
    for name in sorted(pydoc_data.topics.topics):
        for block in re.split(r"\n\s*\n", pydoc_data.topics.topics[name]):
            lines = block.split("\n")
            text = " ".join(line.strip() for line in lines)
            if any(line.startswith(" ") for line in lines) or len(text) < 40 or "::=" in text or re.search(r"[*=~^-]{4}", text):
                continue
            # Not ")": signature listings such as "object.__add__(self, other) ..."; no sentence over 600
            # characters, so every haystack of a few hundred tokens has sentence ends to put a needle at.
            longest = max(len(sentence) for sentence in re.split(r"[.!?](?:\s|$)", text))
            if text.endswith(SENTENCE_ENDS) and longest <= 600:
                paragraphs.append(text)
    return tuple(dict.fromkeys(paragraphs))


def prose(tokenizer, start: int, n_tokens: int) -> str:
    """At least ``n_tokens`` tokens of prose: paragraphs from ``start`` on (wrapping past the last), each once."""
    paragraphs = prose_paragraphs()
    for n in range(1, len(paragraphs) + 1):
        text = "\n\n".join(paragraphs[(start + i) % len(paragraphs)] for i in range(n))
        # Prose runs at about 4.5 characters a token; tokenize only once the text could be long enough.
        if len(text) >= 4 * n_tokens and len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= n_tokens:
            return text
    raise ProbeError(f"retrieval: a haystack of {n_tokens} tokens is longer than the prose corpus ({len(paragraphs)} paragraphs)")


def haystack_with_needle(tokenizer, text: str, sentence: str, length: int, depth: float) -> str:
    """About ``length`` tokens of ``text`` (which must hold that many) ending at a sentence, with
    ``sentence`` inserted at the last sentence boundary at or before ``depth`` of the way through."""
    budget = length - len(tokenizer(" " + sentence, add_special_tokens=False)["input_ids"])
    ends, spans = sentence_boundaries(tokenizer, text)
    ends = [0] + [end for end in ends if end <= budget]
    if len(ends) < 2:
        raise ProbeError(f"retrieval: a haystack of {length} tokens holds no whole sentence")
    n_context = ends[-1]
    context = text[: spans[n_context - 1][1]]
    insert_at = max(end for end in ends if end <= round(depth * n_context))
    if insert_at == 0:
        return sentence + " " + context
    cut = spans[insert_at - 1][1]
    return context[:cut] + " " + sentence + context[cut:]


@dataclass
class MaskingPlan:
    """The heads one K masks: the top list and, per control, its seeded draws (or why it cannot run)."""

    k_requested: int
    top: list[tuple[int, int]]
    draws: dict[str, list[list[tuple[int, int]]]]
    status: dict[str, str]


def masking_plans(scores: Tensor, ranking: list[tuple[int, int]], ks: list[int], n_draws: int, seed: int) -> list[MaskingPlan]:
    """One plan per K. Controls are drawn from outside the top list at the largest K (so no control
    masks a head some top list masks); draw d of control c at K is seeded by (seed, c, K, d)."""
    excluded = set(top_list(ranking, scores, max(ks)))
    plans = []
    for k in sorted(set(ks)):
        top = top_list(ranking, scores, k)
        plan = MaskingPlan(k, top, {}, {})
        for control, draw in CONTROLS.items():
            if not top:
                plan.status[control] = "not run: no head scored above 0"
                continue
            try:
                plan.draws[control] = [draw(top, excluded, tuple(scores.shape), random.Random(f"{seed}:{control}:{k}:{d}")) for d in range(n_draws)]
                plan.status[control] = "run"
            except ValueError as error:
                plan.status[control] = f"not run: {error}"
        plans.append(plan)
    return plans


@register
class Retrieval(Detector):
    name = "retrieval"
    description = "retrieval heads: copy-from-needle scores in needle-in-a-haystack probes, and a head-masking test"
    reports = (RETRIEVAL, RETRIEVAL_TRIALS, RETRIEVAL_ABLATION, RETRIEVAL_MASKING)
    probe_fields = ("prompt", "needle")
    prompt_field = "prompt"
    paper_claims = {
        "retrieval.fraction_of_heads": PaperClaim(
            "Wu et al. 2024: retrieval heads are sparse, under 5% of heads (33 of 1024 score > 0.1 in Llama-2-7B-80K)",
            value=33 / 1024, null=0.05,
        ),
        "retrieval.masking_effect_k*_random": PaperClaim(
            "Wu et al. 2024: masking the top retrieval heads breaks needle retrieval, masking random heads does not",
            null=0.0, direction="below",
        ),
    }
    ParamsType = RetrievalParams
    color = OKABE_ITO["blue"]
    overview_labels = (OverviewLabel("retrieval", "retrieval", "is_retrieval", "square", (0.22, 0.2)),)
    overview_scores = (OverviewScore("retrieval_score", "retrieval", "retrieval_score"),)
    presets = {"full": {"preset": "full"}}  # 60 trials up to 4,000 tokens, masking at K = 5, 10, 20 on 20 trials
    accumulates = ("trials",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params = params = self.params.resolved()
        if params.scoring not in ("teacher_forced", "decode"):
            raise ProbeError(f"parameter retrieval.scoring must be 'teacher_forced' or 'decode', not {params.scoring!r}")
        if params.mask not in ("query", "output"):
            raise ProbeError(f"parameter retrieval.mask must be 'query' or 'output', not {params.mask!r}")
        if not all(0.0 <= d <= 1.0 for d in params.depths):
            raise ProbeError(f"parameter retrieval.depths must lie in [0, 1], got {params.depths}")
        if not params.ablation_ks or min(params.ablation_ks) < 1 or params.ablation_draws < 1 or params.ablation_trials < 0:
            raise ProbeError("parameters retrieval.ablation_ks (a non-empty list) and ablation_draws must be at least 1, ablation_trials at least 0")
        self.trials: list[Trial] = []

    # -- probes ---------------------------------------------------------------------------------
    def builtin_probes(self) -> list[dict]:
        """Trial i of the grid (lengths x depths x needles_per_cell) gets needle i (mod the needles) in a
        haystack read from a paragraph drawn with the seed."""
        params = self.params
        needles = builtin_probe_file("retrieval_needles.jsonl")
        starts = random.Random(self.seed)
        grid = [(length, depth) for length, depth in itertools.product(params.lengths, params.depths) for _ in range(max(1, params.needles_per_cell))]
        probes = []
        for i, (length, depth) in enumerate(grid):
            needle = needles[i % len(needles)]
            start = starts.randrange(len(prose_paragraphs()))
            text = prose(self.model.tokenizer, start, length)
            context = haystack_with_needle(self.model.tokenizer, text, needle["sentence"], length, depth)
            prompt = chat_prompt(self.model, QUESTION.format(context=context, question=needle["question"]))
            probes.append({"prompt": prompt, "needle": needle["needle"], "kind": needle["kind"], "depth": depth, "length": length, "haystack_start": start})
        return probes

    def check_probe(self, probe, where: str) -> dict:
        probe = super().check_probe(probe, where)
        count = probe["prompt"].count(probe["needle"])
        if count != 1:
            raise ProbeError(f"{where}: the needle must occur exactly once in the prompt, found {count} times")
        return probe

    def extra_tokens(self) -> int:
        return self.params.max_new_tokens

    def needle_span(self, prompt: str, needle: str) -> tuple[int, int]:
        """Token span ``[start, end)`` of the tokens that overlap the needle's characters in the prompt."""
        first = prompt.index(needle)
        last = first + len(needle)
        spans = self.model.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        inside = [i for i, (a, b) in enumerate(spans) if a < last and b > first]
        shift = self.bos_shift(prompt)
        return inside[0] + shift, inside[-1] + 1 + shift

    # -- running --------------------------------------------------------------------------------
    def passes(self, probe: dict, index: int):
        tokens = self.tokens(probe["prompt"])
        span = self.needle_span(probe["prompt"], probe["needle"])
        info = self.model.info

        def record(generation: Generation, credit: Tensor) -> None:
            self.trials.append(
                Trial(
                    probe=index,
                    kind=str(probe.get("kind", "file")),
                    depth=float(probe.get("depth", span[0] / len(tokens))),
                    length=int(probe.get("length", len(tokens))),
                    haystack_start=int(probe.get("haystack_start", -1)),
                    needle=probe["needle"],
                    span=span,
                    prompt_tokens=tokens,
                    generation=generation,
                    credit=credit,
                    recall=unigram_recall(probe["needle"], generation.text),
                )
            )

        if self.params.scoring == "decode":
            record(*decode_time_scores(self.model, tokens, span, self.params.max_new_tokens))
            return
        generation = generate(self.model, tokens, max_new_tokens=self.params.max_new_tokens)
        n_answer = len(generation.answer_tokens)
        if n_answer == 0:
            record(generation, torch.zeros(info.n_layers, info.n_heads, dtype=torch.float64))
            return
        # Row p (from the last prompt position on) generated token p + 1.
        rows = list(range(len(tokens) - 1, len(tokens) - 1 + n_answer))
        top_keys = torch.zeros(info.n_layers, info.n_heads, n_answer, dtype=torch.long)

        def consume(block: AttentionBlock) -> None:
            top_keys[block.layer][:, block.positions.cpu() - rows[0]] = top_key(block.probs[0]).cpu()

        def done() -> None:
            record(generation, trial_credit(top_keys, generation, span))

        yield ForwardPass(generation.tokens, [AttentionRows(consume, positions=rows)], done=done)

    def _credits(self) -> tuple[Tensor, Tensor]:
        """Every trial's per-head credit, and which trials count (the model recalled the needle)."""
        info = self.model.info
        if not self.trials:
            return torch.zeros(0, info.n_layers, info.n_heads, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)
        credits = torch.stack([t.credit for t in self.trials])
        return credits, torch.tensor([t.recall > self.params.recall_threshold for t in self.trials])

    def stages(self) -> list[str]:
        return ["masking"]

    def run_stage(self, name: str):
        if name != "masking":
            return super().run_stage(name)
        return self.masking_test(retrieval_scores(*self._credits()))

    def finish(self) -> list[Report]:
        info, params = self.model.info, self.params
        credits, counted = self._credits()
        scores = retrieval_scores(credits, counted)
        low, high, interval_method = column_mean_intervals(credits[counted].flatten(1).numpy(), seed=self.seed)
        heads = [(layer, head) for layer in range(info.n_layers) for head in range(info.n_heads)]
        ranking = rank_heads(scores, self.seed)
        rank = {lh: i + 1 for i, lh in enumerate(ranking)}
        scores_frame = pd.DataFrame(
            {
                "layer": [l for l, _ in heads],
                "head": [h for _, h in heads],
                "retrieval_score": [float(scores[lh]) for lh in heads],
                "ci_low": low,
                "ci_high": high,
                "is_retrieval": [bool(scores[lh] > params.threshold) for lh in heads],
                "threshold": params.threshold,
                "rank": [rank[lh] for lh in heads],
                "n_trials": len(self.trials),
                "n_counted": int(counted.sum()),
            }
        )
        ablation, masking, masking_claims, masked = self.stage("masking")
        return [
            Report("retrieval", scores_frame),
            Report("retrieval_trials", self._trials_frame(masked)),
            Report("retrieval_ablation", ablation),
            Report("retrieval_masking", masking),
            self._summary(scores_frame, counted, interval_method, masking_claims),
        ]

    def _trials_frame(self, masked: set[int]) -> pd.DataFrame:
        rows = []
        for t in self.trials:
            best = divmod(int(t.credit.argmax()), t.credit.shape[1])
            rows.append(
                {
                    "probe": t.probe, "kind": t.kind, "depth": t.depth, "length": t.length, "haystack_start": t.haystack_start,
                    "prompt_tokens": len(t.prompt_tokens), "needle_start": t.span[0], "needle_tokens": t.span[1] - t.span[0], "needle": t.needle,
                    "answer": t.generation.text, "stopped_by": t.generation.stopped_by, "recall": t.recall, "exact": t.exact,
                    "counted": t.recall > self.params.recall_threshold, "masked": t.probe in masked,
                    "top_head": head_label(*best), "top_credit": float(t.credit[best]),
                }
            )
        return pd.DataFrame(rows, columns=RETRIEVAL_TRIALS.column_names[3:])

    # -- causal test ----------------------------------------------------------------------------
    def masking_test(self, scores: Tensor) -> tuple[pd.DataFrame, pd.DataFrame, list[Claim], set[int]]:
        """The causal test of a score table (the run's own; tests plant one) on this run's trials: the
        ``retrieval_ablation`` and ``retrieval_masking`` frames, the summary claims, the trials masked."""
        params = self.params
        masked, reason = self._ablation_trials()
        plans = masking_plans(scores, rank_heads(scores, self.seed), params.ablation_ks, params.ablation_draws, self.seed)
        ablation = self._ablation(masked, plans)
        masking, claims = self._masking(ablation, plans, len(masked), reason)
        return ablation, masking, claims, {t.probe for t in masked}

    def _ablation_trials(self) -> tuple[list[Trial], str]:
        """The trials to mask, drawn with the seed from those answered correctly, or why there are none."""
        correct = [t for t in self.trials if t.exact]
        if self.params.ablation_trials == 0:
            return [], "not run: ablation_trials=0"
        if not correct:
            return [], f"not run: no unmasked answer (of {len(self.trials)} trials) contained the needle"
        drawn = random.Random(self.seed).sample(correct, min(self.params.ablation_trials, len(correct)))
        return sorted(drawn, key=lambda t: t.probe), "run"

    def _ablation(self, trials: list[Trial], plans: list[MaskingPlan]) -> pd.DataFrame:
        """Every masked answer: per trial, the top list and each control draw of every K."""
        params = self.params
        rows = []
        for trial in trials:
            conditions = [
                (plan, condition, draw, heads)
                for plan in plans
                for condition, draw, heads in ([("top", 0, plan.top)] if plan.draws else [])
                + [(control, d, heads) for control, draws in plan.draws.items() for d, heads in enumerate(draws)]
            ]
            answers = self._masked_answers(trial, [heads for *_, heads in conditions])
            for (plan, condition, draw, heads), answer in zip(conditions, answers):
                rows.append(
                    {
                        "probe": trial.probe, "condition": condition, "k_requested": plan.k_requested, "k_used": len(plan.top), "draw": draw,
                        "correct": contains_verbatim(trial.needle, answer), "recall": unigram_recall(trial.needle, answer), "answer": answer,
                        "heads": " ".join(head_label(*lh) for lh in heads), "mask": params.mask, "mask_prompt": params.mask_prompt,
                    }
                )
        return pd.DataFrame(rows, columns=RETRIEVAL_ABLATION.column_names[3:]) if rows else RETRIEVAL_ABLATION.empty_rows()

    def _masking(self, ablation: pd.DataFrame, plans: list[MaskingPlan], n_trials: int, reason: str) -> tuple[pd.DataFrame, list[Claim]]:
        """The paired contrast per K and control: per trial, top accuracy minus the control's mean over
        draws; its claims' p-values Holm-adjusted over the contrasts that ran."""
        params = self.params
        rows = []
        claims = [Claim("retrieval.masking_trials", float(n_trials), n=n_trials, unit="trials", method=f"count; masking test {reason}",
                        detail=f"trials masked, drawn with the seed from those whose unmasked answer contained the needle "
                               f"(at most ablation_trials={params.ablation_trials})")]
        for plan in plans:
            for control in CONTROLS:
                status = plan.status[control] if reason == "run" else reason
                name = f"retrieval.masking_effect_k{plan.k_requested}_{control}"
                k_note = f"K={plan.k_requested}" + (f" requested, {len(plan.top)} used (only {len(plan.top)} heads score above 0)" if len(plan.top) < plan.k_requested else "")
                detail = (f"needle accuracy with the top list masked minus with {control.replace('_', '-')} heads masked (mean over "
                          f"{params.ablation_draws} draws), paired per trial; {k_note}; mask={params.mask}, mask_prompt={params.mask_prompt}")
                row = {"k_requested": plan.k_requested, "k_used": len(plan.top), "control": control, "status": status,
                       "n_trials": n_trials if status == "run" else 0, "n_draws": params.ablation_draws if status == "run" else 0}
                if status != "run":  # the masking report says why; the summary has no estimate to show
                    rows.append(row)
                    continue
                at_k = ablation[ablation["k_requested"] == plan.k_requested]
                top = at_k[at_k["condition"] == "top"].groupby("probe")["correct"].mean()
                controls = at_k[at_k["condition"] == control].groupby("probe")["correct"].mean().reindex(top.index)
                claim = Claim.paired(name, top.to_numpy(float), controls.to_numpy(float), "trials", detail, seed=self.seed)
                row |= {"top_accuracy": float(top.mean()), "control_accuracy": float(controls.mean()), "effect": claim.estimate,
                        "ci_low": claim.ci_low, "ci_high": claim.ci_high, "p_value": claim.p_value}
                rows.append(row)
                claims.append(claim)
        frame = pd.DataFrame(rows, columns=RETRIEVAL_MASKING.column_names[3:])
        frame["mask"], frame["mask_prompt"] = params.mask, params.mask_prompt
        frame["p_holm"] = adjust_p_values(frame["p_value"].to_numpy(float), "holm")
        n_tests = int(frame["p_value"].notna().sum())
        p_holm = dict(zip(frame["k_requested"].astype(str) + "_" + frame["control"], frame["p_holm"]))
        claims = [
            dataclasses.replace(claim, p_value=float(p), method=f"{claim.method}; Holm-adjusted over {n_tests} masking contrasts")
            if not math.isnan(p := p_holm.get(claim.claim.removeprefix("retrieval.masking_effect_k"), math.nan)) else claim
            for claim in claims
        ]
        return frame, claims

    def _masked_answers(self, trial: Trial, head_sets: list[list[tuple[int, int]]]) -> list[str]:
        """The trial's answer with each head set masked, decoded as batches (``generate_each``). A head
        set listed twice (K capped alike) is decoded once. With decoding-only masking every set shares
        the prompt's first tokens run once unmasked, as the reference prefilled once and masked from the
        last prompt token on; the prefix keeps every key (``Model.run_prefix``), so masks apply at
        absolute positions past Gemma 3's window."""
        params = self.params
        n_prompt = len(trial.prompt_tokens)
        positions = None if params.mask_prompt else list(range(n_prompt - 1, n_prompt - 1 + params.max_new_tokens))
        edit = ZeroQuery if params.mask == "query" else ZeroHeadOutput
        distinct = list(dict.fromkeys(tuple(heads) for heads in head_sets))
        interventions = [head_masks(edit, heads, positions) for heads in distinct]
        prefix = None if params.mask_prompt else self.model.run_prefix(trial.prompt_tokens[:-1])
        generations = generate_each(self.model, trial.prompt_tokens, interventions, max_new_tokens=params.max_new_tokens, prefix=prefix)
        answer = {heads: generation.text for heads, generation in zip(distinct, generations)}
        return [answer[tuple(heads)] for heads in head_sets]

    def _summary(self, scores: pd.DataFrame, counted: Tensor, interval_method: str, masking_claims: list[Claim]) -> Report:
        params = self.params
        n_counted = int(counted.sum())
        ranked = scores.sort_values("rank")
        top = ", ".join(f"L{r.layer}.H{r.head} {r.retrieval_score:.2f}" for r in ranked.head(5).itertuples())
        best = ranked.iloc[0]
        claims = [
            Claim.proportion("retrieval.fraction_of_heads", int(scores["is_retrieval"].sum()), len(scores), "heads",
                             f"heads with retrieval score > {params.threshold:g} over {n_counted} counted trials (paper: under 5%); top: {top}"),
            Claim.mean("retrieval.recall_rate", counted.double().numpy(), "trials",
                       f"trials whose answer recalled the needle (ROUGE-1 recall > {params.recall_threshold:g}); preset {params.preset}, "
                       f"lengths {params.lengths}, depths {params.depths}", seed=self.seed),
            Claim("retrieval.top_head_score", float(best["retrieval_score"]), float(best["ci_low"]), float(best["ci_high"]), n_counted, "trials",
                  method=interval_method, detail=f"retrieval score of the top-ranked head, L{best['layer']}.H{best['head']}"),
            *masking_claims,
        ]
        return summary_report(claims)


def trial_credit(top_keys: Int[Tensor, "layer head step"], generation: Generation, span: tuple[int, int]) -> Tensor:
    """Per-head retrieval credit of one trial from the top-1 key of every answer-producing row."""
    hits = copy_hits(top_keys, generation.answer_tokens, generation.tokens, span)
    return retrieval_credit(hits, span[1] - span[0])


def decode_time_scores(model, tokens: Int[Tensor, " prompt"], span: tuple[int, int], max_new_tokens: int) -> tuple[Generation, Tensor]:
    """The definition as the reference runs it: decode greedily and read each step's attention row as it is
    computed (query position = KV length - 1). Returns the generation and the per-head credit."""
    info = model.info
    first = len(tokens) - 1
    top_keys = torch.zeros(info.n_layers, info.n_heads, max_new_tokens + 1, dtype=torch.long)

    def consume(block: AttentionBlock) -> None:
        top_keys[block.layer][:, block.positions.cpu() - first] = top_key(block.probs[0]).cpu()

    with session(model, [AttentionRows(consume, positions=list(range(first, first + max_new_tokens)))]):
        generation = generate(model, tokens, max_new_tokens=max_new_tokens)
    return generation, trial_credit(top_keys[..., : len(generation.answer_tokens)], generation, span)
