"""Contextual heads and focus directions (Zhu et al., "Focus Directions Make Your Language Models Pay
More Attention to Relevant Contexts", 2025; reference code billzyx/focus_direction).

Probe: multi-document question answering. One gold document answers the question; the others are
distractors about other (invented) entities; the gold document moves across a grid of positions. The
model answers, then one teacher-forced pass over prompt + answer reads, for the answer's tokens only,
the attention of every head on the gold document, on the distractors and on the first token.

contextual_score[l, h] = mean over probes of the mean over response tokens t of sum_{s in gold} A[t, s].

Focus directions: one vector per head, added to the head's query after the rotary embedding, trained
with the model frozen to raise the attention mass of the top-k contextual heads (chosen on the training
probes) on the gold document; applied at inference to those heads, scaled by ``scale``. A vector added
to every key is useless: it adds the constant q.v to a whole row of scores, which softmax cancels, so
only the query vector is trained (the reference trains both; its key vectors cannot change attention).
The held-out probes are answered with and without the directions (``focus_effect``).
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pandas as pd
import safetensors.torch
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from lens._capture.interventions import AddToQuery
from lens._capture.needs import AttentionBlock, AttentionRows
from lens._capture.session import capture, session
from lens._generate import chat_prompt, generate
from lens._store.schema import Column, ReportSchema
from lens._store.store import Report
from metrics.contextual import heads_mean, score_ranks, set_mass, span_keys, top_heads
from probes._base import Detector, ForwardPass, Params, ProbeError, register, summary_report

CONTEXTUAL = ReportSchema(
    "contextual",
    "Contextual heads: attention of the answer's tokens on the gold document (Zhu et al. 2025).",
    (
        Column("layer", "int64", "layer index, from 0"),
        Column("head", "int64", "query-head index within the layer, from 0"),
        Column("contextual_score", "float64", "attention mass on the gold document, mean over response tokens, then over probes"),
        Column("distractor_score", "float64", "attention mass on all distractor documents together, same means (probes that name them)", nullable=True),
        Column("first_token_score", "float64", "attention mass on the first token, same means"),
        Column("rank", "int64", "1 for the highest contextual_score"),
        Column("n_probes", "int64", "probes averaged over (answers of at least one token)"),
    ),
)

FOCUS_EFFECT = ReportSchema(
    "focus_effect",
    "Held-out probes answered with and without focus directions on the top-k contextual heads, by gold position.",
    (
        Column("gold_position", "int64", "index of the gold document among the documents, from 0 (-1: the probe gives none)"),
        Column("focus", "bool", "focus directions applied"),
        Column("n_probes", "int64", "held-out probes at this gold position"),
        Column("gold_mass_top_heads", "float64", "attention mass on the gold document of the top-k heads, mean over the unfocused answer's tokens, heads and probes"),
        Column("accuracy", "float64", "fraction of the model's answers that contain the expected answer (null: probes give none)", nullable=True),
        Column("top_k", "int64", "heads given directions: the top-k by contextual score on the training probes"),
        Column("scale", "float64", "factor the directions are multiplied by"),
        Column("path", "string", "the directions (safetensors), relative to the store; empty when not saved"),
    ),
)

SPLITS = ("train", "test")


@dataclass
class ContextualParams(Params):
    n_documents: int = 10  # documents per built-in prompt (the paper: 20); fewer when the context is short
    n_questions: int = 4  # built-in questions, each at every gold position; odd-numbered ones are held out
    max_new_tokens: int = 16
    top_k: int = 20
    scale: float = 0.25
    train_epochs: int = 1
    learning_rate: float = 0.05


def gold_grid(n_documents: int) -> list[int]:
    """First, last and three quarter points: 0, 4, 9, 14, 19 for the paper's 20 documents."""
    return sorted({0, *(math.ceil(n_documents * j / 4) - 1 for j in range(1, 5))})


def contains_answer(response: str, answer: str) -> bool:
    """Whether the answer appears in the response, ignoring case and spacing."""
    return " ".join(answer.lower().split()) in " ".join(response.lower().split())


