"""Task circuits and their reuse across tasks (Merullo et al., "Circuit Component Reuse Across Tasks in
Transformer Language Models", ICLR 2024; code jmerullo/circuit_reuse).

A task is a set of clean/corrupted prompt pairs of equal token length with a target (the clean answer)
and a foil (the distractor); LD = logit(target) - logit(foil) at the final position. Per task:

- exact head importance (activation patching): each head's output z at the final position is taken
  from the corrupted run, score = (LD_patched - LD_clean) / (LD_corrupt - LD_clean) (means over pairs).
  Patching the final position leaves every earlier position as in the clean run, so the clean prefix's
  KV cache is computed once and one batched single-token forward patches a different head in each
  batch element;
- path patching (Wang et al. 2023, as jmerullo/circuit_reuse implements it), stage by stage as the task
  declares (probes/data/circuits.json): the sender's z at the stage's position comes from the corrupted
  run while every other head's z there is frozen to the clean run; the receivers' inputs (the logits, or
  the q / k / v of the previous stage's heads) are recorded and patched alone into a clean run. Senders
  are batched, and only the tokens from the stage's position on are run (the rest is a KV cache);
- attribution patching (gradient at the clean run x (z_corrupt - z_clean)) and EAP-IG (the gradient
  averaged over input embeddings interpolated at k/m, k = 0..m-1, from corrupt to clean; Hanna et al.
  2024, hannamw/EAP-IG), with their Spearman rank agreement with exact patching;
- the faithfulness curve: normalised faithfulness (LD_circuit - LD_ablated) / (LD_clean - LD_ablated)
  with the top-k heads by |exact score| kept and every other head mean-ablated at the final position,
  for every k; the circuit is cut at the fewest heads reaching ``faithfulness_target`` (or the paper's
  top ``top_percent`` %).

Across the tasks the model can do (clean accuracy's Wilson interval above chance): Jaccard, both
containments (containment_a is the paper's reuse measure), a bootstrap interval over prompt pairs, and a
p-value against a layer-stratified permutation null, Holm-corrected over task pairs.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from itertools import combinations
from typing import Annotated, Literal

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from pydantic import Field
from torch import Tensor

from lens._capture.interventions import Intervention, ReplaceZ
from lens._capture.needs import Logits
from lens._capture.session import capture, session
from lens._models.model import Prefix
from lens._store.schema import HEAD, LAYER, Column, ReportSchema
from lens._store.store import Report
from metrics.circuits import (
    attribution_score,
    bootstrap_circuits,
    faithful_cut,
    logit_difference,
    normalized_faithfulness,
    overlap_measures,
    patching_score,
    percentile_interval,
    resample_means,
    spearman,
    stratified_overlap_null,
    top_fraction,
    top_k,
)
from metrics.uncertainty import adjust_p_values, proportion_interval
from probes._base import Claim, Detector, ForwardPass, PaperClaim, Params, ProbeError, register, summary_report
from probes._overview import OKABE_ITO, OverviewLabel, OverviewScore, Rows

METHODS = ("patching", "path_patching", "attribution", "eap_ig")
CHANCE = 0.5  # two answers: LD > 0 by chance half the time

CIRCUIT_HEADS = ReportSchema(
    "circuit_heads",
    "Per task, method (and path-patching stage) and head: importance for the task's logit difference (Merullo et al. 2024).",
    (
        Column("task", "string", "task name"),
        LAYER,
        HEAD,
        Column("importance", "float64", "normalized patching score (LD_patched - LD_clean) / (LD_corrupt - LD_clean), exact or estimated"),
        Column("ci_low", "float64", "2.5th percentile of the importance over bootstrap resamples of the prompt pairs", nullable=True),
        Column("ci_high", "float64", "97.5th percentile of the same", nullable=True),
        Column("method", "string", "patching (activation, final position), path_patching (one row set per stage), attribution or eap_ig"),
        Column("stage", "string", "path-patching stage (receivers named in probes/data/circuits.json); empty for other methods"),
        Column("in_circuit", "bool", "selected: the faithfulness cut (or top percent) by |importance|; per stage top percent for path patching"),
    ),
)

CIRCUIT_FAITHFULNESS = ReportSchema(
    "circuit_faithfulness",
    "Per task and circuit size: normalised faithfulness with the top-k heads by |exact patching score| kept.",
    (
        Column("task", "string", "task name"),
        Column("n_heads", "int64", "heads kept (the top n_heads by |exact patching score|); every other head is mean-ablated at the final position"),
        Column("faithfulness", "float64", "(mean LD_circuit - mean LD_ablated) / (mean LD_clean - mean LD_ablated), LD_ablated with every head mean-ablated"),
        Column("ci_low", "float64", "2.5th percentile over bootstrap resamples of the prompt pairs", nullable=True),
        Column("ci_high", "float64", "97.5th percentile of the same", nullable=True),
        Column("is_cut", "bool", "the size the exact-patching circuit was cut at"),
    ),
)

CIRCUIT_OVERLAP = ReportSchema(
    "circuit_overlap",
    "Per pair of tasks the model can do and per method: overlap of the in-circuit head sets, with intervals and a layer-stratified null.",
    (
        Column("task_a", "string", "first task"),
        Column("task_b", "string", "second task"),
        Column("method", "string", "importance method the circuits come from"),
        Column("n_a", "int64", "in-circuit heads of task_a"),
        Column("n_b", "int64", "in-circuit heads of task_b"),
        Column("n_shared", "int64", "heads in both circuits"),
        Column("jaccard", "float64", "n_shared / |union|"),
        Column("jaccard_low", "float64", "2.5th percentile of the Jaccard over bootstrap resamples of both tasks' prompt pairs (circuit sizes fixed)", nullable=True),
        Column("jaccard_high", "float64", "97.5th percentile of the same", nullable=True),
        Column("containment_a", "float64", "n_shared / n_a: share of task_a's circuit found in task_b's (the paper's reuse measure)"),
        Column("containment_a_low", "float64", "2.5th percentile of containment_a over the same resamples", nullable=True),
        Column("containment_a_high", "float64", "97.5th percentile of the same", nullable=True),
        Column("containment_b", "float64", "n_shared / n_b"),
        Column("null_shared", "float64", "mean n_shared under the layer-stratified null (heads shuffled within each layer)"),
        Column("p_value", "float64", "P(n_shared >= observed) under the layer-stratified permutation null, (1 + hits) / (1 + draws)"),
        Column("p_adjusted", "float64", "p_value Holm-corrected over the task pairs of this method"),
        Column("spearman", "float64", "Spearman rank correlation of the two tasks' importances over all heads", nullable=True),
    ),
)

CIRCUIT_TASKS = ReportSchema(
    "circuit_tasks",
    "Per task: can the model do it, how big and how faithful is its circuit, do the fast methods agree with patching.",
    (
        Column("task", "string", "task name"),
        Column("n_pairs", "int64", "clean/corrupted pairs"),
        Column("clean_accuracy", "float64", "share of clean prompts with LD > 0 (target above foil)"),
        Column("clean_accuracy_low", "float64", "Wilson 95% interval, lower end"),
        Column("clean_accuracy_high", "float64", "Wilson 95% interval, upper end"),
        Column("can_do", "bool", "clean_accuracy_low > chance (0.5): only such tasks enter the overlap"),
        Column("top1_accuracy", "float64", "share of clean prompts whose top next token is the target"),
        Column("mean_logit_diff", "float64", "mean LD on clean prompts"),
        Column("mean_logit_diff_corrupt", "float64", "mean LD (same target and foil) on corrupted prompts"),
        Column("mean_logit_diff_ablated", "float64", "mean LD on clean prompts with every head mean-ablated at the final position"),
        Column("selection", "string", "faithfulness (cut at the target) or top_percent"),
        Column("n_in_circuit", "int64", "in-circuit heads (exact patching)"),
        Column("faithfulness", "float64", "normalised faithfulness of that circuit"),
        Column("faithful_size", "float64", "fewest top-|score| heads reaching faithfulness_target (NaN: none)", nullable=True),
        Column("n_path_circuit", "int64", "heads selected by path patching, united over the task's stages"),
        Column("path_faithfulness", "float64", "normalised faithfulness of the path-patching circuit (others mean-ablated at the final position)", nullable=True),
        Column("spearman_attribution", "float64", "rank agreement of attribution patching with exact patching over all heads", nullable=True),
        Column("spearman_eap_ig", "float64", "rank agreement of EAP-IG with exact patching over all heads", nullable=True),
        Column("top10_attribution", "float64", "share of exact patching's top 10 heads (by |score|) in attribution's top 10"),
        Column("top10_eap_ig", "float64", "share of exact patching's top 10 heads in EAP-IG's top 10"),
        Column("repair_accuracy", "float64", "clean_accuracy after the repair (NaN when repair is off)", nullable=True),
    ),
)

BUILTIN_TASKS = ("ioi", "colored_objects", "colored_object", "capitals", "induction")
RECEIVER_KINDS = {"q": ("q",), "k": ("k",), "v": ("v",), "kv": ("k", "v")}


@dataclass
class CircuitParams(Params):
    pairs_per_task: Annotated[int, Field(ge=1)] = 6  # x 5 tasks: the quick census; 64+ for the research run
    selection: Literal["faithfulness", "top_percent"] = "faithfulness"  # top_percent: the paper's rule
    faithfulness_target: Annotated[float, Field(gt=0, le=1)] = 0.8
    top_percent: Annotated[float, Field(gt=0, le=100)] = 2.0  # the paper's rule, and the per-stage cut of path patching
    ig_steps: Annotated[int, Field(ge=1)] = 5  # m: EAP-IG interpolation points k/m, k = 0..m-1
    path_stages: Annotated[int, Field(ge=0)] = 2  # path-patching stages run per task, from the logits back (0: off; IOI declares 3)
    null_draws: Annotated[int, Field(ge=1)] = 10_000  # layer-stratified permutation null
    bootstrap: Annotated[int, Field(ge=1)] = 1000  # resamples of the prompt pairs for intervals
    batch_size: Annotated[int, Field(ge=1)] = 270  # single-token forwards per batch
    tasks: Annotated[str, Field(min_length=1)] = ",".join(BUILTIN_TASKS)  # built-in tasks to generate
    repair_heads: Annotated[int, Field(ge=0)] = 0  # repair: scale this many top positive-importance heads (0: off)
    repair_scale: Annotated[float, Field(ge=0)] = 2.0


# -- tasks ------------------------------------------------------------------------------------------


@cache
def task_specs() -> dict:
    """The built-in tasks of probes/data/circuits.json. A task with ``"like": other`` is generated as
    ``other`` is, from ``other``'s fields with its own laid over them (the one-object colour task
    shares the Colored Objects lists and stages). Read once per process, so a census's pairs and its
    later path stages come from the same file even if it is edited while the census runs."""
    specs = json.loads(resources.files("probes").joinpath("data", "circuits.json").read_text(encoding="utf-8"))
    return {task: specs[spec["like"]] | spec if "like" in spec else spec | {"like": task} for task, spec in specs.items()}


def _single_token_words(tokenizer, words: list[str]) -> list[str]:
    """The words that are one token with a leading space (how they appear mid-sentence)."""
    return [w for w in words if len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1]


def _colored_scene(spec: dict, colors: list[str], objects: list[str], rng: random.Random, asked: int) -> str:
    items = [f"a{'n' if c[0] in 'aeiou' else ''} {c} {o}" for c, o in zip(colors, objects)]
    text = ", ".join(items[:-1]) + ", and " + items[-1] if len(items) > 1 else items[0]
    return spec["template"].format(surface=rng.choice(spec["surfaces"]), start=rng.choice(spec["starts"]), items=text, q=objects[asked])


def generate_pairs(tokenizer, task: str, n: int, rng: random.Random) -> list[dict]:
    """``n`` probe lines {task, clean, corrupt, target, foil} of a built-in task, each corruption a
    minimal difference from its clean prompt."""
    spec = task_specs()
    if task not in spec:
        raise ProbeError(f"circuits: unknown built-in task {task!r}; built-in: {sorted(spec)}")
    spec = spec[task]
    kind = spec["like"]
    pairs = []
    for index in range(n):
        if kind == "ioi":
            # Mixed ABBA / BABA; the corruption replaces S2 by the indirect object (Merullo et al.).
            io, s = rng.sample(_single_token_words(tokenizer, spec["names"]), 2)
            template = rng.choice(spec["templates"])
            first, second = (io, s) if index % 2 == 0 else (s, io)
            fill = dict(PLACE=rng.choice(spec["places"]), OBJECT=rng.choice(spec["objects"]))
            clean = template.format(B=first, A=second, S2=s, **fill)
            corrupt = template.format(B=first, A=second, S2=io, **fill)
            pairs.append(dict(task=task, clean=clean, corrupt=corrupt, target=" " + io, foil=" " + s))
        elif kind == "colored_objects":
            # One solved example, then the question. Three objects a scene: the corruption asks about
            # another object of the same scene, whose colour is the foil. One object a scene (the task
            # both embedded models can do): the corruption gives that object another colour.
            n_objects = spec["objects_per_scene"]
            colors = [c for c in spec["colors"] if len(tokenizer.encode(" " + c.capitalize(), add_special_tokens=False)) == 1]
            if n_objects == 1:  # "a red" -> "an orange" would change two tokens, not one
                colors = [c for c in colors if c[0] not in "aeiou"]
            objects = _single_token_words(tokenizer, spec["objects"])
            shot_colors, shot_objects = rng.sample(colors, n_objects), rng.sample(objects, n_objects)
            shot_asked = rng.randrange(n_objects)
            shot = _colored_scene(spec, shot_colors, shot_objects, rng, shot_asked) + " " + shot_colors[shot_asked].capitalize() + "\n"
            scene_colors, scene_objects = rng.sample(colors, max(3, n_objects)), rng.sample(objects, n_objects)
            if n_objects > 1:
                asked, other = rng.sample(range(n_objects), 2)
                corrupt_colors, corrupt_asked = scene_colors, other
            else:
                asked, other = 0, 1
                corrupt_colors, corrupt_asked = scene_colors[1:2], 0
            state = rng.getstate()
            clean = shot + _colored_scene(spec, scene_colors[:n_objects], scene_objects, rng, asked)
            rng.setstate(state)  # the same surface and opening for the corrupted scene
            corrupt = shot + _colored_scene(spec, corrupt_colors, scene_objects, rng, corrupt_asked)
            target, foil = " " + scene_colors[asked].capitalize(), " " + scene_colors[other].capitalize()
            pairs.append(dict(task=task, clean=clean, corrupt=corrupt, target=target, foil=foil))
        elif kind == "capitals":
            facts = [f for f in spec["facts"] if len(_single_token_words(tokenizer, f)) == 2]
            (country, capital), (other_country, other_capital) = rng.sample(facts, 2)
            pairs.append(
                dict(
                    task=task,
                    clean=spec["template"].format(country=country),
                    corrupt=spec["template"].format(country=other_country),
                    target=" " + capital,
                    foil=" " + other_capital,
                )
            )
        elif kind == "induction":
            # A random word sequence repeated up to a point: the next word is the one that followed the
            # last word in the first half. The corruption swaps that word in the first half only.
            words = _single_token_words(tokenizer, spec["words"])
            chosen = rng.sample(words, spec["n_words"] + 1)
            sequence, replacement = chosen[:-1], chosen[-1]
            cut = rng.randrange(2, spec["n_words"] - 1)
            corrupted = sequence[: cut + 1] + [replacement] + sequence[cut + 2 :]
            pairs.append(
                dict(
                    task=task,
                    clean=" " + " ".join(sequence + sequence[: cut + 1]),
                    corrupt=" " + " ".join(corrupted + sequence[: cut + 1]),
                    target=" " + sequence[cut + 1],
                    foil=" " + replacement,
                )
            )
        else:
            raise ProbeError(f"circuits: no generator for task {task!r} (like {kind!r})")
    return pairs


@dataclass(frozen=True)
class Stage:
    """One path-patching stage: senders -> receivers. ``receivers`` is "logits" or the name of an
    earlier stage (its selected heads, read through ``via``: q, k, v or kv); ``position`` is "final"
    or "first_difference" (the first token where clean and corrupt differ)."""

    name: str
    receivers: str
    via: str = ""
    position: str = "final"


def task_stages(task: str) -> list[Stage]:
    """The stages a built-in task declares; a task from a probe file gets the logits stage only."""
    declared = task_specs().get(task, {}).get("stages", [{"name": "movers", "receivers": "logits"}])
    stages = [Stage(**s) for s in declared]
    for index, stage in enumerate(stages):
        earlier = [s.name for s in stages[:index]]
        if stage.receivers != "logits" and (stage.receivers not in earlier or stage.via not in RECEIVER_KINDS):
            raise ProbeError(f"circuits: stage {stage.name!r} of {task!r} needs receivers 'logits' or an earlier stage and via in {sorted(RECEIVER_KINDS)}")
        if stage.receivers == "logits" and stage.position != "final":
            raise ProbeError(f"circuits: stage {stage.name!r} of {task!r}: the logits are read at the final position only")
    return stages


# -- capture helpers ----------------------------------------------------------------------------------


@dataclass
class ZTap(Intervention):
    """Records the per-head output z at row ``row`` of the forward's positions in ``layer``
    (``z``: [batch, head, d_head]).

    With ``grad``, adds a zero leaf tensor ``delta`` there, so d(metric)/dz is read from ``delta``'s
    gradient with every downstream path intact.
    """

    layer: int
    row: int = -1
    grad: bool = False
    z: Tensor | None = field(default=None, repr=False)
    delta: Tensor | None = field(default=None, repr=False)

    def edit_z(self, z, positions):
        self.z = z[:, self.row].detach()
        if not self.grad:
            return z
        self.delta = torch.zeros_like(self.z, requires_grad=True)
        row = self.row % z.shape[1]
        return torch.cat([z[:, :row], (z[:, row] + self.delta)[:, None], z[:, row + 1 :]], dim=1)


# Bytes of KV cache that single-token patching forwards may hold at once (the prefix cache repeated
# over the batch): long prompts get smaller batches instead of a cache of batch_size x prompt.
BATCHED_CACHE_BYTES = 2**29
# Prompt tokens one gradient pass may hold (EAP-IG's interpolation points batched up to it).
GRADIENT_TOKENS = 512


@contextmanager
def _projection_rows(model, slots: list[tuple[int, str, slice]], record: dict | None = None, replace: dict | None = None) -> Iterator[None]:
    """Record (into ``record``) or overwrite (from ``replace``) the first row of the q/k/v projections'
    outputs, ``slots`` = (layer, projection kind "q"/"k"/"v", feature slice of one head). Pre-rotation q and k are
    patched: both runs are at the same position, so the rotation they get afterwards is the same."""
    by_module: dict[tuple[int, str], list[slice]] = {}
    for layer, name, columns in slots:
        by_module.setdefault((layer, name), []).append(columns)

    def hook(key):
        def edit(_module, _inputs, output):
            output = output.clone() if replace is not None else output
            for columns in by_module[key]:
                slot = (*key, columns.start)
                if record is not None:
                    record[slot] = output[:, 0, columns].detach().clone()
                if replace is not None:
                    output[:, 0, columns] = replace[slot].to(output)
            return output

        return edit

    handles = [model.projection(layer, kind).register_forward_hook(hook((layer, kind))) for layer, kind in by_module]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Stopped(Exception):
    """Raised by ``_stop_after``'s hook to end a forward pass early."""


