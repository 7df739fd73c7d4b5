"""What every detector is: probes in, forward passes with needs, typed reports out.

A detector is a class registered by name. Per probe it yields ``ForwardPass`` objects: the tokens,
what it needs from the pass (``lens.AttentionRows``, ``lens.Residual``, ``lens.Logits``) and any
interventions. The census runs each pass once, sharing a pass between detectors when their tokens are
the same, then calls ``done``. After the last probe, ``finish`` returns the reports.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import typing
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, ClassVar

import torch
from torch import Tensor

from lens._capture.interventions import Intervention
from lens._capture.needs import Need
from lens._store.schema import Column, ReportSchema, register_schema, unregister_schema
from lens._store.store import Report
from metrics.uncertainty import Interval, cluster_interval, mean_interval, paired_difference, proportion_interval
from probes._overview import NEUTRAL, OverviewLabel, OverviewScore

SUMMARY = register_schema(
    ReportSchema(
        "summary",
        "One row per claim a detector makes (shared by every detector): the estimate with its 95% interval over "
        "the sampling unit, n, a p-value where a null exists, and how they were computed.",
        (
            Column("claim", "string", "stable name, detector.what (e.g. retrieval.fraction_of_heads)"),
            Column("estimate", "float64", "the value"),
            Column("ci_low", "float64", "lower end of the 95% interval (NaN: no interval, see method)", nullable=True),
            Column("ci_high", "float64", "upper end of the 95% interval (NaN: no interval, see method)", nullable=True),
            Column("n", "int64", "how many sampling units the estimate rests on"),
            Column("unit", "string", "the sampling unit (probes, trials, prompt pairs, heads)"),
            Column("p_value", "float64", "p-value against the claim's null (NaN where there is none)", nullable=True),
            Column("method", "string", "how the interval and p-value were computed (bootstrap, test, correction)"),
            Column("detail", "string", "what the claim means, with its parameters"),
        ),
    )
)


@dataclass(frozen=True)
class Claim:
    """One row of the ``summary`` report. Build it from the sampling units with ``Claim.mean``,
    ``Claim.paired`` or ``Claim.proportion`` so its interval and n come with it; ``Claim.count`` is
    for numbers that are tallies, not estimates (no interval)."""

    claim: str
    estimate: float
    ci_low: float = math.nan
    ci_high: float = math.nan
    n: int = 0
    unit: str = ""
    p_value: float = math.nan
    method: str = ""
    detail: str = ""

    @classmethod
    def from_interval(cls, claim: str, interval: Interval, unit: str, detail: str) -> Claim:
        return cls(claim, interval.estimate, interval.low, interval.high, interval.n, unit,
                   getattr(interval, "p_value", math.nan), interval.method, detail)

    @classmethod
    def mean(cls, claim: str, values, unit: str, detail: str, *, seed: int = 0) -> Claim:
        """Mean over sampling units (NaN units dropped) with its bootstrap interval."""
        return cls.from_interval(claim, mean_interval(values, seed=seed), unit, detail)

    @classmethod
    def paired(cls, claim: str, treated, control, unit: str, detail: str, *, seed: int = 0) -> Claim:
        """Mean paired difference treated - control, its interval and a permutation p-value."""
        return cls.from_interval(claim, paired_difference(treated, control, seed=seed), unit, detail)

    @classmethod
    def pooled(cls, claim: str, statistic, per_unit: Sequence, unit: str, detail: str, *, seed: int = 0) -> Claim:
        """A statistic pooled over units (e.g. a ratio of sums over probes), interval by resampling units."""
        return cls.from_interval(claim, cluster_interval(statistic, *per_unit, seed=seed), unit, detail)

    @classmethod
    def proportion(cls, claim: str, successes: int, n: int, unit: str, detail: str) -> Claim:
        """A fraction of n units with its Wilson interval."""
        return cls.from_interval(claim, proportion_interval(successes, n), unit, detail)

    @classmethod
    def count(cls, claim: str, value: float, unit: str, detail: str) -> Claim:
        """A tally (how many probes were skipped, how many heads were used): no interval."""
        return cls(claim, float(value), n=int(value), unit=unit, method="count", detail=detail)


@dataclass(frozen=True)
class PaperClaim:
    """What a seed paper says about one of a detector's claims, in that claim's units, so
    ``lens report --markdown`` can say whether it reproduced (``lens.views.claims.verdict``; the rule
    is in docs/figures.md). A detector lists them in ``paper_claims``, keyed by claim name or by a
    pattern with ``*`` for claims named by their parameters (``retrieval.masking_effect_k*_random``).

    ``value`` is the paper's number, or None when the paper states only a direction; ``null`` is the
    value of no effect, or the bound the paper's claim is stated against ("under 5% of heads"), or
    None when the claim's own p-value tests its null; ``direction`` ("above" or "below" the null) is
    the side the paper's claim lies on, needed when it cannot be read from value against null."""

    source: str
    value: float | None = None
    null: float | None = None
    direction: str | None = None
    note: str = ""

    def __post_init__(self):
        if self.direction not in (None, "above", "below"):
            raise ValueError(f"PaperClaim({self.source!r}): direction {self.direction!r} is not 'above' or 'below'")
        if self.value is None and self.direction is None:
            raise ValueError(f"PaperClaim({self.source!r}): with no value, say the direction ('above' or 'below' the null)")

    @property
    def side(self) -> str | None:
        """"above" or "below": where the paper puts the estimate relative to the null (None: unstated)."""
        if self.direction is not None or self.value is None or self.null is None or self.value == self.null:
            return self.direction
        return "above" if self.value > self.null else "below"