@dataclass
class FocusDirections:
    """One query vector per head; ``interventions()`` applies them, each multiplied by ``scale``."""

    heads: list[tuple[int, int]]
    vectors: Float[Tensor, "head d_head"]
    scale: float

    def interventions(self) -> list[AddToQuery]:
        rows_by_layer: dict[int, list[int]] = defaultdict(list)
        for row, (layer, _) in enumerate(self.heads):
            rows_by_layer[layer].append(row)
        return [
            AddToQuery(layer, [self.heads[row][1] for row in rows], self.vectors[rows], self.scale) for layer, rows in rows_by_layer.items()
        ]

    def to_bytes(self, metadata: dict[str, str]) -> bytes:
        tensors = {"vectors": self.vectors.detach().float().cpu().contiguous(), "heads": torch.tensor(self.heads, dtype=torch.long)}
        return safetensors.torch.save(tensors, metadata={**metadata, "scale": repr(self.scale)})


def load_focus_directions(path: str | Path) -> FocusDirections:
    """Read directions saved by the census (``focus_effect.path``, relative to the store)."""
    tensors = safetensors.torch.load_file(str(path))
    with safetensors.torch.safe_open(str(path), "pt") as handle:
        scale = float(handle.metadata()["scale"])
    return FocusDirections([tuple(pair) for pair in tensors["heads"].tolist()], tensors["vectors"], scale)


@dataclass
class Answered:
    """A probe after its teacher-forced pass: what focus training and evaluation need again."""

    split: str
    gold_position: int
    tokens: Tensor
    n_prompt: int
    gold_keys: Bool[Tensor, " key"]
    # [3, layer, head]: mass on the gold document, the distractors, the first token; mean over response rows.
    mass: Float[Tensor, "3 layer head"]
    has_distractors: bool
    answer: str | None
    correct: bool | None

    @property
    def response_positions(self) -> list[int]:
        return list(range(self.n_prompt, len(self.tokens)))


@contextmanager
def frozen(model) -> Iterator[None]:
    """Model parameters without gradients for the block (only the directions train)."""
    parameters = list(model.hf.parameters())
    flags = [p.requires_grad for p in parameters]
    for p in parameters:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(parameters, flags):
            p.requires_grad_(flag)


def heads_gold_mass(model, example: Answered, heads: Sequence[tuple[int, int]], focus: FocusDirections | None, *, grad: bool = False) -> Float[Tensor, " head"]:
    """Attention mass on the gold document of each of ``heads``, mean over the response tokens,
    with ``focus`` applied (differentiable in its vectors when ``grad``)."""
    index = defaultdict(list)
    for row, (layer, head) in enumerate(heads):
        index[layer].append((row, head))
    parts: list[tuple[list[int], Tensor]] = []

    def consume(block: AttentionBlock) -> None:
        rows = [row for row, _ in index[block.layer]]
        selected = block.probs[0, [head for _, head in index[block.layer]]]
        parts.append((rows, set_mass(selected, example.gold_keys).sum(-1)))

    needs = [AttentionRows(consume, positions=example.response_positions, layers=sorted(index))]
    capture(model, example.tokens, needs, focus.interventions() if focus else (), grad=grad)
    total = torch.zeros(len(heads), device=model.device)
    for rows, mass in parts:
        total = total.index_add(0, torch.tensor(rows, device=model.device), mass.to(total.device))
    return total / len(example.response_positions)


def train_focus_directions(
    model, examples: Sequence[Answered], heads: list[tuple[int, int]], *, epochs: int, learning_rate: float, generator: torch.Generator
) -> tuple[FocusDirections, list[float]]:
    """Train one query vector per head (at scale 1, as the reference does) to raise the heads' mean
    gold-document mass; returns the directions and that mass averaged over each epoch's steps."""
    vectors = (torch.randn(len(heads), model.info.d_head, generator=generator) * 0.01).to(model.device).requires_grad_()
    optimizer = torch.optim.Adam([vectors], lr=learning_rate)
    directions = FocusDirections(heads, vectors, 1.0)
    history = []
    with frozen(model):
        for _ in range(epochs):
            masses = []
            for i in torch.randperm(len(examples), generator=generator).tolist():
                mass = heads_gold_mass(model, examples[i], heads, directions, grad=True).mean()
                optimizer.zero_grad()
                (-mass).backward()
                optimizer.step()
                masses.append(mass.item())
            history.append(sum(masses) / len(masses))
    return FocusDirections(heads, vectors.detach(), 1.0), history