@contextmanager
def _stop_after(model, layer: int | None) -> Iterator[None]:
    """Inside the block, a forward pass ends (``_Stopped``) once decoder layer ``layer`` has run (None:
    it runs to the end). Only for a pass that is the last in its ``continuing`` block: the block's
    cache (a copy of the prefix) is left part-extended and is dropped with the block."""
    if layer is None:
        yield
        return

    def stop(_module, _inputs, _output):
        raise _Stopped

    handle = model.layers()[layer].register_forward_hook(stop)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class Pair:
    task: str
    clean: Int[Tensor, " pos"]
    corrupt: Int[Tensor, " pos"]
    target: int
    foil: int
    ld_clean: float = 0.0
    ld_corrupt: float = 0.0
    top1: bool = False
    z_clean: Float[Tensor, "layer head d_head"] | None = None
    z_corrupt: Float[Tensor, "layer head d_head"] | None = None
    prefix: Prefix | None = None  # the clean prompt run without its last token
    suffix_prefixes: dict = field(default_factory=dict)  # path patching: clean prefixes run, by length

    @property
    def ids(self) -> tuple[Tensor, Tensor]:
        return torch.tensor([self.target]), torch.tensor([self.foil])

    @property
    def first_difference(self) -> int:
        return int((self.clean != self.corrupt).nonzero()[0])


