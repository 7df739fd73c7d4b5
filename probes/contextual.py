"""Contextual heads and focus directions (Zhu et al., "Focus Directions Make Your Language Models Pay
More Attention to Relevant Contexts", 2025; reference code billzyx/focus_direction).

Probe: multi-document question answering about invented facts (probes/data/contextual_questions.jsonl,
written for the project, so the model cannot answer from memory). One gold document answers the
question; the others are documents of other questions; the gold document moves across positions. The
model answers, then one teacher-forced pass over prompt + answer reads, for the answer's tokens only,
the attention of every head on the gold document, on the distractors and on the first tokens
(the reference's keys 0 and 1: ``n_first_tokens``).

contextual_score[l, h] = mean over probes of the mean over response tokens t of sum_{s in gold} A[t, s].

Focus directions, as the reference trains them (``train_attn_only.py``): one vector per head, added to
the head's rotated query, trained with each layer's inputs frozen at the unmodified model's (so heads
train independently) to raise the head's gold-document mass over the response that the model gives
when it sees only the gold document; AdamW, one probe per step, shuffled, vectors initialised
N(0, 0.01). Where the reference runs a fixed 10 epochs at learning rate 1e-3 over some 6,600 probes,
training here stops when the loss on validation questions stops improving and keeps the best epoch
(``contextual_training``); the default learning rate is 1e-2 because the sets are far smaller. The
directions of the top-k contextual heads (chosen on the training questions) are applied together, at
the scale they were trained at (1; ``scale_sweep`` adds others), to held-out questions: the effect is
the paired difference per held-out probe, with against without, in the top heads' gold-document mass
and in answer accuracy (``focus_effect`` and the summary). A vector added to every key is useless: it
adds the constant q.v to a whole row of scores, which softmax cancels, so only query vectors are
trained (the reference trains both; its key vectors cannot change attention).

Splits are by question, never by position: ``train`` questions fit the directions, ``validation``
questions stop the training, ``test`` questions measure the effect.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import string
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import safetensors.torch
import torch
from jaxtyping import Bool, Float
from pydantic import Field
from torch import Tensor

from lens._capture.interventions import AddToQuery, Intervention
from lens._capture.needs import AttentionBlock, AttentionRows
from lens._capture.session import capture, session
from lens._generate import chat_prompt, generate
from lens._store.schema import HEAD, LAYER, Column, ReportSchema
from lens._store.store import Report
from metrics.contextual import focused_set_mass, heads_mean, score_ranks, set_mass, span_keys, top_heads
from metrics.uncertainty import adjust_p_values, column_mean_intervals, mean_interval, proportion_interval
from probes._base import Claim, Detector, ForwardPass, PaperClaim, Params, ProbeError, register, summary_report
from probes._overview import OKABE_ITO, OverviewLabel, OverviewScore

CONTEXTUAL = ReportSchema(
    "contextual",
    "Contextual heads: attention of the answer's tokens on the gold document (Zhu et al. 2025).",
    (
        LAYER,
        HEAD,
        Column("contextual_score", "float64", "attention mass on the gold document, mean over response tokens, then over probes"),
        Column("ci_low", "float64", "lower end of the 95% bootstrap interval of contextual_score over probes (NaN: one probe)", nullable=True),
        Column("ci_high", "float64", "upper end of that interval", nullable=True),
        Column("distractor_score", "float64", "attention mass on all distractor documents together, same means (probes that name them)", nullable=True),
        Column("first_tokens_score", "float64", "attention mass on the first n_first_tokens keys of the sequence (reference: 2), same means"),
        Column("rank", "int64", "1 for the highest contextual_score"),
        Column("n_probes", "int64", "probes averaged over (answers of at least one token)"),
    ),
)

FOCUS_EFFECT = ReportSchema(
    "focus_effect",
    "Held-out questions answered without (scale 0) and with focus directions on the top-k contextual heads, by gold position.",
    (
        Column("gold_position", "int64", "index of the gold document among the documents, from 0; -1: every held-out probe together"),
        Column("scale", "float64", "factor the trained directions are multiplied by: 0 without, 1 as trained, others from scale_sweep"),
        Column("n_probes", "int64", "held-out probes in this row"),
        Column("gold_mass_top_heads", "float64", "attention mass on the gold document of the top-k heads, mean over the unfocused answer's tokens, heads and probes"),
        Column("gold_mass_ci_low", "float64", "lower end of its 95% bootstrap interval over probes (NaN: one probe)", nullable=True),
        Column("gold_mass_ci_high", "float64", "upper end of that interval", nullable=True),
        Column("accuracy", "float64", "fraction of answers that contain the expected answer (null: probes give none)", nullable=True),
        Column("accuracy_ci_low", "float64", "lower end of its 95% Wilson interval over probes", nullable=True),
        Column("accuracy_ci_high", "float64", "upper end of that interval", nullable=True),
        Column("top_k", "int64", "heads given directions: the top-k by contextual score on the training questions"),
        Column("path", "string", "the directions (safetensors), relative to the store; empty when not saved"),
    ),
)

CONTEXTUAL_TRAINING = ReportSchema(
    "contextual_training",
    "Focus-direction training curve: loss on training and validation questions after each epoch (epoch 0: before training).",
    (
        Column("epoch", "int64", "epochs completed (0: the initial directions)"),
        Column("step", "int64", "optimiser steps so far (one training probe per step)"),
        Column("train_loss", "float64", "minus the top heads' gold-document mass on the training probes: mean of the epoch's step losses (epoch 0: at the start)"),
        Column("validation_loss", "float64", "the same loss on the validation probes, after the epoch (directions frozen)"),
        Column("kept", "bool", "the epoch whose directions were kept (lowest validation loss)"),
        Column("n_train", "int64", "training probes"),
        Column("n_validation", "int64", "validation probes"),
    ),
)

SPLITS = ("train", "validation", "test")
# Split of the i-th question in a seeded order: half held out; of the rest, one in three validates.
# Any prefix of the order is balanced, so fewer questions keep the same proportions.
SPLIT_CYCLE = ("train", "test", "validation", "test", "train", "test")
# Lost in the Middle's QA prompt (the reference's data), with a request for a short answer.
INSTRUCTION = "Write a high-quality answer for the given question using only the provided search results (some of which might be irrelevant)."
ANSWER_REQUEST = "Answer in a few words."


@dataclass
class ContextualParams(Params):
    n_questions: Annotated[int, Field(ge=0)] = 8  # questions from probes/data/contextual_questions.jsonl; 0: all 48 (the full set)
    n_documents: Annotated[int, Field(ge=1)] = 8  # documents per prompt (the paper: 20); fewer when the context is short
    gold_positions: Literal["grid", "all"] = "grid"  # "grid": first, quarter points, last (0, 4, 9, 14, 19 at 20); "all": every position
    n_first_tokens: Annotated[int, Field(ge=1)] = 2  # keys counted as the first tokens (the reference: 0 and 1)
    max_new_tokens: Annotated[int, Field(ge=1)] = 16
    top_k: Annotated[int, Field(ge=1)] = 20
    learning_rate: Annotated[float, Field(gt=0)] = 1e-2  # AdamW; the reference's 1e-3 runs ~10^4 steps, 10 times more than our sets allow
    max_epochs: Annotated[int, Field(ge=1)] = 200  # cap; training stops earlier when the validation loss stops improving
    patience: Annotated[int, Field(ge=1)] = 5  # epochs without a lower validation loss before stopping
    # Extra scales to evaluate the trained directions at, e.g. "0.25,0.5,2" (comma-separated numbers).
    scale_sweep: Annotated[str, Field(pattern=r"^\s*([0-9.]+\s*(,\s*[0-9.]+\s*)*)?$")] = ""


def gold_grid(n_documents: int, which: str = "grid") -> list[int]:
    """Gold positions: every one, or first, last and three quarter points (0, 4, 9, 14, 19 at 20)."""
    if which == "all":
        return list(range(n_documents))
    return sorted({0, *(math.ceil(n_documents * j / 4) - 1 for j in range(1, 5))})


def normalize_answer(text: str) -> str:
    """SQuAD normalisation, as the reference's ``best_subspan_em``: lower case, no punctuation, no
    articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def contains_answer(response: str, answer: str) -> bool:
    """Whether the normalised answer occurs in the normalised response (the reference's accuracy)."""
    return normalize_answer(answer) in normalize_answer(response)