@register
class Contextual(Detector):
    name = "contextual"
    description = "contextual heads (gold-document attention in multi-document QA) and focus directions"
    reports = (CONTEXTUAL, FOCUS_EFFECT)
    # Optional fields: "response" (teacher-forced instead of the model's answer), "answer" (for accuracy),
    # "distractors" (substrings of the prompt), "gold_position" (int), "split" ("train" or "test").
    probe_fields = ("prompt", "gold")
    prompt_field = "prompt"
    ParamsType = ContextualParams

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.answered: list[Answered] = []
        self._n_empty = 0

    # -- probes ---------------------------------------------------------------------------------
    def builtin_probes(self) -> list[dict]:
        spec = json.loads(resources.files("probes").joinpath("data", "contextual_facts.json").read_text(encoding="utf-8"))
        n_documents = self.params.n_documents
        while n_documents > 1:
            probes = self._qa_probes(spec, n_documents)
            longest = max(len(self.tokens(p["prompt"])) for p in probes)
            if longest + self.extra_tokens() <= self.model.info.n_ctx:
                return probes
            n_documents -= 1
        raise ProbeError(f"contextual: even two documents do not fit {self.model.name}'s context")

    def _qa_probes(self, spec: dict, n_documents: int) -> list[dict]:
        rng = random.Random(self.seed)
        syllables = spec["syllables"]
        entities = [(a + b).capitalize() for a in syllables for b in syllables if a != b]
        people = [f"{first} {last}" for first in spec["first_names"] for last in spec["last_names"]]
        probes = []
        for question in range(self.params.n_questions):
            facts = [
                (rng.choice(spec["facts"]), entity, person)
                for entity, person in zip(rng.sample(entities, n_documents), rng.sample(people, n_documents))
            ]
            documents = [fact["document"].format(entity=entity, person=person) for fact, entity, person in facts]
            gold_fact, gold_entity, gold_person = facts[0]
            for position in gold_grid(n_documents):
                ordered = documents[1 : position + 1] + documents[:1] + documents[position + 1 :]
                listing = "\n".join(f"Document [{i + 1}] {text}" for i, text in enumerate(ordered))
                user = (
                    f"{spec['instruction']}\n\n{listing}\n\n"
                    f"Question: {gold_fact['question'].format(entity=gold_entity)}\n{spec['answer_instruction']}"
                )
                probes.append(
                    {
                        "prompt": chat_prompt(self.model, user),
                        "gold": documents[0],
                        "distractors": documents[1:],
                        "answer": gold_person,
                        "gold_position": position,
                        "split": SPLITS[question % 2],
                    }
                )
        return probes

    def extra_tokens(self) -> int:
        return self.params.max_new_tokens

    def check_probe(self, probe, where: str) -> dict:
        probe = super().check_probe(probe, where)
        prompt = probe["prompt"]
        for name in ("response", "answer"):
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
                span_keys(len(tokens), [(0, 1)]),
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
                    split=probe.get("split", SPLITS[index % 2]),
                    gold_position=probe.get("gold_position", -1),
                    tokens=tokens,
                    n_prompt=len(prompt_tokens),
                    gold_keys=key_sets[0],
                    mass=mass / len(response_tokens),
                    has_distractors=bool(probe.get("distractors")),
                    answer=answer,
                    correct=contains_answer(generated.text, answer) if answer is not None else None,
                )
            )

        positions = list(range(len(prompt_tokens), len(tokens)))
        yield ForwardPass(tokens, [AttentionRows(accumulate, positions=positions)], done=done)

    def finish(self) -> list[Report]:
        answered = self.answered
        info = self.model.info
        if answered:
            mass = torch.stack([a.mass for a in answered])  # probe, set, layer, head
            with_distractors = mass[[a.has_distractors for a in answered]]
            scores = mass[:, 0].mean(0)
            distractor = with_distractors[:, 1].mean(0) if len(with_distractors) else torch.full_like(scores, float("nan"))
            first = mass[:, 2].mean(0)
        else:
            scores = distractor = first = torch.full((info.n_layers, info.n_heads), float("nan"), dtype=torch.float64)
        layer, head = torch.meshgrid(torch.arange(info.n_layers), torch.arange(info.n_heads), indexing="ij")
        contextual = pd.DataFrame(
            {
                "layer": layer.flatten().numpy(),
                "head": head.flatten().numpy(),
                "contextual_score": scores.flatten().numpy(),
                "distractor_score": distractor.flatten().numpy(),
                "first_token_score": first.flatten().numpy(),
                "rank": score_ranks(scores).flatten().numpy(),
                "n_probes": len(answered),
            }
        )
        summary = []
        if answered:
            best = top_heads(scores, 1)[0]
            summary.append(("top_contextual_score", float(scores[best]), f"layer {best[0]} head {best[1]}: gold-document mass of the answer's tokens"))
        if self._n_empty:
            summary.append(("probes_with_empty_answer", float(self._n_empty), "probes skipped: the model answered nothing"))
        focus_frame, focus_summary = self._focus_effect()
        return [Report("contextual", contextual), Report("focus_effect", focus_frame), summary_report(summary + focus_summary)]

    # -- focus directions ---------------------------------------------------------------------
    def _focus_effect(self) -> tuple[pd.DataFrame, list[tuple[str, float, str]]]:
        train = [a for a in self.answered if a.split == "train"]
        test = [a for a in self.answered if a.split == "test"]
        if not train or not test:
            return FOCUS_EFFECT.empty_frame().drop(columns=["run_id", "model", "detector"]), [
                ("focus_skipped", 1.0, f"focus directions need training and held-out probes; got {len(train)} and {len(test)}")
            ]
        p = self.params
        train_scores = torch.stack([a.mass[0] for a in train]).mean(0)
        heads = top_heads(train_scores, min(p.top_k, train_scores.numel()))
        trained, history = train_focus_directions(
            self.model, train, heads, epochs=p.train_epochs, learning_rate=p.learning_rate, generator=self.generator
        )
        focus = FocusDirections(heads, trained.vectors, p.scale)
        path = self._save(focus)

        rows = []
        for example in test:
            focused_mass = heads_gold_mass(self.model, example, heads, focus).mean().item()
            focused_correct = None
            if example.answer is not None:
                with session(self.model, interventions=focus.interventions()):
                    text = generate(self.model, example.tokens[: example.n_prompt], max_new_tokens=p.max_new_tokens).text
                focused_correct = contains_answer(text, example.answer)
            base_mass = heads_mean(example.mass[0], heads).item()
            rows.append((example.gold_position, False, base_mass, example.correct))
            rows.append((example.gold_position, True, focused_mass, focused_correct))
        per_probe = pd.DataFrame(rows, columns=["gold_position", "focus", "gold_mass_top_heads", "correct"])
        per_probe["correct"] = per_probe["correct"].astype("float64")  # None -> NaN: no answer to check
        frame = (
            per_probe.groupby(["gold_position", "focus"], as_index=False)
            .agg(n_probes=("correct", "size"), gold_mass_top_heads=("gold_mass_top_heads", "mean"), accuracy=("correct", "mean"))
            .assign(top_k=len(heads), scale=p.scale, path=path)
        )
        overall = per_probe.groupby("focus").mean(numeric_only=True)
        k = len(heads)
        summary = [
            ("heldout_gold_mass_top_heads_base", overall.loc[False, "gold_mass_top_heads"], f"held-out probes, top {k} contextual heads, no focus"),
            ("heldout_gold_mass_top_heads_focus", overall.loc[True, "gold_mass_top_heads"], f"same, focus directions at scale {p.scale:g}"),
            ("heldout_accuracy_base", overall.loc[False, "correct"], f"held-out answers containing the expected answer ({len(test)} probes)"),
            ("heldout_accuracy_focus", overall.loc[True, "correct"], f"same, focus directions at scale {p.scale:g}"),
        ]
        if history:
            summary += [
                ("focus_train_gold_mass_first_epoch", history[0], f"training probes, top {k} heads, directions at scale 1, mean over the first epoch"),
                ("focus_train_gold_mass_last_epoch", history[-1], f"same, last of {len(history)} epochs"),
            ]
        # No expected answers (probe files may give none): no accuracy to state.
        return frame, [row for row in summary if not math.isnan(row[1])]

    def _save(self, focus: FocusDirections) -> str:
        if self.store is None:
            return ""
        relative = f"artifacts/focus_directions/{self.run_id}.safetensors"
        metadata = {"model": self.model.name, "fingerprint": self.model.info.fingerprint, "run_id": self.run_id}
        self.store.write_artifact(relative, focus.to_bytes(metadata))
        return relative
