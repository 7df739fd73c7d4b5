"""Work units of a census: what one unit is, how it runs on a model, and where its output is kept.

A census is planned as units of (detector, kind, index):

- a **map** unit runs one shard of a detector's probes and returns what they accumulated
  (``Detector.state()``); every probe runs in a fresh detector instance and the shard merges them
  in probe order, so the result does not depend on how probes were sharded or batched;
- a **stage** unit runs one of the detector's later stages (``Detector.stages()``: a masking test,
  focus training, one task's patching sweeps) on the merged map states and the earlier stages.

The functions that run units take everything as arguments (a model and picklable specs), so the
in-process executor and Ray workers run the same code, each unit timed where it runs (``timed``).
``Checkpoints`` keeps each finished unit's output and its time in the store, atomically, so an
interrupted census resumes without recomputing it and still knows what the whole run cost.
"""

from __future__ import annotations

import fcntl
import io
import json
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import probes as detector_registry
from lens._capture.batch import run_passes
from lens._capture.session import capture
from lens._store.store import ReportStore, StoreError
from probes._base import Detector, ForwardPass


@dataclass(frozen=True)
class DetectorSpec:
    """How to build a detector anywhere: its name, parameter values (as text) and run settings."""

    name: str
    assignments: Mapping[str, str]
    seed: int
    bos: str

    def build(self, model) -> Detector:
        cls = detector_registry.get(self.name)
        return cls(model, cls.parse_params(dict(self.assignments)), seed=self.seed, bos=self.bos)


@dataclass(frozen=True)
class Unit:
    detector: str
    kind: str  # "map" or "stage"
    name: str  # "map-0003" or the stage's name
    probes: tuple[tuple[int, dict], ...] = ()  # map units: (index in the detector's probe set, probe)

    @property
    def key(self) -> str:
        return f"{self.detector}/{self.kind}/{self.name}"


def map_units(detector: str, probes: Sequence[dict], shard_size: int) -> list[Unit]:
    indexed = list(enumerate(probes))
    return [
        Unit(detector, "map", f"map-{start // shard_size:04d}", tuple(indexed[start : start + shard_size]))
        for start in range(0, len(indexed), shard_size)
    ]


# -- running units ---------------------------------------------------------------------------------
def lockstep(streams: Iterable[Iterator[ForwardPass]]) -> Iterator[list[ForwardPass]]:
    """Each step's passes of several probes' pass streams: the next pass of every stream not yet
    ended, in stream order. A stream's next pass is asked for only after its previous one ran, so a
    pass may depend on the ``done`` of the one before it; the passes of one step are independent."""
    streams = list(streams)
    while streams:
        step, alive = [], []
        for stream in streams:
            forward = next(stream, None)
            if forward is not None:
                step.append(forward)
                alive.append(stream)
        streams = alive
        if step:
            yield step


@dataclass(frozen=True)
class UnitCost:
    """What computing something took where it ran: wall seconds and the process's CPU seconds (every
    thread), so a run's cost adds up over its units however often it was interrupted and resumed."""

    wall_s: float
    cpu_s: float

    def __add__(self, other: UnitCost) -> UnitCost:
        return UnitCost(self.wall_s + other.wall_s, self.cpu_s + other.cpu_s)

    @classmethod
    def read(cls, path: Path) -> UnitCost:
        return cls(**json.loads(path.read_text(encoding="utf-8")))


NO_COST = UnitCost(0.0, 0.0)


def timed(function: Callable[..., Any], *args, **kwargs) -> tuple[Any, UnitCost]:
    """``function(*args, **kwargs)`` and what it cost."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return result, UnitCost(time.perf_counter() - wall, time.process_time() - cpu)


def run_map(model, spec: DetectorSpec, probes: Sequence[tuple[int, dict]], *, batched: bool = True) -> tuple[dict[str, Any], int]:
    """Run one shard: each probe in its own instance, their passes advanced in lockstep. Each step's
    passes (one per probe still running) are independent, so ``batched`` runs them several to a
    forward pass (``run_passes``: right-padded rows, every statistic as a batch of one would give it);
    otherwise each pass is its own forward. Returns the merged state and the number of forward passes."""
    instances = [spec.build(model) for _ in probes]
    n_passes = 0
    for step in lockstep(instance.passes(probe, index) for instance, (index, probe) in zip(instances, probes)):
        if batched:
            n_passes += run_passes(model, step)
            continue
        for forward in step:
            capture(model, forward.tokens, forward.needs, forward.interventions)
            forward.done()
            n_passes += 1
    merged = spec.build(model)
    for instance in instances:
        merged.absorb(instance.state())
    return merged.state(), n_passes


def reduce_detector(model, spec: DetectorSpec, states: Sequence[Mapping[str, Any]], stage_results: Mapping[str, Any] | None = None) -> Detector:
    """A detector holding the merged map states (in unit order) and the finished stages' results."""
    detector = spec.build(model)
    for state in states:
        detector.absorb(state)
    detector.stage_results.update(stage_results or {})
    return detector