def split_of(order_index: int) -> str:
    return SPLIT_CYCLE[order_index % len(SPLIT_CYCLE)]


def assign_splits(groups: Sequence[str], given: dict[str, str], seed: int) -> dict[str, str]:
    """Split of each question group: ``given`` where the probes say, else by a seeded order over the
    rest (``SPLIT_CYCLE``); with no validation group, every third training group (at least one, when
    there are two) becomes one."""
    unique = list(dict.fromkeys(groups))
    rest = [g for g in unique if g not in given]
    random.Random(seed).shuffle(rest)
    splits = dict(given) | {group: split_of(i) for i, group in enumerate(rest)}
    train = [g for g in unique if splits[g] == "train"]
    if "validation" not in splits.values() and len(train) >= 2:
        random.Random(seed).shuffle(train)
        splits |= {group: "validation" for group in train[: max(1, len(train) // 3)]}
    return splits


@dataclass
class FocusDirections:
    """One query vector per head; ``interventions(scale)`` adds ``scale`` times each to its head."""

    heads: list[tuple[int, int]]
    vectors: Float[Tensor, "head d_head"]

    def interventions(self, scale: float = 1.0) -> list[AddToQuery]:
        rows_by_layer: dict[int, list[int]] = defaultdict(list)
        for row, (layer, _) in enumerate(self.heads):
            rows_by_layer[layer].append(row)
        return [AddToQuery(layer, [self.heads[row][1] for row in rows], self.vectors[rows], scale) for layer, rows in rows_by_layer.items()]

    def random_like(self, generator: torch.Generator) -> FocusDirections:
        """Directions of the same norms as these, pointing at random (a control)."""
        noise = torch.randn(self.vectors.shape, generator=generator)
        noise = noise / noise.norm(dim=-1, keepdim=True) * self.vectors.detach().cpu().norm(dim=-1, keepdim=True)
        return FocusDirections(self.heads, noise.to(self.vectors))

    def to_bytes(self, metadata: dict[str, str]) -> bytes:
        tensors = {"vectors": self.vectors.detach().float().cpu().contiguous(), "heads": torch.tensor(self.heads, dtype=torch.long)}
        return safetensors.torch.save(tensors, metadata=metadata)


def load_focus_directions(path: str | Path) -> FocusDirections:
    """Read directions saved by the census (``focus_effect.path``, relative to the store)."""
    tensors = safetensors.torch.load_file(str(path))
    return FocusDirections([tuple(pair) for pair in tensors["heads"].tolist()], tensors["vectors"])


@dataclass
class Answered:
    """A probe after its teacher-forced pass: what focus training and evaluation need again."""

    question: str
    split: str | None  # None: assigned in ``finish`` by question
    gold_position: int
    tokens: Tensor
    n_prompt: int
    gold_keys: Bool[Tensor, " key"]
    # [3, layer, head]: mass on the gold document, the distractors, the first tokens; mean over response rows.
    mass: Float[Tensor, "3 layer head"]
    has_distractors: bool
    answer: str | None
    correct: bool | None
    gold_prompt: str | None

    @property
    def response_positions(self) -> list[int]:
        return list(range(self.n_prompt, len(self.tokens)))


@dataclass
class FrozenRows:
    """One probe seen by the unmodified model, for training with every layer's inputs frozen: the
    heads' attention rows at the response tokens, the keys they attend to, the gold keys."""

    probs: Float[Tensor, "head row key"]
    keys: Float[Tensor, "head key d_head"]
    scaling: Float[Tensor, " head"]
    gold: Bool[Tensor, " key"]

    def loss(self, directions: Float[Tensor, "head d_head"]) -> Tensor:
        """The reference's loss: minus the gold-document mass, mean over heads and response rows."""
        return -focused_set_mass(self.probs, self.keys, directions, self.scaling, self.gold).mean()


@dataclass
class Epoch:
    epoch: int
    step: int
    train_loss: float
    validation_loss: float


@dataclass
class RecordKeys(Intervention):
    """Keeps a copy of the rotated keys of ``kv_heads`` (edits nothing)."""

    layer: int
    kv_heads: Sequence[int]
    keep: dict

    def edit_key(self, key, positions):
        self.keep[self.layer] = key[0, list(self.kv_heads)].detach().to(torch.float16).cpu()
        return key


def train_focus_directions(
    train: Sequence[FrozenRows],
    validation: Sequence[FrozenRows],
    *,
    learning_rate: float,
    max_epochs: int,
    patience: int,
    generator: torch.Generator,
) -> tuple[Tensor, list[Epoch], int]:
    """The reference's schedule (AdamW, one probe a step, shuffled, N(0, 0.01) start) until the
    validation loss has not improved for ``patience`` epochs or ``max_epochs`` pass. Returns the
    directions of the epoch with the lowest validation loss, the curve, and that epoch."""
    n_heads, d_head = train[0].probs.shape[0], train[0].keys.shape[-1]
    vectors = (torch.randn(n_heads, d_head, generator=generator) * 0.01).requires_grad_()
    optimizer = torch.optim.AdamW([vectors], lr=learning_rate)

    def mean_loss(examples: Sequence[FrozenRows]) -> float:
        with torch.no_grad():
            return float(np.mean([example.loss(vectors).item() for example in examples]))

    curve = [Epoch(0, 0, mean_loss(train), mean_loss(validation))]
    best_loss, best_vectors, best_epoch = curve[0].validation_loss, vectors.detach().clone(), 0
    step = 0
    for epoch in range(1, max_epochs + 1):
        losses = []
        for i in torch.randperm(len(train), generator=generator).tolist():
            loss = train[i].loss(vectors)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
        curve.append(Epoch(epoch, step, float(np.mean(losses)), mean_loss(validation)))
        if curve[-1].validation_loss < best_loss:
            best_loss, best_vectors, best_epoch = curve[-1].validation_loss, vectors.detach().clone(), epoch
        elif epoch - best_epoch >= patience:
            break
    return best_vectors, curve, best_epoch


def heads_gold_mass(model, example: Answered, heads: Sequence[tuple[int, int]], interventions=()) -> Float[Tensor, " head"]:
    """Attention mass on the gold document of each of ``heads``, mean over the response tokens, with
    ``interventions`` applied (the whole model runs: earlier layers' directions change later inputs)."""
    index = defaultdict(list)
    for row, (layer, head) in enumerate(heads):
        index[layer].append((row, head))
    total = torch.zeros(len(heads), dtype=torch.float64)

    def consume(block: AttentionBlock) -> None:
        rows = torch.tensor([row for row, _ in index[block.layer]])
        selected = block.probs[0, [head for _, head in index[block.layer]]]
        total.index_add_(0, rows, set_mass(selected, example.gold_keys).sum(-1).double().cpu())

    needs = [AttentionRows(consume, positions=example.response_positions, layers=sorted(index))]
    capture(model, example.tokens, needs, interventions)
    return total / len(example.response_positions)


def heldout_effect(model, examples: Sequence[Answered], focus: FocusDirections, scale: float, *, max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Per held-out probe, with ``focus`` at ``scale``: the heads' mean gold-document mass over the
    unfocused answer's tokens, and whether the focused answer contains the expected one (NaN: none given)."""
    interventions = focus.interventions(scale)
    mass, correct = [], []
    for example in examples:
        mass.append(heads_gold_mass(model, example, focus.heads, interventions).mean().item())
        if example.answer is None:
            correct.append(math.nan)
            continue
        with session(model, interventions=interventions):
            text = generate(model, example.tokens[: example.n_prompt], max_new_tokens=max_new_tokens).text
        correct.append(float(contains_answer(text, example.answer)))
    return np.array(mass), np.array(correct)


# The overview labels a head contextual when it ranks among the first OVERVIEW_TOP.
OVERVIEW_TOP = 20


@register
class Contextual(Detector):
    name = "contextual"
    description = "contextual heads (gold-document attention in multi-document QA) and focus directions"
    reports = (CONTEXTUAL, FOCUS_EFFECT, CONTEXTUAL_TRAINING)
    # Optional fields: "response" (teacher-forced instead of the model's answer), "answer" (for accuracy),
    # "distractors" (substrings of the prompt), "gold_position" (int), "question" (the group a split keeps
    # together; default: the gold text), "split" ("train", "validation" or "test"; default: by question),
    # "gold_prompt" (the prompt with only the gold document: training reads the model's answer to it).
    probe_fields = ("prompt", "gold")
    prompt_field = "prompt"
    paper_claims = {
        "contextual.focus_effect_gold_mass": PaperClaim(
            "Zhu et al. 2025: focus directions raise the contextual heads' attention on the relevant document", null=0.0, direction="above",
        ),
        "contextual.focus_effect_accuracy": PaperClaim(
            "Zhu et al. 2025: raising the contextual heads' attention on the relevant document improves answers", null=0.0, direction="above",
            note="the paper scales the directions by 0.2-0.3; this claim applies them at the scale trained",
        ),
    }
    ParamsType = ContextualParams
    color = OKABE_ITO["orange"]
    overview_labels = (OverviewLabel("contextual", "contextual", "rank", "diamond", (0.22, -0.2), top=OVERVIEW_TOP),)
    overview_scores = (OverviewScore("contextual_score", "contextual", "contextual_score"),)
    presets = {"full": {"n_questions": "0", "gold_positions": "all"}}  # every question at every position
    accumulates = ("answered", "_n_empty")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.params.gold_positions not in ("grid", "all"):
            raise ProbeError(f"contextual: gold_positions must be 'grid' or 'all', got {self.params.gold_positions!r}")
        try:
            scales = {float(s) for s in self.params.scale_sweep.split(",") if s.strip()}
        except ValueError:
            raise ProbeError(f"contextual: scale_sweep must be numbers separated by commas, got {self.params.scale_sweep!r}") from None
        self.scales = [1.0, *sorted(scales - {0.0, 1.0})]  # 1: the scale trained at; 0 is the baseline
        self.answered: list[Answered] = []
        self._n_empty = 0
        self._gold_responses: dict[str, Tensor] = {}

    # -- probes ---------------------------------------------------------------------------------
    def builtin_probes(self) -> list[dict]:
        text = resources.files("probes").joinpath("data", "contextual_questions.jsonl").read_text(encoding="utf-8")
        questions = [json.loads(line) for line in text.splitlines() if line.strip()]
        p = self.params
        if not 0 <= p.n_questions <= len(questions):
            raise ProbeError(f"contextual: n_questions must be between 0 (all) and {len(questions)}, got {p.n_questions}")
        n_documents = p.n_documents
        while n_documents > 1:
            probes = self._qa_probes(questions, n_documents)
            longest = max(len(self.tokens(probe["prompt"])) for probe in probes)
            if longest + self.extra_tokens() <= self.model.info.n_ctx:
                return probes
            n_documents -= 1
        raise ProbeError(f"contextual: even two documents do not fit {self.model.name}'s context")

    def _prompt(self, documents: list[dict], question: str) -> str:
        listing = "\n".join(f"Document [{i + 1}](Title: {d['title']}) {d['document']}" for i, d in enumerate(documents))
        return chat_prompt(self.model, f"{INSTRUCTION}\n\n{listing}\n\nQuestion: {question}\n{ANSWER_REQUEST}")

    def _qa_probes(self, questions: list[dict], n_documents: int) -> list[dict]:
        """Every chosen question at every gold position. The split is fixed per question by a seeded
        order over the whole file; distractors come from questions on the same side of the held-out
        line, so no held-out fact is ever read while training."""
        rng = random.Random(self.seed)
        order = rng.sample(range(len(questions)), len(questions))
        split = {q: split_of(i) for i, q in enumerate(order)}
        chosen = order[: self.params.n_questions or len(questions)]
        probes = []
        for q in chosen:
            side = [o for o in order if o != q and (split[o] == "test") == (split[q] == "test")]
            if len(side) < n_documents - 1:
                raise ProbeError(f"contextual: {n_documents} documents need {n_documents - 1} distractors; the file gives {len(side)}")
            gold = questions[q]
            distractors = [questions[o] for o in rng.sample(side, n_documents - 1)]
            for position in gold_grid(n_documents, self.params.gold_positions):
                documents = distractors[:position] + [gold] + distractors[position:]
                probes.append(
                    {
                        "prompt": self._prompt(documents, gold["question"]),
                        "gold": f"(Title: {gold['title']}) {gold['document']}",
                        "distractors": [f"(Title: {d['title']}) {d['document']}" for d in distractors],
                        "answer": gold["answer"],
                        "gold_position": position,
                        "question": gold["title"],
                        "split": split[q],
                        "gold_prompt": self._prompt([gold], gold["question"]),
                    }
                )
        return probes

    def extra_tokens(self) -> int:
        return self.params.max_new_tokens

    def check_probe(self, probe, where: str) -> dict:
        probe = super().check_probe(probe, where)
        prompt = probe["prompt"]
        for name in ("response", "answer", "question", "gold_prompt"):
            if name in probe and not (isinstance(probe[name], str) and probe[name]):
                raise ProbeError(f"{where}: {name!r} must be a non-empty string")
        distractors = probe.get("distractors", [])
        if not isinstance(distractors, list) or not all(isinstance(d, str) and d for d in distractors):
            raise ProbeError(f"{where}: 'distractors' must be a list of non-empty strings")
        for label, text in [("gold", probe["gold"])] + [("distractor", d) for d in distractors]:
            count = prompt.count(text)
            if count != 1:
                raise ProbeError(f"{where}: the {label} text {text[:40]!r} occurs {count} times in the prompt; it must occur once")
        if "gold_position" in probe and not (isinstance(probe["gold_position"], int) and probe["gold_position"] >= 0):
            raise ProbeError(f"{where}: 'gold_position' must be a non-negative integer")
        if probe.get("split", "train") not in SPLITS:
            raise ProbeError(f"{where}: 'split' must be one of {list(SPLITS)}")
        if "response" in probe:
            n_tokens = len(self.tokens(prompt)) + len(self.model.tokenize(probe["response"]))
            self.model.check_length(n_tokens, what=f"{where}: prompt plus response")
        if "gold_prompt" in probe:
            self.model.check_length(len(self.tokens(probe["gold_prompt"])) + self.extra_tokens(), what=f"{where}: gold_prompt")
        return probe

    def _token_span(self, prompt: str, text: str) -> tuple[int, int]:
        """Tokens of ``prompt`` that overlap the (single) occurrence of ``text``."""
        start = prompt.index(text)
        end = start + len(text)
        offsets = self.model.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        inside = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
        shift = self.bos_shift(prompt)
        return inside[0] + shift, inside[-1] + 1 + shift

    # -- running --------------------------------------------------------------------------------
    def passes(self, probe: dict, index: int):
        prompt_tokens = self.tokens(probe["prompt"])
        answer = probe.get("answer")
        generated = None
        if "response" not in probe or answer is not None:
            generated = generate(self.model, prompt_tokens, max_new_tokens=self.params.max_new_tokens)
        response_tokens = self.model.tokenize(probe["response"]) if "response" in probe else generated.answer_tokens
        if len(response_tokens) == 0:
            self._n_empty += 1
            return
        tokens = torch.cat([prompt_tokens, response_tokens])
        key_sets = torch.stack(
            [
                span_keys(len(tokens), [self._token_span(probe["prompt"], probe["gold"])]),
                span_keys(len(tokens), [self._token_span(probe["prompt"], d) for d in probe.get("distractors", [])]),
                span_keys(len(tokens), [(0, self.params.n_first_tokens)]),
            ]
        )
        info = self.model.info
        mass = torch.zeros(3, info.n_layers, info.n_heads, dtype=torch.float64)

        def accumulate(block: AttentionBlock) -> None:
            for i, keys in enumerate(key_sets):
                mass[i, block.layer] += set_mass(block.probs[0], keys).sum(-1).double().cpu()

        def done() -> None:
            self.answered.append(
                Answered(
                    question=probe.get("question", probe["gold"]),
                    split=probe.get("split"),
                    gold_position=probe.get("gold_position", -1),
                    tokens=tokens,
                    n_prompt=len(prompt_tokens),
                    gold_keys=key_sets[0],
                    mass=mass / len(response_tokens),
                    has_distractors=bool(probe.get("distractors")),
                    answer=answer,
                    correct=contains_answer(generated.text, answer) if answer is not None else None,
                    gold_prompt=probe.get("gold_prompt"),
                )
            )

        positions = list(range(len(prompt_tokens), len(tokens)))
        yield ForwardPass(tokens, [AttentionRows(accumulate, positions=positions)], done=done)

    def stages(self) -> list[str]:
        return ["focus"]

    def run_stage(self, name: str):
        return self._focus() if name == "focus" else super().run_stage(name)

    def finish(self) -> list[Report]:
        contextual, claims = self._contextual_report()
        effect, training, focus_claims, focus = self.stage("focus")
        if focus is not None:  # saved here, not in the stage: a stage may run where the store is not
            effect = effect.assign(path=self._save(focus))
        if self._n_empty:
            claims.append(Claim.count("contextual.probes_with_empty_answer", self._n_empty, "probes", "probes skipped: the model answered nothing"))
        return [Report("contextual", contextual), Report("focus_effect", effect), Report("contextual_training", training), summary_report(claims + focus_claims)]

    def _contextual_report(self) -> tuple[pd.DataFrame, list[Claim]]:
        info = self.model.info
        answered = self.answered
        nan = torch.full((info.n_layers, info.n_heads), float("nan"), dtype=torch.float64)
        scores = distractor = first = low = high = nan
        if answered:
            mass = torch.stack([a.mass for a in answered])  # probe, set, layer, head
            with_distractors = mass[[a.has_distractors for a in answered]]
            scores, first = mass[:, 0].mean(0), mass[:, 2].mean(0)
            distractor = with_distractors[:, 1].mean(0) if len(with_distractors) else nan
            lows, highs, _ = column_mean_intervals(mass[:, 0].flatten(1).numpy(), seed=self.seed)
            low, high = torch.from_numpy(lows).view_as(scores), torch.from_numpy(highs).view_as(scores)
        layer, head = torch.meshgrid(torch.arange(info.n_layers), torch.arange(info.n_heads), indexing="ij")
        frame = pd.DataFrame(
            {
                "layer": layer.flatten().numpy(),
                "head": head.flatten().numpy(),
                "contextual_score": scores.flatten().numpy(),
                "ci_low": low.flatten().numpy(),
                "ci_high": high.flatten().numpy(),
                "distractor_score": distractor.flatten().numpy(),
                "first_tokens_score": first.flatten().numpy(),
                "rank": score_ranks(scores).flatten().numpy(),
                "n_probes": len(answered),
            }
        )
        if not answered:
            return frame, []
        best = top_heads(scores, 1)[0]
        per_probe = mass[:, 0, best[0], best[1]].numpy()
        n_first = self.params.n_first_tokens
        claims = [
            Claim.mean("contextual.top_head_score", per_probe, "probes",
                       f"gold-document mass of the answer's tokens in the top contextual head, L{best[0]}.H{best[1]} (chosen on these probes)", seed=self.seed),
            Claim.mean("contextual.mean_head_gold_mass", mass[:, 0].flatten(1).mean(1).numpy(), "probes",
                       "gold-document mass of the answer's tokens, mean over every head", seed=self.seed),
            Claim.mean("contextual.mean_head_first_tokens_mass", mass[:, 2].flatten(1).mean(1).numpy(), "probes",
                       f"mass on the first {n_first} tokens of the sequence, mean over every head", seed=self.seed),
        ]
        return frame, claims

    # -- focus directions -----------------------------------------------------------------------
    def _focus(self) -> tuple[pd.DataFrame, pd.DataFrame, list[Claim], FocusDirections | None]:
        given = {a.question: a.split for a in self.answered if a.split is not None}
        splits = assign_splits([a.question for a in self.answered], given, self.seed)
        by_split = {name: [a for a in self.answered if splits[a.question] == name] for name in SPLITS}
        empty = (FOCUS_EFFECT.empty_rows(), CONTEXTUAL_TRAINING.empty_rows())
        if not all(by_split.values()):
            counts = ", ".join(f"{len(v)} {k}" for k, v in by_split.items())
            return *empty, [Claim.count("contextual.focus_skipped", 1, "runs",
                                        f"focus directions need training, validation and held-out questions; got {counts} probes")], None
        p = self.params
        train, validation, test = by_split["train"], by_split["validation"], by_split["test"]
        train_scores = torch.stack([a.mass[0] for a in train]).mean(0)
        heads = top_heads(train_scores, min(p.top_k, train_scores.numel()))
        vectors, curve, kept = train_focus_directions(
            [self._frozen_rows(a, heads) for a in train],
            [self._frozen_rows(a, heads) for a in validation],
            learning_rate=p.learning_rate, max_epochs=p.max_epochs, patience=p.patience, generator=self.generator,
        )
        focus = FocusDirections(heads, vectors.to(self.model.device))
        training = pd.DataFrame([vars(e) for e in curve]).assign(kept=lambda f: f["epoch"] == kept, n_train=len(train), n_validation=len(validation))

        base_mass = np.array([heads_mean(a.mass[0], heads).item() for a in test])
        base_correct = np.array([math.nan if a.correct is None else float(a.correct) for a in test])
        results = {0.0: (base_mass, base_correct)}
        for scale in self.scales:
            results[scale] = heldout_effect(self.model, test, focus, scale, max_new_tokens=p.max_new_tokens)
        effect = self._effect_frame(test, results).assign(top_k=len(heads), path="")
        return effect, training, self._focus_claims(results, len(heads), len(curve) - 1, kept), focus

    def _frozen_rows(self, example: Answered, heads: list[tuple[int, int]]) -> FrozenRows:
        """The unmodified model's attention rows and keys for the heads, over the prompt followed by
        the answer the model gives with only the gold document (the reference's training target)."""
        tokens = example.tokens
        if example.gold_prompt is not None:
            if example.gold_prompt not in self._gold_responses:
                gold_only = generate(self.model, self.tokens(example.gold_prompt), max_new_tokens=self.params.max_new_tokens)
                self._gold_responses[example.gold_prompt] = gold_only.answer_tokens
            response = self._gold_responses[example.gold_prompt]
            if len(response):
                tokens = torch.cat([tokens[: example.n_prompt], response])
        group = self.model.info.n_heads // self.model.info.n_kv_heads
        kv_heads = defaultdict(set)
        for layer, head in heads:
            kv_heads[layer].add(head // group)
        kv_index = {layer: sorted(kv) for layer, kv in kv_heads.items()}
        rows, keys = defaultdict(list), {}

        def consume(block: AttentionBlock) -> None:
            # Blocks of early rows see fewer keys; the later keys get zero attention from them.
            probs = block.probs[0].detach().float().cpu()
            rows[block.layer].append(torch.nn.functional.pad(probs, (0, len(tokens) - probs.shape[-1])))

        positions = list(range(example.n_prompt, len(tokens)))
        recorders = [RecordKeys(layer, kv_index[layer], keys) for layer in kv_index]
        with torch.no_grad():
            capture(self.model, tokens, [AttentionRows(consume, positions=positions, layers=sorted(kv_index))], recorders)
        if self.model.info.attn_softcap is not None:
            raise ProbeError(f"contextual: {self.model.name} soft-caps attention scores; frozen-input focus training assumes it does not")
        scaling = [self.model.attention_scale(layer) for layer, _ in heads]
        return FrozenRows(
            probs=torch.stack([torch.cat(rows[layer], dim=1)[head] for layer, head in heads]),
            keys=torch.stack([keys[layer][kv_index[layer].index(head // group)] for layer, head in heads]),
            scaling=torch.tensor(scaling),
            gold=example.gold_keys,
        )

    def _effect_frame(self, test: list[Answered], results: dict[float, tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
        positions = np.array([a.gold_position for a in test])
        rows = []
        for scale, (mass, correct) in sorted(results.items()):
            for position in [-1, *sorted(set(positions[positions >= 0].tolist()))]:
                where = positions == position if position >= 0 else np.ones(len(test), dtype=bool)
                mass_interval = mean_interval(mass[where], seed=self.seed)
                answered = correct[where][~np.isnan(correct[where])]
                accuracy = proportion_interval(int(answered.sum()), len(answered))
                rows.append({
                    "gold_position": position, "scale": scale, "n_probes": int(where.sum()),
                    "gold_mass_top_heads": mass_interval.estimate, "gold_mass_ci_low": mass_interval.low, "gold_mass_ci_high": mass_interval.high,
                    "accuracy": accuracy.estimate, "accuracy_ci_low": accuracy.low, "accuracy_ci_high": accuracy.high,
                })
        return pd.DataFrame(rows)

    def _focus_claims(self, results: dict[float, tuple[np.ndarray, np.ndarray]], k: int, epochs: int, kept: int) -> list[Claim]:
        base_mass, base_correct = results[0.0]
        answered = base_correct[~np.isnan(base_correct)]
        what = f"top {k} contextual heads (chosen on the training questions), held-out questions"
        claims = [
            Claim.mean("contextual.heldout_gold_mass", base_mass, "held-out probes", f"gold-document mass, mean over the {what}, no focus", seed=self.seed),
            Claim.count("contextual.focus_epochs_kept", kept, "epochs", f"epoch whose directions were kept (lowest validation loss) of {epochs} run"),
        ]
        if len(answered):
            claims.append(Claim.proportion("contextual.heldout_accuracy", int(answered.sum()), len(answered), "held-out probes", "answers containing the expected answer, no focus"))
        sweep = []
        for scale, (mass, correct) in sorted(results.items()):
            if scale == 0.0:
                continue
            suffix = "" if scale == 1.0 else f"_scale_{scale:g}"
            at = "at the scale trained (1)" if scale == 1.0 else f"at {scale:g} times the trained directions"
            pair = [
                Claim.paired(f"contextual.focus_effect_gold_mass{suffix}", mass, base_mass, "held-out probes",
                             f"with minus without focus directions {at}: gold-document mass of the {what}, on the unfocused answer's tokens", seed=self.seed),
                Claim.paired(f"contextual.focus_effect_accuracy{suffix}", correct, base_correct, "held-out probes",
                             f"with minus without focus directions {at}: answer contains the expected answer (1/0)", seed=self.seed),
            ]
            (claims if scale == 1.0 else sweep).extend(c for c in pair if c.n)
        if sweep:
            # The sweep is exploratory: its p-values are Holm-corrected over the sweep's claims.
            adjusted = adjust_p_values([c.p_value for c in sweep], "holm")
            sweep = [dataclasses.replace(c, p_value=float(p), method=c.method + "; Holm-adjusted over the scale sweep") for c, p in zip(sweep, adjusted)]
        return claims + sweep

    def _save(self, focus: FocusDirections) -> str:
        if self.store is None:
            return ""
        relative = f"artifacts/focus_directions/{self.run_id}.safetensors"
        metadata = {"model": self.model.name, "fingerprint": self.model.info.fingerprint, "run_id": self.run_id, "scale": "1.0"}
        self.store.write_artifact(relative, focus.to_bytes(metadata))
        return relative