@dataclass
class TaskResult:
    task: str
    pairs: list[Pair]
    importance: dict[str, Float[Tensor, "layer head"]]
    # Per method: one (per-pair effect on LD [pair, layer*head], heads kept) per stage, for the bootstrap.
    effects: dict[str, list[tuple[Tensor, int]]]
    in_circuit: dict[str, Bool[Tensor, "layer head"]]
    stages: list[tuple[str, Tensor, Tensor, Tensor, Tensor]]  # path patching: name, score, ci_low, ci_high, selected
    head_intervals: dict[str, tuple[Tensor, Tensor]]
    curve: Tensor
    curve_low: Tensor
    curve_high: Tensor
    ld_ablated: Tensor
    size: int
    faithful_size: int | None
    path_faithfulness: float
    resamples: Tensor
    repair_accuracy: float

    @property
    def ld_clean(self) -> Tensor:
        return torch.tensor([p.ld_clean for p in self.pairs])

    @property
    def can_do(self) -> bool:
        accuracy = proportion_interval(int((self.ld_clean > 0).sum()), len(self.pairs))
        return accuracy.low > CHANCE


def _frame(schema: ReportSchema, rows: list[dict]) -> pd.DataFrame:
    """Rows as a frame of the schema's columns, typed even when there are none (one task: no pairs)."""
    empty = schema.empty_rows()
    return pd.DataFrame(rows, columns=empty.columns) if rows else empty


