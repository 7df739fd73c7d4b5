"""The head census: run detectors over their probes on one model and store their reports.

A census is a batch job of work units (lens/_units.py): shards of each detector's probes (map), then
each detector's later stages, then its reduce into reports. Every finished unit is kept in the store,
so nothing finished is computed twice: the run's id is derived from what determines its results, and
running the same census again resumes it. A detector's reports are written when its reduce is done,
then its manifest row (``runs``); a run is finished when every detector has its manifest row.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
import secrets
import signal
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pandas as pd
import torch

import probes as detector_registry
from lens._executors import EXECUTORS, make_executor
from lens._models.model import BOS_POLICIES
from lens._probe_file import read_probe_file, probe_set_hash
from lens._store.store import Report, ReportStore
from lens._units import Checkpoints, DetectorSpec, ProgressCallback, Unit, map_units, reduce_detector, timed
from metrics.uncertainty import pool_seeds
from probes._base import ProbeError

_VERSIONED = ("torch", "transformers", "transformer-lens", "lens-workbench", "numpy", "pandas", "pyarrow", "duckdb")


# Census presets: "quick" (each detector's defaults) and "full" (each detector's ``presets["full"]``).
PRESETS = ("quick", "full")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass
class CensusResult:
    """A finished run: its reports are in ``store``; in a notebook it shows its claims and overview."""

    run_id: str
    model: str
    store: ReportStore
    reports: dict[str, list[Report]] = field(default_factory=dict)
    summary: dict[str, list[str]] = field(default_factory=dict)
    n_forward_passes: int = 0  # run by this call (a resumed run counts only what it computed)
    resumed_units: int = 0  # units found finished in the store and not recomputed
    units_run: int = 0  # units computed by this call
    reused: dict[str, str] = field(default_factory=dict)  # detector -> the run whose equal results were copied

    def claims(self) -> pd.DataFrame:
        """Every detector's claims: estimate, 95% interval, n, p-value, method."""
        columns = ["detector", "claim", "estimate", "ci_low", "ci_high", "n", "unit", "p_value", "method"]
        return self.store.read("summary", run_id=self.run_id)[columns]

    def views(self) -> list[str]:
        """Names of the views this run can draw (for ``show``)."""
        from lens.views import run_views

        return run_views(self.store, self.run_id)

    def show(self, view: str = "overview.labels"):
        """Draw one view of this run (``result.views()`` lists them) and return the figure."""
        from lens.views import render

        return render(self.store, view, run_id=self.run_id)

    def save(self, store: ReportStore | str | Path) -> ReportStore:
        """Keep this run in ``store`` (a run made in a temporary store is otherwise lost)."""
        target = store if isinstance(store, ReportStore) else ReportStore(store)
        self.store.copy_run(self.run_id, target)
        return target

    def _repr_html_(self) -> str:
        claims = self.claims().drop(columns="method")
        return (f"<b>census {self.run_id}</b> on {self.model}: {self.n_forward_passes} forward passes, store "
                f"<code>{self.store.path}</code>" + claims.to_html(index=False, float_format=lambda v: f"{v:.4g}"))

    def _ipython_display_(self) -> None:
        """In a notebook: the claims table, then the overview figure (drawn by plotly's own renderer)."""
        from IPython.display import HTML, display

        display(HTML(self._repr_html_()))
        if "overview.labels" in self.views():
            self.show("overview.labels").show()


class CensusInterrupted(KeyboardInterrupt):
    """Ctrl-C during a census: the unit in progress finished and was kept, like every unit before it."""

    def __init__(self, run_id: str, done: int, total: int):
        super().__init__(f"interrupted: {done} of {total} units of run {run_id} are done and kept")
        self.run_id, self.done, self.total = run_id, done, total


# The packages whose versions are part of what determines a result (run identity, reuse).
_IDENTITY_PACKAGES = ("lens-workbench", "torch", "transformers")


def _model_dtype(model) -> str:
    return str(next(model.hf.parameters()).dtype)


