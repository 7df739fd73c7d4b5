"""Task circuits and their reuse across tasks (Merullo et al., "Circuit Component Reuse Across Tasks in
Transformer Language Models", ICLR 2024).

A task is a set of clean/corrupted prompt pairs of equal token length with a target (the clean answer)
and a foil (the distractor); LD = logit(target) - logit(foil) at the final position. Per task:

- exact head importance: each head's output z at the final position is taken from the corrupted run,
  score = (LD_patched - LD_clean) / (LD_corrupt - LD_clean) (means over pairs). Patching the final
  position leaves every earlier position as in the clean run, so the clean prefix's KV cache is
  computed once and one batched single-token forward patches a different head in each batch element;
- attribution patching (gradient at the clean run x (z_corrupt - z_clean)) and EAP-IG (the gradient
  averaged over input embeddings interpolated from corrupt to clean, Hanna et al. 2024), with their
  Spearman rank agreement with exact patching;
- in-circuit heads: the top ``top_percent`` % by |importance| (the paper's 2%), or the smallest set
  (on a grid of sizes) that keeps ``faithfulness_threshold`` of the LD when every other head is
  mean-ablated at the final position (mean over the task's corrupted prompts). The faithfulness of the
  set used is reported either way.

Across tasks: Jaccard, both containments, the hypergeometric tail of the overlap, and the Spearman
correlation of importances. Repair (optional): scale the task's top positive-importance heads and
measure its accuracy before and after.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from itertools import combinations

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lens._capture.interventions import Intervention, ReplaceZ
from lens._capture.needs import Logits
from lens._capture.session import capture, session
from lens._store.schema import Column, ReportSchema
from lens._store.store import Report
from metrics.circuits import (
    attribution_score,
    containment,
    faithfulness,
    hypergeometric_tail,
    jaccard,
    logit_difference,
    patching_score,
    smallest_faithful,
    spearman,
    top_fraction,
    top_k,
)
from probes._base import Detector, ForwardPass, Params, ProbeError, register, summary_report

METHODS = ("patching", "attribution", "eap_ig")

CIRCUIT_HEADS = ReportSchema(
    "circuit_heads",
    "Per task, method and head: importance for the task's logit difference (Merullo et al. 2024).",
    (
        Column("task", "string", "task name"),
        Column("layer", "int64", "layer index, from 0"),
        Column("head", "int64", "query-head index within the layer, from 0"),
        Column("importance", "float64", "normalized patching score (LD_patched - LD_clean) / (LD_corrupt - LD_clean), exact or estimated"),
        Column("method", "string", "patching (exact, final position), attribution (gradient x activation difference) or eap_ig"),
        Column("in_circuit", "bool", "selected by this method's importance (top percent by |importance|, or the faithfulness cut)"),
    ),
)

CIRCUIT_OVERLAP = ReportSchema(
    "circuit_overlap",
    "Per pair of tasks and method: overlap of the in-circuit head sets and agreement of importances.",
    (
        Column("task_a", "string", "first task"),
        Column("task_b", "string", "second task"),
        Column("method", "string", "importance method the circuits come from"),
        Column("n_a", "int64", "in-circuit heads of task_a"),
        Column("n_b", "int64", "in-circuit heads of task_b"),
        Column("n_shared", "int64", "heads in both circuits"),
        Column("jaccard", "float64", "n_shared / |union|"),
        Column("containment_a", "float64", "n_shared / n_a: share of task_a's circuit reused by task_b"),
        Column("containment_b", "float64", "n_shared / n_b"),
        Column("p_value", "float64", "hypergeometric P(overlap >= n_shared) for random sets of sizes n_a, n_b among all heads"),
        Column("spearman", "float64", "Spearman rank correlation of the two tasks' importances over all heads", nullable=True),
    ),
)

CIRCUIT_TASKS = ReportSchema(
    "circuit_tasks",
    "Per task: can the model do it, how faithful is its circuit, do the fast methods agree with patching.",
    (
        Column("task", "string", "task name"),
        Column("n_pairs", "int64", "clean/corrupted pairs"),
        Column("clean_accuracy", "float64", "share of clean prompts with LD > 0 (target above foil)"),
        Column("top1_accuracy", "float64", "share of clean prompts whose top next token is the target"),
        Column("mean_logit_diff", "float64", "mean LD on clean prompts"),
        Column("mean_logit_diff_corrupt", "float64", "mean LD (same target and foil) on corrupted prompts"),
        Column("selection", "string", "top_percent or faithfulness"),
        Column("n_in_circuit", "int64", "in-circuit heads (exact patching)"),
        Column("faithfulness", "float64", "mean LD with only the in-circuit heads intact (others mean-ablated at the final position) / mean clean LD"),
        Column("faithfulness_empty", "float64", "the same with every head mean-ablated at the final position"),
        Column("faithful_size", "float64", "smallest grid size of a top-|importance| set reaching the faithfulness threshold (NaN: none)", nullable=True),
        Column("spearman_attribution", "float64", "rank agreement of attribution patching with exact patching over all heads", nullable=True),
        Column("spearman_eap_ig", "float64", "rank agreement of EAP-IG with exact patching over all heads", nullable=True),
        Column("jaccard_attribution", "float64", "Jaccard of the attribution circuit with the exact-patching circuit"),
        Column("jaccard_eap_ig", "float64", "Jaccard of the EAP-IG circuit with the exact-patching circuit"),
        Column("repair_accuracy", "float64", "clean_accuracy after the repair (NaN when repair is off)", nullable=True),
    ),
)

BUILTIN_TASKS = ("ioi", "colored_objects", "capitals", "induction")
# Circuit sizes at which faithfulness is measured (besides the top-percent size).
SIZE_GRID = (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80, 100, 135, 180)


@dataclass
class CircuitParams(Params):
    pairs_per_task: int = 6  # x 4 tasks: the default census's budget (~150 s on an idle 2-core CPU)
    top_percent: float = 2.0
    selection: str = "top_percent"  # or "faithfulness"
    faithfulness_threshold: float = 0.8
    ig_steps: int = 3  # EAP-IG interpolation steps; the last one is the clean run (attribution patching)
    batch_size: int = 270  # single-token forwards per batch
    tasks: str = ",".join(BUILTIN_TASKS)  # built-in tasks to generate
    repair_heads: int = 0  # repair: scale this many top positive-importance heads (0: off)
    repair_scale: float = 2.0


# -- tasks ------------------------------------------------------------------------------------------


def _single_token_words(tokenizer, words: list[str]) -> list[str]:
    """The words that are one token with a leading space (how they appear mid-sentence)."""
    return [w for w in words if len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1]


def generate_pairs(tokenizer, task: str, n: int, rng: random.Random) -> list[dict]:
    """``n`` probe lines {task, clean, corrupt, target, foil} of a built-in task."""
    spec = json.loads(resources.files("probes").joinpath("data", "circuits.json").read_text(encoding="utf-8"))
    if task not in spec:
        raise ProbeError(f"circuits: unknown built-in task {task!r}; built-in: {sorted(spec)}")
    spec = spec[task]
    pairs = []
    for _ in range(n):
        if task == "ioi":
            # ABC corruption: three fresh names, so the corrupted prompt has no repeated subject.
            names = _single_token_words(tokenizer, spec["names"])
            a, b, c, d, e = rng.sample(names, 5)
            template = rng.choice(spec["templates"])
            first, second = (a, b) if rng.random() < 0.5 else (b, a)
            clean = template.format(A=first, B=second, S=b)
            corrupt = template.format(A=c, B=d, S=e)
            pairs.append(dict(task=task, clean=clean, corrupt=corrupt, target=" " + a, foil=" " + b))
        elif task.startswith("colored_objects"):
            # Minimal difference: ask about another object of the same scene; its colour is the foil.
            colors = rng.sample(_single_token_words(tokenizer, spec["colors"]), 3)
            objects = rng.sample(_single_token_words(tokenizer, spec["objects"]), 3)
            asked, other = rng.sample(range(3), 2)
            scene = {f"c{i}": colors[i] for i in range(3)} | {f"o{i}": objects[i] for i in range(3)}
            clean = spec["template"].format(**scene, q=objects[asked])
            corrupt = spec["template"].format(**scene, q=objects[other])
            pairs.append(dict(task=task, clean=clean, corrupt=corrupt, target=" " + colors[asked], foil=" " + colors[other]))
        elif task == "capitals":
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
        elif task == "induction":
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
            raise ProbeError(f"circuits: no generator for task {task!r}")
    return pairs


# -- capture helpers ----------------------------------------------------------------------------------


@dataclass
class FinalZTap(Intervention):
    """Records the per-head output z at the last position of ``layer`` (``z``: [batch, head, d_head]).

    With ``grad``, adds a zero leaf tensor ``delta`` there, so d(metric)/dz is read from ``delta``'s
    gradient with every downstream path intact.
    """

    layer: int
    grad: bool = False
    z: Tensor | None = field(default=None, repr=False)
    delta: Tensor | None = field(default=None, repr=False)

    def edit_z(self, z, positions):
        self.z = z[:, -1].detach()
        if not self.grad:
            return z
        self.delta = torch.zeros_like(self.z, requires_grad=True)
        return torch.cat([z[:, :-1], (z[:, -1] + self.delta)[:, None]], dim=1)


# Bytes of KV cache that single-token patching forwards may hold at once (the prefix cache repeated
# over the batch): long prompts get smaller batches instead of a cache of batch_size x prompt.
BATCHED_CACHE_BYTES = 2**29


@contextmanager
def _input_embeddings(model, embeddings: Float[Tensor, "batch pos d_model"]) -> Iterator[None]:
    """Make the embedding layer return ``embeddings`` (whatever tokens it is given)."""
    handle = model.hf.get_input_embeddings().register_forward_hook(lambda _module, _inputs, output: embeddings.to(output))
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
    prefix_cache: object = None  # the clean prompt's KV cache without its last token

    @property
    def ids(self) -> tuple[Tensor, Tensor]:
        return torch.tensor([self.target]), torch.tensor([self.foil])


@dataclass
class TaskResult:
    task: str
    pairs: list[Pair]
    importance: dict[str, Float[Tensor, "layer head"]]
    in_circuit: dict[str, Bool[Tensor, "layer head"]]
    faithfulness: float
    faithfulness_empty: float
    faithful_size: int | None
    repair_accuracy: float


def _frame(schema: ReportSchema, rows: list[dict]) -> pd.DataFrame:
    """Rows as a frame of the schema's columns, typed even when there are none (one task: no pairs)."""
    empty = schema.empty_frame()[[c.name for c in schema.columns]]
    return pd.DataFrame(rows, columns=empty.columns) if rows else empty


