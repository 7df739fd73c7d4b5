"""Retrieval heads (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context Factuality").

Needle in a haystack: a needle sentence is inserted at a sentence boundary of filler prose, and a
question asks for it. The model answers greedily (at most ``max_new_tokens``, stopping at end of turn
or at a newline once the answer has begun). At every decoding step with generated token y, head (l, h)
earns 1 / len(needle tokens) when the top-1 key of its query row lies inside the needle span and holds
y. A trial counts when the answer recalls the needle (ROUGE-1 recall > 0.5); retrieval_score is the mean
over counted trials, and a head with score > 0.1 is a retrieval head.

Scoring is two passes per trial: the answer is generated on the fast path (no hooks), then one
teacher-forced forward over prompt + answer computes attention only for the rows that produced the
answer (query position p generated token p + 1), so memory grows with the context, not its square.
Those rows give the same argmaxes as decoding (``scoring="decode"`` scores while decoding instead; the
tests show both give the same scores).

Causal test: after scoring, the needle test is re-run with the top-K heads masked against K random
heads drawn from outside the top max(K) (several seeded draws). Masking zeroes the head's query, which
makes its attention uniform over the prefix (the reference's masking). Like the reference, only the
rows that produce the answer are masked (the last prompt position onward), the prompt itself is
read unmasked; ``mask_prompt=true`` masks every position. ``mask="output"`` zero-ablates the head's
output instead.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from dataclasses import dataclass, field
from importlib import resources

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from lens._capture.interventions import Intervention, ZeroQuery, _rows
from lens._capture.needs import AttentionBlock, AttentionRows
from lens._capture.session import session
from lens._generate import Generation, chat_prompt, generate
from lens._store.schema import Column, ReportSchema
from lens._store.store import Report
from metrics.retrieval import (
    RECALL_THRESHOLD,
    RETRIEVAL_THRESHOLD,
    contains_verbatim,
    copy_hits,
    fraction_above,
    retrieval_credit,
    retrieval_scores,
    top_key,
    unigram_recall,
)
from probes._base import Detector, ForwardPass, Params, ProbeError, builtin_probe_file, register, summary_report

RETRIEVAL = ReportSchema(
    "retrieval",
    "Head-level retrieval scores from needle-in-a-haystack copying (Wu et al. 2024).",
    (
        Column("layer", "int64", "layer index, from 0"),
        Column("head", "int64", "query-head index within the layer, from 0"),
        Column("retrieval_score", "float64", "copy credit per trial (1/needle tokens per step whose top-1 key is the needle token generated), mean over counted trials"),
        Column("is_retrieval", "bool", "retrieval_score > threshold"),
        Column("threshold", "float64", "the threshold used (the paper's 0.1)"),
        Column("rank", "int64", "1 for the highest score; ties broken by layer, then head"),
        Column("n_trials", "int64", "needle trials run"),
        Column("n_counted", "int64", "trials whose answer recalled the needle (ROUGE-1 recall > 0.5), the ones averaged"),
    ),
)

RETRIEVAL_TRIALS = ReportSchema(
    "retrieval_trials",
    "One row per needle-in-a-haystack trial of the retrieval detector.",
    (
        Column("probe", "int64", "probe index, from 0, in the order run"),
        Column("kind", "string", "needle kind (fact, code, place; 'file' for probe-file lines without one)"),
        Column("depth", "float64", "needle depth asked for (0 = start of the haystack, 1 = end); for probe-file lines, the needle's start over the prompt length"),
        Column("length", "int64", "haystack length asked for, in tokens; for probe-file lines, the prompt's length"),
        Column("prompt_tokens", "int64", "tokens of the prompt as fed, chat template included"),
        Column("needle_start", "int64", "first token of the needle span in the prompt"),
        Column("needle_tokens", "int64", "tokens in the needle span"),
        Column("needle", "string", "the needle text a correct answer copies"),
        Column("answer", "string", "the model's greedy answer"),
        Column("stopped_by", "string", "what ended the answer: eos, newline or length"),
        Column("recall", "float64", "ROUGE-1 recall of the needle's words in the answer"),
        Column("exact", "bool", "the answer contains the needle's words verbatim (case and punctuation ignored)"),
        Column("counted", "bool", "recall > 0.5: the trial enters the retrieval scores"),
        Column("top_head", "string", "head with the most copy credit in this trial, as L<layer>.H<head>"),
        Column("top_credit", "float64", "that head's credit in this trial"),
    ),
)

RETRIEVAL_ABLATION = ReportSchema(
    "retrieval_ablation",
    "Needle accuracy with the top-K retrieval heads masked against K random heads (the causal test).",
    (
        Column("condition", "string", "'top' (the K highest-scoring heads) or 'random' (K heads drawn outside the top max(K))"),
        Column("k", "int64", "heads masked"),
        Column("draw", "int64", "random draw index (0 for top); draws are seeded by the census seed"),
        Column("accuracy", "float64", "fraction of trials whose answer contains the needle verbatim"),
        Column("mean_recall", "float64", "mean ROUGE-1 recall of the needle in the answers"),
        Column("recalled", "float64", "fraction of trials with recall > 0.5"),
        Column("n_trials", "int64", "needle trials per condition"),
        Column("heads", "string", "the masked heads, L<layer>.H<head> separated by spaces"),
        Column("mask", "string", "'query' (zeroed query: uniform attention) or 'output' (zeroed head output)"),
        Column("mask_prompt", "bool", "false: only the rows producing the answer are masked (as the reference); true: every position"),
    ),
)

QUESTION = "<book>{context}</book>\nBased on the content of the book, Question: {question}\nAnswer:"
SENTENCE_ENDS = (".", "!", "?")


@dataclass
class RetrievalParams(Params):
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    lengths: list[int] = field(default_factory=lambda: [500, 1000, 2000])
    # Needles per (depth, length) cell; they rotate over the cells, so with 5 depths and 3 needles each
    # needle meets every depth and every length even at 1. Set it to the number of needles for all.
    needles_per_cell: int = 1
    max_new_tokens: int = 50
    threshold: float = RETRIEVAL_THRESHOLD
    recall_threshold: float = RECALL_THRESHOLD
    scoring: str = "teacher_forced"  # or "decode"
    # The causal test re-decodes ablation_probes prompts (the shortest of the run) once per masked
    # condition: len(ks without 0) x (1 + draws) answers each. Defaults sized for the CPU budget.
    ablation_ks: list[int] = field(default_factory=lambda: [0, 5, 10, 20, 30])
    ablation_draws: int = 2
    ablation_probes: int = 2
    mask: str = "query"  # or "output"
    mask_prompt: bool = False


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
    needle: str
    span: tuple[int, int]
    prompt_tokens: Int[Tensor, " prompt"]
    generation: Generation
    credit: Tensor  # layer head
    recall: float


def head_label(layer: int, head: int) -> str:
    return f"L{layer}.H{head}"


def sentence_boundaries(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token indices just after a sentence-ending token (found by decoding each token, no fixed ids), and
    every token's character span in ``text``."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ends = [i + 1 for i, token in enumerate(encoded["input_ids"]) if tokenizer.decode([token]).rstrip().endswith(SENTENCE_ENDS)]
    return ends, [tuple(span) for span in encoded["offset_mapping"]]


def haystack_with_needle(tokenizer, haystack: str, sentence: str, length: int, depth: float) -> str:
    """About ``length`` tokens of ``haystack`` (repeated as needed) ending at a sentence, with ``sentence``
    inserted at the last sentence boundary at or before ``depth`` of the way through."""
    budget = length - len(tokenizer(" " + sentence, add_special_tokens=False)["input_ids"])
    n_haystack = len(tokenizer(haystack, add_special_tokens=False)["input_ids"])
    text = "\n\n".join([haystack] * (budget // n_haystack + 2))
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


def ablation_heads(ranking: list[tuple[int, int]], ks: list[int], draws: int, rng) -> list[tuple[str, int, int, list[tuple[int, int]]]]:
    """(condition, k, draw, heads) for every masking condition: the top k of ``ranking``, and ``draws``
    random sets of k drawn from outside the top max(ks) (the reference meant to exclude its top list but
    compared tuples with lists, so its random sets could include top heads)."""
    excluded = set(ranking[: max(ks, default=0)])
    pool = [head for head in ranking if head not in excluded]
    conditions = []
    for k in ks:
        conditions.append(("top", k, 0, ranking[:k]))
        for draw in range(draws if k > 0 else 1):
            if k > len(pool):
                raise ProbeError(f"retrieval: cannot draw {k} random heads outside the top {len(excluded)} of {len(ranking)} heads")
            conditions.append(("random", k, draw, sorted(rng.sample(pool, k)) if k else []))
    return conditions


@register
class Retrieval(Detector):
    name = "retrieval"
    description = "retrieval heads: copy-from-needle scores in needle-in-a-haystack probes, and a head-masking test"
    reports = (RETRIEVAL, RETRIEVAL_TRIALS, RETRIEVAL_ABLATION)
    probe_fields = ("prompt", "needle")
    prompt_field = "prompt"
    ParamsType = RetrievalParams

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        params = self.params
        if params.scoring not in ("teacher_forced", "decode"):
            raise ProbeError(f"parameter retrieval.scoring must be 'teacher_forced' or 'decode', not {params.scoring!r}")
        if params.mask not in ("query", "output"):
            raise ProbeError(f"parameter retrieval.mask must be 'query' or 'output', not {params.mask!r}")
        if not all(0.0 <= d <= 1.0 for d in params.depths):
            raise ProbeError(f"parameter retrieval.depths must lie in [0, 1], got {params.depths}")
        self.trials: list[Trial] = []

    # -- probes ---------------------------------------------------------------------------------
    def builtin_probes(self) -> list[dict]:
        params = self.params
        needles = builtin_probe_file("retrieval_needles.jsonl")
        haystack = resources.files("probes").joinpath("data", "retrieval_haystack.txt").read_text(encoding="utf-8")
        per_cell = max(1, min(params.needles_per_cell, len(needles)))
        probes = []
        for cell, (length, depth) in enumerate(itertools.product(params.lengths, params.depths)):
            for j in range(per_cell):
                needle = needles[(cell + j) % len(needles)]
                context = haystack_with_needle(self.model.tokenizer, haystack, needle["sentence"], length, depth)
                prompt = chat_prompt(self.model, QUESTION.format(context=context, question=needle["question"]))
                probes.append({"prompt": prompt, "needle": needle["needle"], "kind": needle["kind"], "depth": depth, "length": length})
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

    def finish(self) -> list[Report]:
        info, params = self.model.info, self.params
        if self.trials:
            credits = torch.stack([t.credit for t in self.trials])
            counted = torch.tensor([t.recall > params.recall_threshold for t in self.trials])
        else:
            credits = torch.zeros(0, info.n_layers, info.n_heads, dtype=torch.float64)
            counted = torch.zeros(0, dtype=torch.bool)
        scores = retrieval_scores(credits, counted)
        heads = [(layer, head) for layer in range(info.n_layers) for head in range(info.n_heads)]
        ranking = sorted(heads, key=lambda lh: (-float(scores[lh]), lh))
        rank = {lh: i + 1 for i, lh in enumerate(ranking)}
        scores_frame = pd.DataFrame(
            {
                "layer": [l for l, _ in heads],
                "head": [h for _, h in heads],
                "retrieval_score": [float(scores[lh]) for lh in heads],
                "is_retrieval": [bool(scores[lh] > params.threshold) for lh in heads],
                "threshold": params.threshold,
                "rank": [rank[lh] for lh in heads],
                "n_trials": len(self.trials),
                "n_counted": int(counted.sum()),
            }
        )
        ablation = self._ablation(ranking)
        return [Report("retrieval", scores_frame), Report("retrieval_trials", self._trials_frame()), Report("retrieval_ablation", ablation),
                self._summary(scores, counted, ablation, ranking)]

    def _trials_frame(self) -> pd.DataFrame:
        rows = []
        for t in self.trials:
            best = divmod(int(t.credit.argmax()), t.credit.shape[1])
            rows.append(
                {
                    "probe": t.probe, "kind": t.kind, "depth": t.depth, "length": t.length, "prompt_tokens": len(t.prompt_tokens),
                    "needle_start": t.span[0], "needle_tokens": t.span[1] - t.span[0], "needle": t.needle, "answer": t.generation.text,
                    "stopped_by": t.generation.stopped_by, "recall": t.recall, "exact": contains_verbatim(t.needle, t.generation.text),
                    "counted": t.recall > self.params.recall_threshold, "top_head": head_label(*best), "top_credit": float(t.credit[best]),
                }
            )
        return pd.DataFrame(rows, columns=RETRIEVAL_TRIALS.column_names[3:])

    # -- causal test ----------------------------------------------------------------------------
    def _ablation(self, ranking: list[tuple[int, int]]) -> pd.DataFrame:
        params = self.params
        trials = sorted(self.trials, key=lambda t: (len(t.prompt_tokens), t.probe))[: params.ablation_probes]
        conditions = ablation_heads(ranking, sorted(set(params.ablation_ks)), params.ablation_draws, random.Random(self.seed))
        # answers[condition][trial]; unmasked answers are the scoring pass's own (the same greedy decode).
        answers: list[list[str]] = [[] for _ in conditions]
        for trial in trials:
            prefix = None if params.mask_prompt else self._prompt_cache(trial.prompt_tokens)
            for answer, (_, _, _, heads) in zip(answers, conditions):
                answer.append(self._masked_answer(trial, heads, prefix) if heads else trial.generation.text)
        rows = []
        n = max(len(trials), 1)
        for (condition, k, draw, heads), texts in zip(conditions, answers):
            recalls = [unigram_recall(t.needle, a) for t, a in zip(trials, texts)]
            rows.append(
                {
                    "condition": condition, "k": k, "draw": draw,
                    "accuracy": sum(contains_verbatim(t.needle, a) for t, a in zip(trials, texts)) / n,
                    "mean_recall": sum(recalls) / n,
                    "recalled": sum(r > params.recall_threshold for r in recalls) / n,
                    "n_trials": len(trials), "heads": " ".join(head_label(*lh) for lh in heads),
                    "mask": params.mask, "mask_prompt": params.mask_prompt,
                }
            )
        return pd.DataFrame(rows, columns=RETRIEVAL_ABLATION.column_names[3:])

    def _prompt_cache(self, prompt_tokens: Tensor):
        """KV cache of every prompt token but the last, unmasked: with decoding-only masking every
        condition shares it, as the reference prefilled once and masked from the last prompt token on.
        It keeps every key (``Model.prefix_cache``), so masks apply at absolute positions past Gemma 3's window."""
        return self.model.prefix_cache(prompt_tokens[:-1])

    def _masked_answer(self, trial: Trial, heads: list[tuple[int, int]], prefix=None) -> str:
        params = self.params
        n_prompt = len(trial.prompt_tokens)
        positions = None if params.mask_prompt else list(range(n_prompt - 1, n_prompt - 1 + params.max_new_tokens))
        edit = ZeroQuery if params.mask == "query" else ZeroHeadOutput
        by_layer: dict[int, list[int]] = {}
        for layer, head in heads:
            by_layer.setdefault(layer, []).append(head)
        interventions = [edit(layer, layer_heads, positions) for layer, layer_heads in sorted(by_layer.items())]
        cache = copy.deepcopy(prefix) if prefix is not None else None
        with session(self.model, interventions=interventions):
            return generate(self.model, trial.prompt_tokens, max_new_tokens=params.max_new_tokens, past_key_values=cache).text

    def _summary(self, scores: Tensor, counted: Tensor, ablation: pd.DataFrame, ranking: list[tuple[int, int]]) -> Report:
        params = self.params
        top = ", ".join(f"{head_label(*lh)} {float(scores[lh]):.2f}" for lh in ranking[:5])
        rows = [
            ("retrieval_heads_percent", 100.0 * fraction_above(scores, params.threshold),
             f"percent of {scores.numel()} heads with retrieval score > {params.threshold:g} (paper: under 5%); top: {top}"),
            ("max_retrieval_score", float(scores.max()), f"highest retrieval score ({head_label(*ranking[0])})"),
            ("needle_recall_rate", float(counted.double().mean()) if len(counted) else math.nan,
             f"fraction of {len(counted)} trials whose answer recalled the needle (ROUGE-1 recall > {params.recall_threshold:g})"),
        ]
        if not ablation.empty:
            k_max = int(ablation["k"].max())
            at_max = ablation[ablation["k"] == k_max].groupby("condition")["accuracy"].mean()
            baseline = float(ablation.loc[ablation["k"] == 0, "accuracy"].iloc[0]) if (ablation["k"] == 0).any() else math.nan
            n = int(ablation["n_trials"].iloc[0])
            rows += [
                ("ablation_accuracy_k0", baseline, f"needle accuracy with no head masked ({n} trials)"),
                (f"ablation_accuracy_top{k_max}", float(at_max.get("top", math.nan)), f"needle accuracy with the top {k_max} retrieval heads masked ({params.mask})"),
                (f"ablation_accuracy_random{k_max}", float(at_max.get("random", math.nan)),
                 f"needle accuracy with {k_max} random heads masked, mean over {params.ablation_draws} draws"),
            ]
        return summary_report(rows)


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
