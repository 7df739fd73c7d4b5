"""What every detector is: probes in, forward passes with needs, typed reports out.

A detector is a class registered by name. Per probe it yields ``ForwardPass`` objects: the tokens,
what it needs from the pass (``lens.AttentionRows``, ``lens.Residual``, ``lens.Logits``) and any
interventions. The census runs each pass once, sharing a pass between detectors when their tokens are
the same, then calls ``done``. After the last probe, ``finish`` returns the reports.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, ClassVar

import torch
from torch import Tensor

from lens._capture.interventions import Intervention
from lens._capture.needs import Need
from lens._store.schema import Column, ReportSchema, register_schema
from lens._store.store import Report

SUMMARY = register_schema(
    ReportSchema(
        "summary",
        "Per-run, per-detector headline numbers (long format), e.g. Sink_1^eps.",
        (
            Column("metric", "string", "name of the statistic"),
            Column("value", "float64", "its value"),
            Column("detail", "string", "what it means, with its parameters"),
        ),
    )
)


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


def summary_report(rows: list[tuple[str, float, str]]) -> Report:
    import pandas as pd

    return Report("summary", pd.DataFrame(rows, columns=["metric", "value", "detail"]))


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

    def __init__(self, model, params: Params | None = None, *, seed: int = 0, prepend_bos: bool = False):
        self.model = model
        self.params = params or self.ParamsType()
        self.seed = seed
        self.prepend_bos = prepend_bos
        self.generator = torch.Generator().manual_seed(seed)
        self.rng = random.Random(seed)
        # Set by the census before the first pass: files a detector saves go into the store, named by run.
        self.run_id = ""
        self.store = None

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
        return self.model.tokenize(text, prepend_bos=self.prepend_bos)

    # -- running --------------------------------------------------------------------------------
    def passes(self, probe: dict, index: int) -> Iterator[ForwardPass]:
        raise NotImplementedError

    def finish(self) -> list[Report]:
        raise NotImplementedError

    def summary_lines(self, reports: list[Report]) -> list[str]:
        """One-line headline numbers for the CLI's closing table."""
        summary = [r for r in reports if r.type == "summary"]
        if not summary:
            return []
        return [f"{row.metric} = {row.value:.4g}  ({row.detail})" for row in summary[0].frame.itertuples()]


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


REGISTRY = Registry()
register = REGISTRY.register
