"""The head census: run detectors over their probes on one model and store their reports.

Detectors advance in lockstep, one forward pass each per step; passes with the same tokens (and no
interventions) are merged into one forward pass serving every detector. Reports are written only
after every detector has finished, then the run manifest: an interrupted census leaves the store as
it was.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import platform
import secrets
import sys
import tempfile
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pandas as pd
import torch

import probes as detector_registry
from lens._capture.session import capture
from lens._models.model import BOS_POLICIES
from lens._probe_file import read_probe_file, probe_set_hash
from lens._store.store import Report, ReportStore
from probes._base import Detector, ForwardPass, ProbeError

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


def new_run_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


@dataclass
class CensusResult:
    """A finished run: its reports are in ``store``; in a notebook it shows its claims and overview."""

    run_id: str
    model: str
    store: ReportStore
    reports: dict[str, list[Report]] = field(default_factory=dict)
    summary: dict[str, list[str]] = field(default_factory=dict)
    n_forward_passes: int = 0

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


def _lockstep(streams: dict[str, Iterator[ForwardPass]]) -> Iterator[list[tuple[str, ForwardPass]]]:
    """Yield groups of passes that one forward pass can serve, advancing every detector one step."""
    while streams:
        step: list[tuple[str, ForwardPass]] = []
        for name in list(streams):
            try:
                step.append((name, next(streams[name])))
            except StopIteration:
                del streams[name]
        groups: dict[bytes, list[tuple[str, ForwardPass]]] = {}
        for name, forward in step:
            key = forward.tokens.numpy().tobytes() if not forward.interventions else id(forward).to_bytes(8, "little")
            groups.setdefault(key, []).append((name, forward))
        yield from groups.values()


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
    on_pass: Callable[[int, int], None] | None = None,
    progress: bool | None = None,
) -> CensusResult:
    """Run ``detectors`` (default: every registered one) on ``model`` and write their reports into
    ``store`` (default: a new temporary store; ``result.save(path)`` keeps the run).

    ``probes`` maps a detector name to its own probe dicts (Python API; it overrides ``probes_file``
    and the built-in probes for that detector, so detectors with different probe formats can share a
    census). ``progress`` draws a progress bar (default: in a notebook). ``params`` maps a detector name to ``{parameter: text value}``. ``on_pass(done, total)`` reports
    progress (total counts every detector's probes). ``bos`` is the BOS policy of every probe text
    (``Model.tokenize``): ``"auto"`` follows the tokenizer (Gemma 3 adds ``<bos>``, SmolLM2 nothing),
    ``"always"`` or ``"never"``; the run manifest records it. ``preset`` ("quick" or "full") picks each
    detector's preset parameters; ``params`` override them. Bad input raises before anything is run.
    """
    detectors = list(detector_registry.available()) if detectors is None else list(detectors)
    if store is None:  # a notebook run: keep it with ``result.save(store)``
        store = ReportStore(tempfile.mkdtemp(prefix="lens-store-"))
    store = store if isinstance(store, ReportStore) else ReportStore(store)
    if on_pass is None and (progress or (progress is None and "ipykernel" in sys.modules)):
        on_pass = _notebook_progress()
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
    torch.manual_seed(seed)
    instances = {
        name: cls(model, cls.parse_params({**cls.presets.get(preset, {}), **params.get(name, {})}), seed=seed, bos=bos)
        for name, cls in classes.items()
    }
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

    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    run_id = new_run_id()
    for detector in instances.values():
        detector.run_id, detector.store = run_id, store
    result = CensusResult(run_id, model.name, store)
    total = sum(len(p) for p in probe_sets.values())
    streams = {name: _passes(instances[name], probe_sets[name]) for name in instances}
    done_probes = 0
    for group in _lockstep(streams):
        forward = group[0][1]
        capture(model, forward.tokens, [need for _, f in group for need in f.needs], forward.interventions)
        result.n_forward_passes += 1
        for _, f in group:
            f.done()
        done_probes = sum(instances[name].probes_done for name in instances)
        if on_pass is not None:
            on_pass(done_probes, total)
    if on_pass is not None:
        on_pass(total, total)

    versions = json.dumps(package_versions(), sort_keys=True)
    finished = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    all_reports = {name: detector.finish() for name, detector in instances.items()}
    manifest_rows = []
    for name, reports in all_reports.items():
        for report in reports:
            report.run_id, report.model, report.detector = run_id, model.name, name
            store.write(report)
        detector = instances[name]
        manifest_rows.append(
            {
                "model_fingerprint": model.info.fingerprint,
                "params": detector.params.to_json(),
                "probe_hash": probe_set_hash(probe_sets[name]),
                "n_probes": len(probe_sets[name]),
                "seed": seed,
                "bos": bos,
                "bos_token": model.tokenizer.bos_token or "",
                "bos_added": len(model.tokenize("", bos=bos)) == 1,
                "versions": versions,
                "device": str(model.device),
                "started_at": started,
                "finished_at": finished,
                "reports": ",".join(sorted({r.type for r in reports})),
                "detector": name,
            }
        )
        result.reports[name] = reports
        result.summary[name] = detector.summary_lines(reports)
    for row in manifest_rows:
        frame = pd.DataFrame([{k: v for k, v in row.items() if k != "detector"}])
        store.write(Report("runs", frame, run_id, model.name, row["detector"]))
    return result


def _notebook_progress() -> Callable[[int, int], None]:
    from tqdm.auto import tqdm

    bar = tqdm(desc="census", unit="probe")

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return update


def _passes(detector: Detector, probes: list[dict]) -> Iterator[ForwardPass]:
    detector.probes_done = 0
    for index, probe in enumerate(probes):
        yield from detector.passes(probe, index)
        detector.probes_done += 1