def _top_overlap(a: Tensor, b: Tensor, k: int = 10) -> float:
    """Share of a's top-k components by |value| that are in b's top-k."""
    k = min(k, a.numel())
    return float((top_k(a.flatten(), k) & top_k(b.flatten(), k)).sum()) / k


# The rows of circuit_heads the overview reads: exact activation patching.
PATCHING_ROWS = Rows("method", "patching")


@register
class Circuits(Detector):
    name = "circuits"
    description = "task circuits by activation and path patching (and attribution, EAP-IG), their faithfulness and their overlap across tasks"
    reports = (CIRCUIT_HEADS, CIRCUIT_FAITHFULNESS, CIRCUIT_OVERLAP, CIRCUIT_TASKS)
    probe_fields = ("task", "clean", "corrupt", "target", "foil")
    prompt_field = "clean"
    paper_claims = {
        "circuits.ioi~colored_objects.path_patching.reuse": PaperClaim(
            "Merullo et al. 2024 (ICLR): about 78% of IOI's in-circuit heads reappear in Colored Objects' circuit (GPT-2 medium, "
            "top 2% per path-patching stage)",
            value=0.78, direction="above",
            note="the paper does not state the overlap's denominator; compared with the share of IOI's heads in Colored Objects' circuit",
        ),
        # Asked on the nearest task the embedded models can do, so the reuse question is still asked.
        "circuits.ioi~colored_object.path_patching.reuse": PaperClaim(
            "Merullo et al. 2024 (ICLR): about 78% of IOI's in-circuit heads reappear in Colored Objects' circuit (GPT-2 medium, "
            "top 2% per path-patching stage); here on one object a scene, the nearest task these models can do",
            value=0.78, direction="above",
            note="the paper does not state the overlap's denominator; compared with the share of IOI's heads in the one-object task's circuit",
        ),
    }
    context_fields = ("clean", "corrupt")
    ParamsType = CircuitParams
    color = OKABE_ITO["reddish_purple"]
    # Exact activation patching: attribution and EAP-IG only approximate it.
    overview_labels = (OverviewLabel("in-circuit", "circuit_heads", "in_circuit", "star", (0.0, 0.0), rows=PATCHING_ROWS),)
    overview_scores = (OverviewScore("circuit_importance", "circuit_heads", "importance", largest_over="task", rows=PATCHING_ROWS),)
    presets = {"full": {"pairs_per_task": "64", "path_stages": "3"}}  # the research run: every declared stage
    accumulates = ("_pairs",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.params.selection not in ("top_percent", "faithfulness"):
            raise ProbeError(f"circuits.selection must be top_percent or faithfulness, not {self.params.selection!r}")
        if self.params.ig_steps < 1:
            raise ProbeError(f"circuits.ig_steps must be at least 1, not {self.params.ig_steps}")
        self._pairs: dict[str, list[Pair]] = {}

    # -- probes -------------------------------------------------------------------------------------
    def builtin_probes(self) -> list[dict]:
        tasks = [t for t in self.params.tasks.split(",") if t]
        per_task = [generate_pairs(self.model.tokenizer, task, self.params.pairs_per_task, self.rng) for task in tasks]
        # Round-robin over tasks, so that ``--limit N`` keeps several tasks (an overlap needs two).
        return [pair for group in zip(*per_task) for pair in group]

    def check_probe(self, probe, where):
        probe = super().check_probe(probe, where)
        clean, corrupt = self.tokens(probe["clean"]), self.tokens(probe["corrupt"])
        if len(clean) != len(corrupt):
            raise ProbeError(f"{where}: clean has {len(clean)} tokens but corrupt has {len(corrupt)}; patching needs equal lengths")
        if bool((clean == corrupt).all()):
            raise ProbeError(f"{where}: clean and corrupt are the same tokens; nothing to patch")
        if len(clean) < 2:
            raise ProbeError(f"{where}: clean prompt has {len(clean)} token(s); at least 2 are needed")
        if self._answer_id(probe["target"]) == self._answer_id(probe["foil"]):
            raise ProbeError(f"{where}: target {probe['target']!r} and foil {probe['foil']!r} start with the same token")
        return probe

    def _answer_id(self, text: str) -> int:
        return int(self.model.tokenize(text)[0])

    # -- running ------------------------------------------------------------------------------------
    def passes(self, probe, index):
        pair = Pair(probe["task"], self.tokens(probe["clean"]), self.tokens(probe["corrupt"]), self._answer_id(probe["target"]), self._answer_id(probe["foil"]))
        self._pairs.setdefault(pair.task, []).append(pair)
        target, foil = pair.ids
        for corrupted in (False, True):
            taps = [ZTap(layer) for layer in range(self.model.info.n_layers)]
            logits: list[Tensor] = []

            def done(taps=taps, logits=logits, corrupted=corrupted) -> None:
                z = torch.stack([tap.z[0] for tap in taps]).float().cpu()
                final = logits[0][0, -1].float().cpu()
                ld = float(logit_difference(final[None], target, foil)[0])
                if corrupted:
                    pair.z_corrupt, pair.ld_corrupt = z, ld
                else:
                    pair.z_clean, pair.ld_clean, pair.top1 = z, ld, int(final.argmax()) == pair.target

            tokens = pair.corrupt if corrupted else pair.clean
            yield ForwardPass(tokens, [Logits(logits.append)], taps, done)

    def _final_token_lds(
        self, pair: Pair, replace: Bool[Tensor, "batch layer head"], values: Float[Tensor, "layer head d_head"]
    ) -> Float[Tensor, " batch"]:
        """LD of the clean prompt with, in batch element b, the final-position z of the heads in
        ``replace[b]`` set to ``values``. Uses the clean prefix's KV cache (earlier positions do not
        depend on the final position's heads) and only the target and foil rows of the LM head."""
        model = self.model
        if pair.prefix is None:
            pair.prefix = model.run_prefix(pair.clean[:-1])
        batch_size = max(1, min(self.params.batch_size, BATCHED_CACHE_BYTES // max(1, pair.prefix.nbytes)))
        lds = []
        with model.continuing(pair.prefix) as run:
            for start in range(0, replace.shape[0], batch_size):
                chunk = replace[start : start + batch_size]
                edits = [
                    ReplaceZ(layer, [-1], values[layer][None, None].to(model.device), chunk[:, layer].to(model.device))
                    for layer in range(chunk.shape[1])
                    if bool(chunk[:, layer].any())
                ]
                with torch.no_grad(), session(model, (), edits):
                    lds.append(self._answer_ld(pair, run(pair.clean[-1:].expand(chunk.shape[0], 1))[:, -1]))
        return torch.cat(lds)

    def _answer_ld(self, pair: Pair, hidden: Float[Tensor, "batch d_model"]) -> Float[Tensor, " batch"]:
        """LD from final hidden states through the target and foil rows of the LM head only."""
        logits = self.model.unembed(hidden, torch.tensor([pair.target, pair.foil])).float()
        return (logits[:, 0] - logits[:, 1]).cpu()

    def _suffix_run(
        self, pair: Pair, start: int, suffix: Int[Tensor, " pos"], n: int, interventions=(), slots=(), record=None, replace=None,
        through_layer: int | None = None,
    ) -> Float[Tensor, " batch"] | None:
        """LD of ``n`` copies of clean[:start] + ``suffix``: the clean prefix is one KV cache (nothing
        before ``start`` depends on what is patched from there on), the suffix runs batched under
        ``interventions`` and the q/k/v ``slots`` recorded or replaced. With ``through_layer``, the
        run stops after that layer (for what it records) and gives no LD."""
        model = self.model
        if start > 0 and start not in pair.suffix_prefixes:
            pair.suffix_prefixes[start] = model.run_prefix(pair.clean[:start])
        try:
            with (torch.no_grad(), session(model, (), list(interventions)), _projection_rows(model, list(slots), record, replace),
                  _stop_after(model, through_layer), model.continuing(pair.suffix_prefixes.get(start)) as run):
                return self._answer_ld(pair, run(suffix[None].expand(n, -1))[:, -1])
        except _Stopped:
            return None

    def _z_at(self, pair: Pair, start: int, tokens: Int[Tensor, " pos"]) -> Float[Tensor, "layer head d_head"]:
        """Every head's z at position ``start`` of ``tokens`` (after the clean prefix, which they share)."""
        taps = [ZTap(layer, row=0) for layer in range(self.model.info.n_layers)]
        self._suffix_run(pair, start, tokens[start : start + 1], 1, taps)
        return torch.stack([tap.z[0] for tap in taps]).float().cpu()

    def _receiver_slots(self, receivers: Bool[Tensor, "layer head"], via: str) -> list[tuple[int, str, slice]]:
        """(layer, projection, columns) of the receivers' inputs; a k or v receiver is its KV head,
        shared by its group of query heads under grouped-query attention."""
        info = self.model.info
        group = info.n_heads // info.n_kv_heads
        slots = set()
        for layer, head in receivers.nonzero().tolist():
            for name in RECEIVER_KINDS[via]:
                unit = head if name == "q" else head // group
                slots.add((layer, name, unit * info.d_head))
        return [(layer, name, slice(start, start + info.d_head)) for layer, name, start in sorted(slots)]

    def _path_patch(self, pair: Pair, stage: Stage, receivers: Bool[Tensor, "layer head"] | None, freeze: bool = True) -> Float[Tensor, " head"]:
        """LD_patched of every sender (flattened layer x head; LD_clean for heads that cannot send).

        Pass 1: the clean run with the sender's z at the stage's position from the corrupted run and
        (``freeze``) every other head's z there frozen to the clean run; the receivers' inputs are
        recorded (for the logits, pass 1's own LD is the answer). Pass 2: the clean run with only the
        receivers' inputs patched to the recorded ones."""
        info = self.model.info
        n_heads = info.n_layers * info.n_heads
        length = len(pair.clean)
        start = length - 1 if stage.position == "final" else pair.first_difference
        if start == length - 1:
            z_clean, z_corrupt = pair.z_clean, pair.z_corrupt
        else:
            z_clean, z_corrupt = self._z_at(pair, start, pair.clean), self._z_at(pair, start, pair.corrupt)
        top_layer = info.n_layers if receivers is None else (int(receivers.nonzero()[:, 0].max()) if receivers.any() else 0)
        is_receiver = torch.zeros(n_heads, dtype=torch.bool) if receivers is None else receivers.flatten()
        senders = [i for i in range(n_heads) if i // info.n_heads < top_layer and not is_receiver[i]]
        slots = [] if receivers is None else self._receiver_slots(receivers, stage.via)
        patched = torch.full((n_heads,), pair.ld_clean)
        suffix = pair.clean[start:]
        # Pass 1 for receiving heads reads their inputs at the stage's position only: causal attention
        # computes that row from the cached prefix and the row itself, so it runs one token and stops
        # after the top receiver's layer. To the logits, it runs the whole suffix to the end.
        first_pass = suffix if receivers is None else suffix[:1]
        at = -len(first_pass)  # the stage's position, counted from the end: the first row
        batch = max(1, min(self.params.batch_size, BATCHED_CACHE_BYTES // max(1, self._cache_bytes_per_sequence(length))))
        for lo in range(0, len(senders), batch):
            chunk = torch.tensor(senders[lo : lo + batch])
            n = len(chunk)
            values = z_clean.expand(n, *z_clean.shape).clone()
            layers, heads = chunk // info.n_heads, chunk % info.n_heads
            values[torch.arange(n), layers, heads] = z_corrupt[layers, heads]
            where = torch.ones(1, info.n_heads, dtype=torch.bool)
            if freeze:
                edits = [ReplaceZ(layer, [at], values[:, layer, None].to(self.model.device), where) for layer in range(min(top_layer + 1, info.n_layers))]
            else:
                one = torch.zeros(n, info.n_layers, info.n_heads, dtype=torch.bool)
                one[torch.arange(n), layers, heads] = True
                edits = [ReplaceZ(layer, [at], values[:, layer, None].to(self.model.device), one[:, layer]) for layer in range(top_layer)]
            if receivers is None:
                patched[chunk] = self._suffix_run(pair, start, suffix, n, edits)
                continue
            recorded: dict = {}
            self._suffix_run(pair, start, first_pass, n, edits, slots, record=recorded, through_layer=top_layer)
            patched[chunk] = self._suffix_run(pair, start, suffix, n, (), slots, replace=recorded)
        return patched

    def _cache_bytes_per_sequence(self, length: int) -> int:
        info = self.model.info
        return 2 * info.n_layers * info.n_kv_heads * info.d_head * length * 4

    def _gradients(self, pair: Pair) -> tuple[Float[Tensor, "step layer head d_head"], Float[Tensor, "layer head d_head"]]:
        """d LD / d z at the final position for input embeddings interpolated from the corrupted prompt
        at k/m, k = 0..m-1 (EAP-IG, Hanna et al. 2024), and at the clean prompt (attribution patching)."""
        model, steps = self.model, self.params.ig_steps
        with torch.no_grad():
            clean, corrupt = model.embed(pair.clean[None]), model.embed(pair.corrupt[None])
        # Interpolation points are batch elements of one forward and backward pass (each element's
        # LD depends on its own input only, so the gradient of their sum splits exactly), as many at
        # once as GRADIENT_TOKENS allows: a backward pass holds activations of every prompt position.
        alphas = torch.tensor([k / steps for k in range(steps)] + [1.0], dtype=clean.dtype, device=clean.device)
        target, foil = pair.ids
        grads = []
        for chunk in alphas.split(max(1, GRADIENT_TOKENS // len(pair.clean))):
            taps = [ZTap(layer, grad=True) for layer in range(model.info.n_layers)]
            logits: list[Tensor] = []
            with model.embeddings_replaced(corrupt + chunk[:, None, None] * (clean - corrupt)):
                capture(model, pair.clean[None].expand(len(chunk), -1), [Logits(logits.append)], taps, grad=True)
            n = len(chunk)
            ld = logit_difference(logits[0][:, -1].float(), target.expand(n).to(model.device), foil.expand(n).to(model.device))
            grads.append(torch.stack(torch.autograd.grad(ld.sum(), [tap.delta for tap in taps]), dim=1).float().cpu())
        grads = torch.cat(grads)
        return grads[:-1], grads[-1]

    def _ratio_interval(self, effect: Tensor, denominator: Tensor, resamples: Tensor) -> tuple[Tensor, Tensor]:
        """Percentile interval of mean(effect) / mean(denominator) over resampled pairs."""
        ratio = resample_means(effect, resamples) / resample_means(denominator, resamples)[:, None]
        return percentile_interval(ratio)

    def _analyse(self, task: str, pairs: list[Pair]) -> TaskResult:
        info = self.model.info
        shape = (info.n_layers, info.n_heads)
        n_heads = info.n_layers * info.n_heads
        n_pairs = len(pairs)
        ld_clean = torch.tensor([p.ld_clean for p in pairs])
        ld_corrupt = torch.tensor([p.ld_corrupt for p in pairs])
        denominator = ld_corrupt - ld_clean
        resamples = torch.randint(0, n_pairs, (self.params.bootstrap, n_pairs), generator=self.generator)
        z_clean = torch.stack([p.z_clean for p in pairs])
        z_corrupt = torch.stack([p.z_corrupt for p in pairs])
        delta = z_corrupt - z_clean

        one_head = torch.eye(n_heads, dtype=torch.bool).view(n_heads, *shape)
        patched = torch.stack([self._final_token_lds(p, one_head, p.z_corrupt) for p in pairs])
        ig, clean_gradient = zip(*(self._gradients(p) for p in pairs))
        effect = {
            "patching": patched - ld_clean[:, None],
            "attribution": (torch.stack(clean_gradient) * delta).sum(-1).view(n_pairs, n_heads),
            "eap_ig": (torch.stack(ig).mean(1) * delta).sum(-1).view(n_pairs, n_heads),
        }
        importance = {
            "patching": patching_score(patched, ld_clean, ld_corrupt).view(shape),
            "attribution": attribution_score(torch.stack(clean_gradient), delta, ld_clean, ld_corrupt),
            "eap_ig": attribution_score(torch.stack(ig).mean(1), delta, ld_clean, ld_corrupt),
        }
        intervals = {method: tuple(bound.view(shape) for bound in self._ratio_interval(values, denominator, resamples)) for method, values in effect.items()}

        # The faithfulness curve: the top-k heads by |exact score| kept, every other head mean-ablated
        # at the final position, for every k (one batched single-token run per pair).
        exact = importance["patching"].flatten()
        rank = torch.empty(n_heads, dtype=torch.long)
        rank[torch.sort(exact.abs(), descending=True, stable=True).indices] = torch.arange(n_heads)
        kept = rank[None, :] < torch.arange(n_heads + 1)[:, None]
        mean_z = z_corrupt.mean(0)
        ld_circuit = torch.stack([self._final_token_lds(p, (~kept).view(n_heads + 1, *shape), mean_z) for p in pairs])
        ld_ablated = ld_circuit[:, 0]
        curve = normalized_faithfulness(ld_circuit, ld_clean, ld_ablated)
        boot_ablated = resample_means(ld_ablated, resamples)[:, None]
        curve_low, curve_high = percentile_interval(
            (resample_means(ld_circuit, resamples) - boot_ablated) / (resample_means(ld_clean, resamples)[:, None] - boot_ablated)
        )
        faithful_size = faithful_cut(curve, self.params.faithfulness_target)
        if self.params.selection == "faithfulness" and faithful_size is not None:
            size = faithful_size
        else:
            size = int(top_fraction(exact, self.params.top_percent / 100).sum())
        in_circuit = {method: top_k(scores.flatten(), size).view(shape) for method, scores in importance.items()}
        effects = {method: [(values, size)] for method, values in effect.items()}

        # Path patching, stage by stage: each stage's receivers are the heads an earlier stage selected.
        stages, selected = [], {}
        path_circuit = torch.zeros(shape, dtype=torch.bool)
        path_faithfulness = math.nan
        if self.params.path_stages > 0:
            stage_size = int(top_fraction(exact, self.params.top_percent / 100).sum())
            effects["path_patching"] = []
            for stage in task_stages(task)[: self.params.path_stages]:
                receivers = None if stage.receivers == "logits" else selected[stage.receivers]
                stage_effect = torch.stack([self._path_patch(p, stage, receivers) for p in pairs]) - ld_clean[:, None]
                score = stage_effect.mean(0) / denominator.mean()
                chosen = (top_k(score, stage_size) & (score != 0)).view(shape)  # a head with no effect is in no circuit
                selected[stage.name] = chosen
                low, high = self._ratio_interval(stage_effect, denominator, resamples)
                stages.append((stage.name, score.view(shape), low.view(shape), high.view(shape), chosen))
                effects["path_patching"].append((stage_effect, stage_size))
                path_circuit |= chosen
            importance["path_patching"] = stages[0][1]
            in_circuit["path_patching"] = path_circuit
            ld_path = torch.stack([self._final_token_lds(p, (~path_circuit)[None], mean_z) for p in pairs])
            path_faithfulness = float(normalized_faithfulness(ld_path[:, 0], ld_clean, ld_ablated))

        repair_accuracy = float("nan")
        if self.params.repair_heads:
            # Amplify the heads whose clean output most supports the target (largest positive importance).
            boosted = torch.zeros(n_heads, dtype=torch.bool)
            boosted[torch.topk(exact, self.params.repair_heads).indices] = True
            boosted = boosted.view(1, *shape)
            repaired = torch.cat([self._final_token_lds(p, boosted, p.z_clean * self.params.repair_scale) for p in pairs])
            repair_accuracy = float((repaired > 0).double().mean())
        for pair in pairs:
            pair.prefix = None
            pair.suffix_prefixes.clear()
        return TaskResult(
            task, pairs, importance, effects, in_circuit, stages, intervals, curve, curve_low, curve_high, ld_ablated,
            size, faithful_size, path_faithfulness, resamples, repair_accuracy,
        )

    def stages(self) -> list[str]:
        return [f"task:{task}" for task in self._pairs]  # each task's patching sweeps, a unit each

    independent_stages = True  # one task's sweeps never read another's

    def run_stage(self, name: str):
        task = name.removeprefix("task:")
        return self._analyse(task, self._pairs[task]) if task in self._pairs else super().run_stage(name)

    def finish(self) -> list[Report]:
        results = [self.stage(f"task:{task}") for task in self._pairs]
        heads = self._heads_frame(results)
        faithfulness = _frame(
            CIRCUIT_FAITHFULNESS,
            [
                dict(task=r.task, n_heads=k, faithfulness=float(r.curve[k]), ci_low=float(r.curve_low[k]), ci_high=float(r.curve_high[k]), is_cut=k == r.size)
                for r in results
                for k in range(len(r.curve))
            ],
        )
        overlap = self._overlap_frame([r for r in results if r.can_do])
        tasks = self._tasks_frame(results)
        return [
            Report("circuit_heads", heads),
            Report("circuit_faithfulness", faithfulness),
            Report("circuit_overlap", overlap),
            Report("circuit_tasks", tasks),
            self._summary(results, tasks, overlap),
        ]

    def _heads_frame(self, results: list[TaskResult]) -> pd.DataFrame:
        info = self.model.info
        layer, head = torch.meshgrid(torch.arange(info.n_layers), torch.arange(info.n_heads), indexing="ij")

        def rows(task, method, stage, importance, low, high, chosen):
            return pd.DataFrame(
                {
                    "task": task,
                    "layer": layer.flatten().numpy(),
                    "head": head.flatten().numpy(),
                    "importance": importance.flatten().double().numpy(),
                    "ci_low": low.flatten().double().numpy(),
                    "ci_high": high.flatten().double().numpy(),
                    "method": method,
                    "stage": stage,
                    "in_circuit": chosen.flatten().numpy(),
                }
            )

        frames = []
        for r in results:
            for method in ("patching", "attribution", "eap_ig"):
                frames.append(rows(r.task, method, "", r.importance[method], *r.head_intervals[method], r.in_circuit[method]))
            for name, score, low, high, chosen in r.stages:
                frames.append(rows(r.task, "path_patching", name, score, low, high, chosen))
        return pd.concat(frames, ignore_index=True)[[c.name for c in CIRCUIT_HEADS.columns]]

    def _overlap_frame(self, results: list[TaskResult]) -> pd.DataFrame:
        rows = []
        for method in METHODS:
            family = []
            for a, b in combinations(results, 2):
                if method not in a.in_circuit:
                    continue
                set_a, set_b = a.in_circuit[method], b.in_circuit[method]
                point = {k: float(v) for k, v in overlap_measures(set_a.flatten(), set_b.flatten()).items()}
                null = stratified_overlap_null(set_a, set_b, self.params.null_draws, self.generator)
                shared = int((set_a & set_b).sum())
                boot_a = bootstrap_circuits(*zip(*a.effects[method]), a.resamples)
                boot_b = bootstrap_circuits(*zip(*b.effects[method]), b.resamples)
                boot = overlap_measures(boot_a, boot_b)
                (j_low, c_low), (j_high, c_high) = zip(*(percentile_interval(boot[k]) for k in ("jaccard", "containment_a")))
                family.append(
                    dict(
                        task_a=a.task,
                        task_b=b.task,
                        method=method,
                        n_a=int(set_a.sum()),
                        n_b=int(set_b.sum()),
                        n_shared=shared,
                        jaccard=point["jaccard"],
                        jaccard_low=float(j_low),
                        jaccard_high=float(j_high),
                        containment_a=point["containment_a"],
                        containment_a_low=float(c_low),
                        containment_a_high=float(c_high),
                        containment_b=point["containment_b"],
                        null_shared=float(null.double().mean()),
                        p_value=float((1 + (null >= shared).sum()) / (1 + len(null))),
                        spearman=spearman(a.importance[method].flatten(), b.importance[method].flatten()),
                    )
                )
            for row, adjusted in zip(family, adjust_p_values([row["p_value"] for row in family], "holm")):
                row["p_adjusted"] = float(adjusted)
            rows += family
        return _frame(CIRCUIT_OVERLAP, rows)

    def _tasks_frame(self, results: list[TaskResult]) -> pd.DataFrame:
        rows = []
        for r in results:
            ld_clean = r.ld_clean
            exact = r.importance["patching"]
            accuracy = proportion_interval(int((ld_clean > 0).sum()), len(r.pairs))
            rows.append(
                dict(
                    task=r.task,
                    n_pairs=len(r.pairs),
                    clean_accuracy=accuracy.estimate,
                    clean_accuracy_low=accuracy.low,
                    clean_accuracy_high=accuracy.high,
                    can_do=r.can_do,
                    top1_accuracy=sum(p.top1 for p in r.pairs) / len(r.pairs),
                    mean_logit_diff=float(ld_clean.mean()),
                    mean_logit_diff_corrupt=float(torch.tensor([p.ld_corrupt for p in r.pairs]).mean()),
                    mean_logit_diff_ablated=float(r.ld_ablated.mean()),
                    selection=self.params.selection if r.faithful_size is not None else "top_percent",
                    n_in_circuit=r.size,
                    faithfulness=float(r.curve[r.size]),
                    faithful_size=math.nan if r.faithful_size is None else float(r.faithful_size),
                    n_path_circuit=int(r.in_circuit["path_patching"].sum()) if "path_patching" in r.in_circuit else 0,
                    path_faithfulness=r.path_faithfulness,
                    spearman_attribution=spearman(r.importance["attribution"].flatten(), exact.flatten()),
                    spearman_eap_ig=spearman(r.importance["eap_ig"].flatten(), exact.flatten()),
                    top10_attribution=_top_overlap(exact, r.importance["attribution"]),
                    top10_eap_ig=_top_overlap(exact, r.importance["eap_ig"]),
                    repair_accuracy=r.repair_accuracy,
                )
            )
        return _frame(CIRCUIT_TASKS, rows)

    def _summary(self, results: list[TaskResult], tasks: pd.DataFrame, overlap: pd.DataFrame) -> Report:
        claims = []
        target = self.params.faithfulness_target
        bootstrap = f"percentile bootstrap 95% interval, {self.params.bootstrap} resamples of the prompt pairs, seed {self.seed}"
        for r, t in zip(results, tasks.itertuples()):
            name = f"circuits.{r.task}"
            verdict = "" if t.can_do else f" (interval not above chance {CHANCE}: the model cannot do it; kept out of the overlap)"
            claims += [
                Claim.proportion(f"{name}.clean_accuracy", int((r.ld_clean > 0).sum()), t.n_pairs, "prompt pairs", "share of clean prompts with LD > 0" + verdict),
                Claim.mean(f"{name}.mean_logit_diff", r.ld_clean.numpy(), "prompt pairs", "mean clean logit difference target - foil", seed=self.seed),
                Claim.count(f"{name}.circuit_size", t.n_in_circuit, "heads", f"in-circuit heads by exact patching ({t.selection}; faithfulness target {target})"),
                Claim(
                    f"{name}.faithfulness", t.faithfulness, float(r.curve_low[r.size]), float(r.curve_high[r.size]), t.n_pairs, "prompt pairs",
                    method=bootstrap, detail=f"normalised faithfulness of the {t.n_in_circuit}-head circuit, others mean-ablated at the final position",
                ),
                Claim(f"{name}.spearman_eap_ig", t.spearman_eap_ig, n=len(r.curve) - 1, unit="heads", method="Spearman rank correlation; no interval",
                      detail=f"rank agreement of EAP-IG (m = {self.params.ig_steps}) with exact patching; top-10 overlap {t.top10_eap_ig:.2f}"),
            ]
            if not math.isnan(t.path_faithfulness):
                claims.append(Claim.count(f"{name}.path_circuit_size", t.n_path_circuit, "heads", f"heads selected by path patching (top {self.params.top_percent}% per stage), normalised faithfulness {t.path_faithfulness:.3g}"))
        n_pairs = {r.task: len(r.pairs) for r in results}
        method = f"{bootstrap}, circuit sizes fixed; p: layer-stratified permutation null, {self.params.null_draws} draws, Holm over task pairs"
        for o in overlap[overlap["method"].isin(["patching", "path_patching"])].itertuples():
            n = n_pairs[o.task_a] + n_pairs[o.task_b]
            detail = f"{o.n_shared} shared of {o.n_a} and {o.n_b} heads ({o.method}); {o.null_shared:.2g} shared expected under the null"
            claims += [
                Claim(f"circuits.{o.task_a}~{o.task_b}.{o.method}.reuse", o.containment_a, o.containment_a_low, o.containment_a_high, n, "prompt pairs", o.p_adjusted, method,
                      f"share of {o.task_a}'s circuit found in {o.task_b}'s (the paper's measure; 78% for IOI in Colored Objects on GPT-2 medium); " + detail),
                Claim(f"circuits.{o.task_a}~{o.task_b}.{o.method}.jaccard", o.jaccard, o.jaccard_low, o.jaccard_high, n, "prompt pairs", o.p_adjusted, method, detail),
            ]
        excluded = [t.task for t in tasks.itertuples() if not t.can_do]
        claims.append(Claim.count("circuits.tasks_excluded", len(excluded), "tasks", "tasks kept out of the overlap, clean accuracy not above chance: " + (", ".join(excluded) or "none")))
        return summary_report(claims)