@register
class Circuits(Detector):
    name = "circuits"
    description = "task circuits by head patching (exact, attribution, EAP-IG) and their overlap across tasks"
    reports = (CIRCUIT_HEADS, CIRCUIT_OVERLAP, CIRCUIT_TASKS)
    probe_fields = ("task", "clean", "corrupt", "target", "foil")
    prompt_field = "clean"
    context_fields = ("clean", "corrupt")
    ParamsType = CircuitParams

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.params.selection not in ("top_percent", "faithfulness"):
            raise ProbeError(f"circuits.selection must be top_percent or faithfulness, not {self.params.selection!r}")
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
            taps = [FinalZTap(layer) for layer in range(self.model.info.n_layers)]
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
        decoder = model.hf.get_decoder()
        if pair.prefix_cache is None:  # keeps every key, so crop(-1) works past a sliding window
            pair.prefix_cache = model.prefix_cache(pair.clean[:-1])
        unembed = model.hf.get_output_embeddings()
        rows = torch.tensor([pair.target, pair.foil], device=model.device)
        softcap = getattr(model.hf.config, "final_logit_softcapping", None)
        cache_bytes = sum(t.numel() * t.element_size() for layer in pair.prefix_cache.layers for t in (layer.keys, layer.values))
        batch_size = max(1, min(self.params.batch_size, BATCHED_CACHE_BYTES // max(1, cache_bytes)))
        lds, cache = [], None
        for start in range(0, replace.shape[0], batch_size):
            chunk = replace[start : start + batch_size]
            n = chunk.shape[0]
            if cache is None or n != batch_size:
                cache = copy.deepcopy(pair.prefix_cache)
                cache.batch_repeat_interleave(n)
            edits = [
                ReplaceZ(layer, [-1], values[layer][None, None].to(model.device), chunk[:, layer].to(model.device))
                for layer in range(chunk.shape[1])
                if bool(chunk[:, layer].any())
            ]
            with torch.no_grad(), session(model, (), edits):
                last = pair.clean[-1:].expand(n, 1).to(model.device)
                hidden = decoder(input_ids=last, past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
                logits = torch.nn.functional.linear(hidden, unembed.weight[rows], None if unembed.bias is None else unembed.bias[rows]).float()
            cache.crop(-1)  # back to the prefix: the next batch reuses the repeated cache
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            lds.append((logits[:, 0] - logits[:, 1]).cpu())
        return torch.cat(lds)

    def _gradients(self, pair: Pair) -> Float[Tensor, "step layer head d_head"]:
        """d LD / d z at the final position, for input embeddings interpolated from the corrupted
        prompt (alpha 0) to the clean one (alpha = 1/steps .. 1; the last step is the clean run)."""
        model, steps = self.model, self.params.ig_steps
        embedding = model.hf.get_input_embeddings()
        with torch.no_grad():
            clean, corrupt = embedding(pair.clean[None].to(model.device)), embedding(pair.corrupt[None].to(model.device))
        alphas = torch.arange(1, steps + 1, dtype=clean.dtype, device=clean.device) / steps
        target, foil = pair.ids
        grads = []
        for alpha in alphas:  # one step at a time: a backward pass holds activations of the whole prompt
            taps = [FinalZTap(layer, grad=True) for layer in range(model.info.n_layers)]
            logits: list[Tensor] = []
            with _input_embeddings(model, corrupt + alpha * (clean - corrupt)):
                capture(model, pair.clean[None], [Logits(logits.append)], taps, grad=True)
            ld = logit_difference(logits[0][:, -1].float(), target.reshape(1).to(model.device), foil.reshape(1).to(model.device))
            grads.append(torch.stack(torch.autograd.grad(ld.sum(), [tap.delta for tap in taps]), dim=1)[0])
        return torch.stack(grads).float().cpu()

    def _analyse(self, task: str, pairs: list[Pair]) -> TaskResult:
        info = self.model.info
        n_heads = info.n_layers * info.n_heads
        ld_clean = torch.tensor([p.ld_clean for p in pairs])
        ld_corrupt = torch.tensor([p.ld_corrupt for p in pairs])
        z_clean = torch.stack([p.z_clean for p in pairs])
        z_corrupt = torch.stack([p.z_corrupt for p in pairs])

        one_head = torch.eye(n_heads, dtype=torch.bool).view(n_heads, info.n_layers, info.n_heads)
        patched = torch.stack([self._final_token_lds(p, one_head, p.z_corrupt) for p in pairs])
        gradients = torch.stack([self._gradients(p) for p in pairs])  # pair step layer head d
        delta = z_corrupt - z_clean
        importance = {
            "patching": patching_score(patched, ld_clean, ld_corrupt).view(info.n_layers, info.n_heads),
            "attribution": attribution_score(gradients[:, -1], delta, ld_clean, ld_corrupt),
            "eap_ig": attribution_score(gradients.mean(1), delta, ld_clean, ld_corrupt),
        }

        # Faithfulness of top-|importance| sets: every other head mean-ablated at the final position.
        mean_z = z_corrupt.mean(0)
        exact = importance["patching"].flatten()
        top_size = int(top_fraction(exact, self.params.top_percent / 100).sum())
        sizes = sorted({0, top_size, *[s for s in SIZE_GRID if s < n_heads]})
        ablate = torch.stack([~top_k(exact, size) for size in sizes]).view(len(sizes), info.n_layers, info.n_heads)
        kept = faithfulness(torch.stack([self._final_token_lds(p, ablate, mean_z) for p in pairs]), ld_clean)
        # Size 0 (everything ablated) is reported as faithfulness_empty, never chosen as a circuit.
        faithful_size = smallest_faithful(sizes[1:], kept[1:], self.params.faithfulness_threshold)
        if self.params.selection == "faithfulness" and faithful_size is not None:
            size = faithful_size
        else:
            size = top_size
        in_circuit = {method: top_k(scores.flatten(), size).view(info.n_layers, info.n_heads) for method, scores in importance.items()}

        repair_accuracy = float("nan")
        if self.params.repair_heads:
            # Amplify the heads whose clean output most supports the target (largest positive importance).
            boosted = torch.zeros(n_heads, dtype=torch.bool)
            boosted[torch.topk(exact, self.params.repair_heads).indices] = True
            boosted = boosted.view(1, info.n_layers, info.n_heads)
            repaired = torch.cat([self._final_token_lds(p, boosted, p.z_clean * self.params.repair_scale) for p in pairs])
            repair_accuracy = float((repaired > 0).double().mean())
        for pair in pairs:
            pair.prefix_cache = None
        return TaskResult(task, pairs, importance, in_circuit, float(kept[sizes.index(size)]), float(kept[0]), faithful_size, repair_accuracy)

    def finish(self) -> list[Report]:
        results = [self._analyse(task, pairs) for task, pairs in self._pairs.items()]
        info = self.model.info
        layer, head = torch.meshgrid(torch.arange(info.n_layers), torch.arange(info.n_heads), indexing="ij")
        heads = pd.concat(
            [
                pd.DataFrame(
                    {
                        "task": r.task,
                        "layer": layer.flatten().numpy(),
                        "head": head.flatten().numpy(),
                        "importance": r.importance[method].flatten().double().numpy(),
                        "method": method,
                        "in_circuit": r.in_circuit[method].flatten().numpy(),
                    }
                )
                for r in results
                for method in METHODS
            ],
            ignore_index=True,
        )

        overlap_rows = []
        n_heads = info.n_layers * info.n_heads
        for a, b in combinations(results, 2):
            for method in METHODS:
                set_a, set_b = a.in_circuit[method].flatten(), b.in_circuit[method].flatten()
                shared = int((set_a & set_b).sum())
                overlap_rows.append(
                    dict(
                        task_a=a.task,
                        task_b=b.task,
                        method=method,
                        n_a=int(set_a.sum()),
                        n_b=int(set_b.sum()),
                        n_shared=shared,
                        jaccard=jaccard(set_a, set_b),
                        containment_a=containment(set_a, set_b),
                        containment_b=containment(set_b, set_a),
                        p_value=hypergeometric_tail(n_heads, int(set_a.sum()), int(set_b.sum()), shared),
                        spearman=spearman(a.importance[method].flatten(), b.importance[method].flatten()),
                    )
                )
        overlap = _frame(CIRCUIT_OVERLAP, overlap_rows)

        task_rows = []
        for r in results:
            ld_clean = torch.tensor([p.ld_clean for p in r.pairs])
            exact = r.importance["patching"].flatten()
            task_rows.append(
                dict(
                    task=r.task,
                    n_pairs=len(r.pairs),
                    clean_accuracy=float((ld_clean > 0).double().mean()),
                    top1_accuracy=sum(p.top1 for p in r.pairs) / len(r.pairs),
                    mean_logit_diff=float(ld_clean.mean()),
                    mean_logit_diff_corrupt=float(torch.tensor([p.ld_corrupt for p in r.pairs]).mean()),
                    selection=self.params.selection if r.faithful_size is not None else "top_percent",
                    n_in_circuit=int(r.in_circuit["patching"].sum()),
                    faithfulness=r.faithfulness,
                    faithfulness_empty=r.faithfulness_empty,
                    faithful_size=float("nan") if r.faithful_size is None else float(r.faithful_size),
                    spearman_attribution=spearman(r.importance["attribution"].flatten(), exact),
                    spearman_eap_ig=spearman(r.importance["eap_ig"].flatten(), exact),
                    jaccard_attribution=jaccard(r.in_circuit["attribution"].flatten(), r.in_circuit["patching"].flatten()),
                    jaccard_eap_ig=jaccard(r.in_circuit["eap_ig"].flatten(), r.in_circuit["patching"].flatten()),
                    repair_accuracy=r.repair_accuracy,
                )
            )
        tasks = _frame(CIRCUIT_TASKS, task_rows)
        return [Report("circuit_heads", heads), Report("circuit_overlap", overlap), Report("circuit_tasks", tasks), self._summary(tasks, overlap)]

    def _summary(self, tasks: pd.DataFrame, overlap: pd.DataFrame) -> Report:
        rows = []
        for t in tasks.itertuples():
            rows += [
                (f"{t.task}.clean_accuracy", t.clean_accuracy, f"share of {t.n_pairs} clean prompts with LD > 0" + (" (low: its circuit means little)" if t.clean_accuracy < 0.7 else "")),
                (f"{t.task}.mean_logit_diff", t.mean_logit_diff, "mean clean logit difference target - foil"),
                (f"{t.task}.faithfulness", t.faithfulness, f"LD kept by the {t.n_in_circuit}-head circuit, others mean-ablated at the final position"),
                (f"{t.task}.spearman_eap_ig", t.spearman_eap_ig, "rank agreement of EAP-IG with exact patching over all heads"),
                (f"{t.task}.spearman_attribution", t.spearman_attribution, "rank agreement of attribution patching with exact patching"),
            ]
        for o in overlap[overlap["method"] == "patching"].itertuples():
            rows.append((f"{o.task_a}~{o.task_b}.jaccard", o.jaccard, f"{o.n_shared} shared of {o.n_a} and {o.n_b} in-circuit heads (exact patching), hypergeometric p = {o.p_value:.2g}"))
        return summary_report(rows)