def run_stage(model, spec: DetectorSpec, states: Sequence[Mapping[str, Any]], earlier: Mapping[str, Any], name: str) -> Any:
    return reduce_detector(model, spec, states, earlier).run_stage(name)


# -- keeping unit outputs ----------------------------------------------------------------------------
class RunLockedError(StoreError):
    pass


@dataclass
class Checkpoints:
    """Finished units of one run: ``<store>/units/<run_id>/<detector>/<kind>/<name>.pt``, each written
    atomically (a unit is finished exactly when its file exists) after its cost (``<name>.cost.json``),
    and the run's plan (``plan.json``)."""

    store: ReportStore
    run_id: str

    @property
    def folder(self) -> Path:
        return self.store.path / "units" / self.run_id

    def path(self, unit: Unit) -> Path:
        return self.folder / f"{unit.key}.pt"

    def done(self, unit: Unit) -> bool:
        return self.path(unit).exists()

    def save(self, unit: Unit, output: Any, cost: UnitCost | None = None) -> None:
        if cost is not None:
            self.store.write_artifact(str(self._cost_path(unit).relative_to(self.store.path)), json.dumps(vars(cost)).encode())
        buffer = io.BytesIO()
        torch.save(output, buffer)
        self.store.write_artifact(str(self.path(unit).relative_to(self.store.path)), buffer.getvalue())

    def _cost_path(self, unit: Unit) -> Path:
        return self.folder / f"{unit.key}.cost.json"

    def cost(self, units: Iterable[Unit]) -> UnitCost | None:
        """The summed cost of these finished units; None when one was kept without its cost (a unit
        finished before costs were recorded), since a partial sum would understate the run."""
        paths = [self._cost_path(unit) for unit in units]
        if not all(path.exists() for path in paths):
            return None
        return sum(map(UnitCost.read, paths), NO_COST)

    def load(self, unit: Unit) -> Any:
        try:
            return torch.load(self.path(unit), weights_only=False)
        except Exception as error:  # a file this run wrote but cannot read back: recompute that unit
            raise StoreError(f"{self.path(unit)}: unreadable unit output ({error}); delete it to recompute the unit") from None

    def write_plan(self, plan: Mapping[str, Any]) -> None:
        self.store.write_artifact(str((self.folder / "plan.json").relative_to(self.store.path)), json.dumps(plan, indent=1).encode())

    def read_plan(self) -> dict[str, Any] | None:
        plan = self.folder / "plan.json"
        return json.loads(plan.read_text(encoding="utf-8")) if plan.exists() else None

    def count(self) -> int:
        return sum(1 for _ in self.folder.rglob("*.pt")) if self.folder.exists() else 0

    def recorded_cost(self) -> UnitCost:
        """What the finished units that recorded their cost took, so far."""
        files = self.folder.rglob("*.cost.json") if self.folder.exists() else []
        return sum(map(UnitCost.read, files), NO_COST)

    def clear(self) -> None:
        """Remove the run's unit outputs once its reports and manifest are written."""
        shutil.rmtree(self.folder, ignore_errors=True)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run: a second process running the same run waits for nothing and fails with one line."""
        self.folder.mkdir(parents=True, exist_ok=True)
        handle = open(self.folder / ".lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RunLockedError(f"run {self.run_id} is being computed by another process on {self.store.path}; "
                                 "wait for it to finish, or start a separate run with --fresh") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


def unfinished_runs(store: ReportStore) -> list[dict[str, Any]]:
    """Runs with a plan and no manifest: their plan (command, units), how many units are done and the
    compute those recorded (units kept before costs were recorded count as none)."""
    root = store.path / "units"
    if not root.exists():
        return []
    finished = set(store.runs()["run_id"]) if store.report_types() else set()
    rows = []
    for folder in sorted(root.iterdir()):
        plan_file = folder / "plan.json"
        if folder.name in finished or not plan_file.exists():
            continue
        checkpoints = Checkpoints(store, folder.name)
        rows.append({**checkpoints.read_plan(), "run_id": folder.name, "units_done": checkpoints.count(),
                     "compute_s_so_far": checkpoints.recorded_cost().wall_s})
    return rows


def load_spec(model) -> dict[str, str]:
    """What a worker process needs to load the same model: catalog name or local folder, device, dtype."""
    from lens._models.catalog import CATALOG

    source = model.name if model.name in CATALOG else (str(model.folder) if model.folder else None)
    if source is None:
        raise ValueError(f"model {model.name!r} has no catalog name or local folder, so workers cannot load it")
    return {"name": source, "device": str(model.device), "dtype": str(next(model.hf.parameters()).dtype).removeprefix("torch.")}


ProgressCallback = Callable[[int, int, str], None]