class ProbeError(ValueError):
    """A probe that cannot be used; the message starts with where it came from (file and line)."""


@dataclass
class ForwardPass:
    tokens: Tensor
    needs: Sequence[Need] = ()
    interventions: Sequence[Intervention] = ()
    done: Callable[[], None] = lambda: None


@dataclass
class Params:
    """Base for detector parameters (a dataclass; each field is settable as ``--param NAME=VALUE``)."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def parse_param_flags(flags: Sequence[str]) -> dict[str, dict[str, str]]:
    """``["sinks.eps=0.2", ...]`` (the CLI's ``--param``) -> ``{"sinks": {"eps": "0.2"}}``."""
    params: dict[str, dict[str, str]] = {}
    for flag in flags:
        target, sep, value = flag.partition("=")
        detector, dot, name = target.partition(".")
        if not sep or not dot or not detector or not name:
            raise ProbeError(f"--param {flag!r}: expected DETECTOR.NAME=VALUE")
        params.setdefault(detector, {})[name] = value
    return params


def summary_report(claims: Sequence[Claim | tuple[str, float, str]]) -> Report:
    """The ``summary`` report of a detector's claims. A ``(name, value, detail)`` tuple is a point
    value with no interval yet (being migrated to ``Claim``); its method says so."""
    import pandas as pd

    columns = [c.name for c in SUMMARY.columns]
    claims = [c if isinstance(c, Claim) else Claim(c[0], float(c[1]), method="point value, no interval", detail=c[2]) for c in claims]
    return Report("summary", pd.DataFrame([dataclasses.astuple(claim) for claim in claims], columns=columns))


def builtin_probe_file(name: str) -> list[dict]:
    text = resources.files("probes").joinpath("data", name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class Detector:
    name: ClassVar[str]
    description: ClassVar[str]
    reports: ClassVar[tuple[ReportSchema, ...]]
    # Fields a probe-file line must have, and the field holding the text that is fed to the model.
    probe_fields: ClassVar[tuple[str, ...]]
    prompt_field: ClassVar[str]
    # Fields holding the context the task is read in (default: the prompt field); ``with_prefix``
    # lengthens a probe by putting the same text before each of them.
    context_fields: ClassVar[tuple[str, ...]] = ()
    ParamsType: ClassVar[type[Params]] = Params
    # Parameter values per census preset (text, as on the command line). "quick", the default, is
    # the parameters' defaults, sized for a census of every detector in minutes on a laptop CPU;
    # "full" is the research-scale run (every built-in probe, larger grids).
    presets: ClassVar[dict[str, dict[str, str]]] = {}
    # How the detector appears in the census overview and the HTML report (probes/_overview.py): its
    # colour (one of OKABE_ITO, distinct from the other detectors'), the labels it gives heads, its scores.
    color: ClassVar[str] = NEUTRAL
    overview_labels: ClassVar[tuple[OverviewLabel, ...]] = ()
    overview_scores: ClassVar[tuple[OverviewScore, ...]] = ()
    # Work units (the census engine, lens/_units.py): the instance attributes that ``passes`` fills.
    # Each probe runs in a fresh instance; the census merges their values in probe order (lists are
    # concatenated, dicts merged key by key, numbers and Counters added, None gives way to a value),
    # so a detector never needs to know how its probes were sharded or where they ran.
    accumulates: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model, params: Params | None = None, *, seed: int = 0, bos: str = "auto"):
        self.model = model
        self.params = params or self.ParamsType()
        self.seed = seed
        # BOS policy for every probe text (``Model.tokenize``): "auto" follows the tokenizer.
        self.bos = bos
        self.generator = torch.Generator().manual_seed(seed)
        self.rng = random.Random(seed)
        # Set by the census before the first pass: files a detector saves go into the store, named by run.
        self.run_id = ""
        self.store = None
        # Results of the later stages (``stages()``), by name: computed by the census as their own
        # units, or on first use by ``stage(name)``.
        self.stage_results: dict[str, Any] = {}

    @classmethod
    def parse_params(cls, assignments: Mapping[str, str]) -> Params:
        """The parameter dataclass from ``{"name": "text value"}``, validated by pydantic against the
        declared types (and any ``Annotated`` constraints): a value is read as JSON (``0.2``, ``true``,
        ``"first"``), else as plain text; a wrong type, a list, or a misspelt boolean is one clear error."""
        from pydantic import TypeAdapter, ValidationError

        params_type = cls.ParamsType
        hints = typing.get_type_hints(params_type, include_extras=True)
        names = [f.name for f in dataclasses.fields(params_type)]
        values = {}
        for key, text in assignments.items():
            if key not in names:
                raise ProbeError(f"detector {cls.name!r} has no parameter {key!r}; parameters: {sorted(names)}")
            adapter = TypeAdapter(hints[key])
            try:
                values[key] = adapter.validate_json(text, strict=True)
            except ValidationError as as_json:
                try:
                    values[key] = adapter.validate_python(text, strict=True)
                except ValidationError as as_text:
                    # Not JSON at all: the plain-text reading says what is wrong; else the JSON one does.
                    error = as_text if as_json.errors()[0]["type"] == "json_invalid" else as_json
                    raise ProbeError(f"parameter {cls.name}.{key}={text!r}: {error.errors()[0]['msg']}") from None
        try:
            return TypeAdapter(params_type).validate_python(values)
        except ValidationError as error:
            first = error.errors()[0]
            raise ProbeError(f"parameter {cls.name}.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None

    # -- probes ---------------------------------------------------------------------------------
    def builtin_probes(self) -> list[dict]:
        raise NotImplementedError

    def check_probe(self, probe: Any, where: str) -> dict:
        """Validate one probe (from a file line or the built-in set); errors start with ``where``."""
        if not isinstance(probe, dict):
            raise ProbeError(f"{where}: expected a JSON object, got {type(probe).__name__}")
        for name in self.probe_fields:
            if not isinstance(probe.get(name), str) or not probe[name]:
                raise ProbeError(f"{where}: missing or empty string field {name!r} (the {self.name} detector needs {list(self.probe_fields)})")
        n_tokens = len(self.tokens(probe[self.prompt_field]))
        self.model.check_length(n_tokens + self.extra_tokens(), what=f"{where}: prompt")
        return probe

    def with_prefix(self, probe: dict, prefix: str) -> dict:
        """The same probe read after ``prefix``: long-context variants of a task (benchmarks)."""
        return {**probe, **{name: prefix + probe[name] for name in self.context_fields or (self.prompt_field,)}}

    def extra_tokens(self) -> int:
        """Tokens a detector appends to a prompt (a generated answer), counted against the context."""
        return 0

    def tokens(self, text: str) -> Tensor:
        return self.model.tokenize(text, bos=self.bos)

    def bos_shift(self, text: str) -> int:
        """Tokens the BOS policy puts before ``text``'s own (0 or 1): the offset from positions in
        ``tokenizer(text, add_special_tokens=False)`` to positions in ``self.tokens(text)``."""
        return len(self.tokens(text)) - len(self.model.tokenize(text))

    # -- running --------------------------------------------------------------------------------
    def passes(self, probe: dict, index: int) -> Iterator[ForwardPass]:
        raise NotImplementedError

    def finish(self) -> list[Report]:
        raise NotImplementedError

    # -- work units -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What ``passes`` accumulated (the ``accumulates`` attributes): one map unit's output."""
        return {name: getattr(self, name) for name in self.accumulates}

    def absorb(self, state: Mapping[str, Any]) -> None:
        """Merge another instance's ``state()`` (of later probes) into this one."""
        for name in self.accumulates:
            setattr(self, name, merge_values(getattr(self, name), state[name]))

    def stages(self) -> list[str]:
        """Names of the expensive steps that run after every probe, on the merged state (a masking
        test, training, a patching sweep), in order; each is a unit of its own, kept once done."""
        return []

    # True when no stage reads another's result (``self.stage``), so an executor with several workers
    # may run them at once (the circuits detector's per-task sweeps); False: in order, one at a time.
    independent_stages: ClassVar[bool] = False

    def run_stage(self, name: str) -> Any:
        """Compute stage ``name`` from the merged state (and earlier stages); the result must pickle."""
        raise KeyError(f"detector {self.name!r} has no stage {name!r}")

    def stage(self, name: str) -> Any:
        """The result of stage ``name``: the census's, or computed now (e.g. when ``finish`` is called
        directly from Python)."""
        if name not in self.stage_results:
            self.stage_results[name] = self.run_stage(name)
        return self.stage_results[name]

    @staticmethod
    def summary_lines(reports: list[Report]) -> list[str]:
        """One-line headline claims for the CLI's closing table: estimate [interval], n and p."""
        summary = [r for r in reports if r.type == "summary"]
        if not summary:
            return []
        return [format_claim(row) for row in summary[0].frame.itertuples()]


def merge_values(first: Any, later: Any) -> Any:
    """Merge two accumulated values of one attribute, ``later`` from probes after ``first``'s."""
    if first is None:
        return later
    if later is None:
        return first
    if isinstance(first, Counter):
        return first + later
    if isinstance(first, list):
        return first + later
    if isinstance(first, dict):
        return {key: merge_values(first.get(key), later.get(key)) for key in dict.fromkeys([*first, *later])}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return first + later
    # Anything else (a frame, a one-off excerpt) is kept from the first probe that made it.
    return first


def format_claim(row) -> str:
    interval = "" if math.isnan(row.ci_low) else f" [{row.ci_low:.3g}, {row.ci_high:.3g}]"
    p_value = "" if math.isnan(row.p_value) else f", p={row.p_value:.2g}"
    return f"{row.claim} = {row.estimate:.4g}{interval} (n={row.n} {row.unit}{p_value})"


@dataclass
class Registry:
    detectors: dict[str, type[Detector]] = field(default_factory=dict)

    def register(self, cls: type[Detector]) -> type[Detector]:
        if cls.name in self.detectors:
            raise ValueError(f"detector {cls.name!r} registered twice")
        for schema in cls.reports:
            register_schema(schema)
        self.detectors[cls.name] = cls
        return cls

    def unregister(self, name: str) -> None:
        """Remove a detector and the report types only it declared (a detector defined in a test)."""
        cls = self.detectors.pop(name)
        still_declared = {schema.name for other in self.detectors.values() for schema in other.reports}
        for schema in cls.reports:
            if schema.name not in still_declared:
                unregister_schema(schema.name)


REGISTRY = Registry()
register = REGISTRY.register