def run_identity(model, specs: Mapping[str, DetectorSpec], probe_hashes: Mapping[str, str], params_json: Mapping[str, str]) -> str:
    """A run's id from what determines its results: the model's weights (and dtype), each detector's
    parameters, probe set, seed and BOS policy, and the versions of the code that computes them."""
    versions = package_versions()
    payload = {
        "model": model.info.fingerprint,
        "dtype": _model_dtype(model),
        "device": model.device.type,
        "detectors": {name: [params_json[name], probe_hashes[name], spec.seed, spec.bos] for name, spec in sorted(specs.items())},
        "versions": {name: versions.get(name) for name in _IDENTITY_PACKAGES},
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"{model.name.replace('/', '_')}-{digest[:12]}"


class _StopAfterUnit:
    """While active (main thread only), the first Ctrl-C asks the census to stop after the unit in
    progress; a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("lens: stopping after the unit in progress (Ctrl-C again to stop now)", file=sys.stderr)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def census(
    model,
    detectors: Sequence[str] | None = None,
    store: ReportStore | str | Path | None = None,
    *,
    probes_file: str | Path | None = None,
    probes: Mapping[str, Sequence[dict]] | None = None,
    limit: int | None = None,
    seed: int = 0,
    params: dict[str, dict[str, str]] | None = None,
    bos: str = "auto",
    preset: str = "quick",
    fresh: bool = False,
    resume: str | None = None,
    executor: str = "local",
    address: str | None = None,
    workers: int = 2,
    shard_size: int = 8,
    batched: bool = True,
    on_progress: ProgressCallback | None = None,
    progress: bool | None = None,
) -> CensusResult:
    """Run ``detectors`` (default: every registered one) on ``model`` and write their reports into
    ``store`` (default: a new temporary store; ``result.save(path)`` keeps the run).

    The census is a batch of work units (lens/_units.py): shards of ``shard_size`` probes per
    detector, then each detector's later stages. Each finished unit is kept in the store, so the
    same call again (same model, detectors, parameters, probes, seed) resumes the run where it
    stopped, skipping finished units; ``fresh=True`` starts a new run instead, and ``resume=run_id``
    resumes such a run (its settings must be the same). Ctrl-C stops after
    the unit in progress (``CensusInterrupted``). ``executor="ray"`` runs units on ``workers`` Ray
    actors (a local Ray, or the cluster at ``address``). ``batched`` runs a shard's probes several to
    a forward pass (the reports equal those of one probe per pass, to float precision).

    ``probes`` maps a detector name to its own probe dicts (Python API; it overrides ``probes_file``
    and the built-in probes for that detector). ``params`` maps a detector name to ``{parameter: text
    value}``; ``preset`` ("quick" or "full") picks each detector's preset parameters, which ``params``
    override. ``bos`` is the BOS policy of every probe text (``Model.tokenize``): ``"auto"`` follows the
    tokenizer, ``"always"`` or ``"never"``; the run manifest records it. ``on_progress(done, total,
    phase)`` reports units; ``progress`` draws a bar (default: in a notebook). Bad input raises before
    anything is run.
    """
    detectors = list(detector_registry.available()) if detectors is None else list(detectors)
    if store is None:  # a notebook run: keep it with ``result.save(store)``
        store = ReportStore(tempfile.mkdtemp(prefix="lens-store-"))
    store = store if isinstance(store, ReportStore) else ReportStore(store)
    if on_progress is None and (progress or (progress is None and "ipykernel" in sys.modules)):
        on_progress = _notebook_progress()
    store.check_writable()
    params = params or {}
    classes = {name: detector_registry.get(name) for name in detectors}
    unknown_params = set(params) - set(classes)
    if unknown_params:
        raise ProbeError(f"parameters given for detector(s) not in this census: {sorted(unknown_params)}")
    if preset not in PRESETS:
        raise ProbeError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if bos not in BOS_POLICIES:
        raise ProbeError(f"bos must be one of {', '.join(BOS_POLICIES)}, got {bos!r}")
    if shard_size < 1:
        raise ProbeError(f"shard size must be at least 1, got {shard_size}")
    if executor not in EXECUTORS:
        raise ProbeError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    torch.manual_seed(seed)
    specs = {name: DetectorSpec(name, {**cls.presets.get(preset, {}), **params.get(name, {})}, seed, bos) for name, cls in classes.items()}
    instances = {name: spec.build(model) for name, spec in specs.items()}
    file_probes = read_probe_file(probes_file) if probes_file else None
    probe_sets: dict[str, list[dict]] = {}
    probes = probes or {}
    unknown_probes = set(probes) - set(classes)
    if unknown_probes:
        raise ProbeError(f"probes given for detector(s) not in this census: {sorted(unknown_probes)}")
    for name, detector in instances.items():
        if name in probes:
            listed = [(f"{name} probe {i + 1}", p) for i, p in enumerate(probes[name])]
        elif file_probes is not None:
            listed = file_probes
        else:
            listed = [(f"built-in {name} probe {i + 1}", p) for i, p in enumerate(detector.builtin_probes())]
        listed = listed[:limit] if limit is not None else listed
        probe_sets[name] = [detector.check_probe(probe, where) for where, probe in listed]

    probe_hashes = {name: probe_set_hash(probe_sets[name]) for name in instances}
    params_json = {name: detector.params.to_json() for name, detector in instances.items()}
    identity = run_identity(model, specs, probe_hashes, params_json)
    if resume is not None:
        if not resume.startswith(identity):
            raise ProbeError(f"run {resume!r} was made with other settings than this census (its id would be {identity}...)")
        run_id = resume
    else:
        run_id = identity + ("-" + secrets.token_hex(3) if fresh else "")
    result = CensusResult(run_id, model.name, store)
    finished = set(store.runs(run_id=run_id)["detector"]) if "runs" in store.report_types() else set()
    if not fresh:
        for name in instances:
            source = None if name in finished else _reuse_detector(store, model, run_id, name, specs[name], params_json[name], probe_hashes[name])
            if source is not None:
                finished.add(name)
                result.reused[name] = source
    pending = [name for name in instances if name not in finished]
    if pending:
        job = _Job(model, store, run_id, {name: specs[name] for name in pending}, probe_sets, shard_size, on_progress, result)
        job.run(executor, address, workers, batched, manifest=lambda name: {
            "model_fingerprint": model.info.fingerprint,
            "params": params_json[name],
            "probe_hash": probe_hashes[name],
            "n_probes": len(probe_sets[name]),
            "seed": seed,
            "bos": bos,
            "bos_token": model.tokenizer.bos_token or "",
            "bos_added": len(model.tokenize("", bos=bos)) == 1,
            "device": str(model.device),
            "dtype": _model_dtype(model),
            "reused_from": None,
        })
    for name in instances:
        result.reports[name] = _stored_reports(store, run_id, name)
        result.summary[name] = instances[name].summary_lines(result.reports[name])
    return result


class _Job:
    """The units of one run still to do, run in three phases: every probe shard (map), each
    detector's later stages, then each detector's reduce into its reports and manifest row."""

    def __init__(self, model, store: ReportStore, run_id: str, specs: Mapping[str, DetectorSpec], probe_sets, shard_size: int,
                 on_progress: ProgressCallback | None, result: CensusResult):
        self.model, self.store, self.run_id, self.specs, self.result = model, store, run_id, specs, result
        self.checkpoints = Checkpoints(store, run_id)
        self.units = {name: map_units(name, probe_sets[name], shard_size) for name in specs}
        self.report = on_progress or (lambda done, total, phase: None)
        # Map units, then a reduce per detector; stages join the total once the merged state names them.
        self.total = sum(map(len, self.units.values())) + len(specs)
        self.done = 0
        self.stop = None

    def _finished(self, phase: str) -> None:
        self.done += 1
        self.result.units_run += 1
        self.report(self.done, self.total, phase)
        if self.stop.requested:
            raise CensusInterrupted(self.run_id, self.done, self.total)

    def run(self, executor: str, address: str | None, workers: int, batched: bool, manifest) -> None:
        checkpoints = self.checkpoints
        with checkpoints.locked(), _StopAfterUnit() as self.stop:
            plan = checkpoints.read_plan() or {
                "model": self.model.name, "detectors": list(self.specs), "map_units": sum(map(len, self.units.values())),
                "command": " ".join(["lens", *sys.argv[1:]]) if sys.argv and Path(sys.argv[0]).name == "lens" else "",
                "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            }
            checkpoints.write_plan(plan)
            todo = [unit for units in self.units.values() for unit in units if not checkpoints.done(unit)]
            self.done = self.result.resumed_units = self.total - len(self.specs) - len(todo)
            runner = make_executor(executor, self.model, address=address, workers=workers, batched=batched)
            try:
                self.report(self.done, self.total, "probes")
                for unit, ((state, n_passes), cost) in runner.map(todo, self.specs):
                    checkpoints.save(unit, state, cost)
                    self.result.n_forward_passes += n_passes
                    self._finished(f"{unit.detector} {unit.name}")
                reducers = self._stages(runner)
            finally:
                runner.close()
            versions = json.dumps(package_versions(), sort_keys=True)
            for name, reducer in reducers.items():
                reducer.run_id, reducer.store = self.run_id, self.store
                self.report(self.done, self.total, f"{name} reduce")
                reports, reduce_cost = timed(reducer.finish)
                units = [*self.units[name], *(Unit(name, "stage", stage) for stage in reducer.stages())]
                cost = checkpoints.cost(units)
                cost = cost + reduce_cost if cost is not None else None
                row = {**manifest(name), "versions": versions, "started_at": plan["created_at"],
                       "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "reports": ",".join(sorted({r.type for r in reports})),
                       "compute_s": cost.wall_s if cost else None, "cpu_s": cost.cpu_s if cost else None}
                _write_detector(self.store, self.model, self.run_id, name, reports, row)
                self._finished(f"{name} reduce")
        checkpoints.clear()

    def _stages(self, runner) -> dict[str, object]:
        """Each detector merged from its map units, with its later stages done (resumed or run)."""
        checkpoints = self.checkpoints
        states = {name: [checkpoints.load(unit) for unit in units] for name, units in self.units.items()}
        reducers = {name: reduce_detector(self.model, self.specs[name], states[name]) for name in self.specs}
        chains = {}
        for name, reducer in reducers.items():
            stage_units = {stage: Unit(name, "stage", stage) for stage in reducer.stages()}
            earlier = {stage: checkpoints.load(unit) for stage, unit in stage_units.items() if checkpoints.done(unit)}
            reducer.stage_results.update(earlier)
            self.total += len(stage_units)
            self.done += len(earlier)
            self.result.resumed_units += len(earlier)
            pending = [stage for stage in stage_units if stage not in earlier]
            if pending:
                chains[name] = (self.specs[name], states[name], earlier, pending)
        self.report(self.done, self.total, "stages")
        for name, stage, output, cost in runner.stages(chains):
            checkpoints.save(Unit(name, "stage", stage), output, cost)
            reducers[name].stage_results[stage] = output
            self._finished(f"{name} {stage}")
        return reducers


def census_seeds(model, detectors: Sequence[str] | None = None, store: ReportStore | str | Path | None = None, *,
                 seeds: Sequence[int] = (0, 1, 2), **options) -> tuple[list[CensusResult], CensusResult]:
    """The same census under each of ``seeds`` (everything stochastic: random control draws, probe
    sampling, training), then one more run holding only the ``summary`` with each claim pooled over
    the seeds (``metrics.uncertainty.pool_seeds``: mean estimate, union of the intervals, largest
    p-value). Each seed's run is an ordinary run (resumable, with every report); returns them and
    the pooled run."""
    if len(set(seeds)) < 2:
        raise ProbeError(f"seeds must be at least two different seeds, got {list(seeds)}")
    if store is None:
        store = ReportStore(tempfile.mkdtemp(prefix="lens-store-"))
    store = store if isinstance(store, ReportStore) else ReportStore(store)
    per_seed = [census(model, detectors, store, seed=seed, **options) for seed in seeds]
    run_ids = [r.run_id for r in per_seed]
    pooled_id = f"{model.name.replace('/', '_')}-pooled-{hashlib.sha256(' '.join(run_ids).encode()).hexdigest()[:12]}"
    pooled = CensusResult(pooled_id, model.name, store)
    summaries = store.read("summary", run_id=run_ids)
    seed_of = {run_id: seed for run_id, seed in zip(run_ids, seeds)}
    for name in per_seed[0].reports:
        claims = summaries[summaries["detector"] == name]
        rows = [_pooled_claim(claim, group, seed_of) for claim, group in claims.groupby("claim", sort=False)]
        frame = pd.DataFrame(rows, columns=[c for c in claims.columns if c not in ("run_id", "model", "detector")])
        seed_rows = store.runs(run_id=run_ids, detector=name)
        manifest = seed_rows[seed_rows["run_id"] == run_ids[0]].drop(columns=["run_id", "model", "detector"]).iloc[[0]]
        manifest = manifest.assign(seed=-1, reports="summary", finished_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), reused_from=None,
                                   **{cost: seed_rows[cost].sum(min_count=len(run_ids)) for cost in ("compute_s", "cpu_s")})  # what the seeds cost
        reports = [Report("summary", frame)]
        _write_detector(store, model, pooled_id, name, reports, manifest.iloc[0].to_dict())
        pooled.reports[name] = _stored_reports(store, pooled_id, name)
        pooled.summary[name] = detector_registry.get(name).summary_lines(pooled.reports[name])
    return per_seed, pooled


def _pooled_claim(claim: str, group: pd.DataFrame, seed_of: Mapping[str, int]) -> dict:
    group = group.assign(seed=group["run_id"].map(seed_of)).sort_values("seed")
    estimate, low, high, p_value = pool_seeds(*(group[c].to_numpy(dtype=float) for c in ("estimate", "ci_low", "ci_high", "p_value")))
    seeds = ",".join(map(str, group["seed"]))
    spread = float(group["estimate"].std(ddof=1)) if len(group) > 1 else float("nan")
    first = group.iloc[0]
    return {
        "claim": claim, "estimate": estimate, "ci_low": low, "ci_high": high, "n": int(group["n"].min()), "unit": first["unit"],
        "p_value": p_value,
        "method": f"{first['method']}; pooled over seeds {seeds}: mean estimate, union of the intervals, largest p",
        "detail": f"{first['detail']} (between-seed SD {spread:.3g})",
    }


def _reuse_detector(store: ReportStore, model, run_id: str, name: str, spec: DetectorSpec, params_json: str, probe_hash: str) -> str | None:
    """Copy detector ``name``'s reports from the newest finished run in ``store`` that computed it with
    everything that determines them equal (model weights, dtype and device type, parameters, probe
    set, seed, BOS policy, package versions) into run ``run_id``; the run that computed them, or None. A census
    that changes one detector's parameters recomputes that detector alone."""
    if "runs" not in store.report_types():
        return None
    versions = package_versions()
    candidates = store.runs(model=model.name, detector=name, seed=spec.seed, bos=spec.bos, params=params_json, probe_hash=probe_hash,
                            model_fingerprint=model.info.fingerprint, dtype=_model_dtype(model))
    for row in candidates.itertuples():
        recorded = json.loads(row.versions)
        if row.run_id == run_id or str(row.device).split(":")[0] != model.device.type:
            continue
        if any(recorded.get(package) != versions.get(package) for package in _IDENTITY_PACKAGES):
            continue
        types = [t for t in str(row.reports).split(",") if t]
        reports = [Report(t, store.read(t, run_id=row.run_id, detector=name).drop(columns=["run_id", "model", "detector"])) for t in types]
        manifest = {column: getattr(row, column) for column in candidates.columns if column not in ("run_id", "model", "detector")}
        manifest["reused_from"] = row.reused_from if isinstance(row.reused_from, str) and row.reused_from else row.run_id  # the run that computed them
        _write_detector(store, model, run_id, name, reports, manifest)
        return manifest["reused_from"]
    return None


def _write_detector(store: ReportStore, model, run_id: str, name: str, reports: list[Report], manifest: dict) -> None:
    """A detector's reports, then its manifest row, each under a name fixed by (run, detector): a
    census that dies between them and resumes rewrites the same files instead of adding rows."""
    for report in reports:
        report.run_id, report.model, report.detector = run_id, model.name, name
        store.write(report, part=name)
    store.write(Report("runs", pd.DataFrame([manifest]), run_id, model.name, name), part=name)


def _stored_reports(store: ReportStore, run_id: str, name: str) -> list[Report]:
    runs = store.runs(run_id=run_id, detector=name)
    types = [t for t in str(runs["reports"].iloc[0]).split(",") if t] if len(runs) else []
    return [Report(t, store.read(t, run_id=run_id, detector=name).drop(columns=["run_id", "model", "detector"]), run_id, str(runs["model"].iloc[0]), name)
            for t in types]


def _notebook_progress() -> ProgressCallback:
    from tqdm.auto import tqdm

    bar = tqdm(desc="census", unit="unit")

    def update(done: int, total: int, phase: str) -> None:
        bar.set_description(f"census: {phase}")
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return update
