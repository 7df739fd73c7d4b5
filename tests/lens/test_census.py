"""The census as a batch job: sharded units give the same reports, an interrupted run resumes without
recomputing finished units, a killed process leaves a readable store, Ctrl-C stops after the unit,
and concurrent censuses into one store lose no row."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

import lens
import probes
from lens._units import unfinished_runs
from lens.views.claims import run_duration

ROOT = Path(__file__).resolve().parents[2]
@pytest.fixture(scope="module")
def uninterrupted(smollm2, small_census, tmp_path_factory):
    """One real census in one unit per detector: the reference every other run must equal."""
    store = lens.ReportStore(tmp_path_factory.mktemp("whole") / "store")
    result = lens.census(smollm2, store=store, shard_size=100, **small_census)
    return store, result


class Crash(RuntimeError):
    pass


def test_interrupted_census_resumes_without_recomputing(smollm2, small_census, same_reports, uninterrupted, tmp_path):
    reference_store, reference = uninterrupted
    store = lens.ReportStore(tmp_path / "store")
    seen = []

    def crash_after_four(done, total, phase):
        seen.append(phase)
        if done == 4:
            raise Crash("the process dies after its fourth unit")

    with pytest.raises(Crash):
        lens.census(smollm2, store=store, shard_size=1, on_progress=crash_after_four, **small_census)
    assert store.runs().empty  # nothing finished, nothing reported
    [unfinished] = unfinished_runs(store)
    assert unfinished["units_done"] == 4 and unfinished["run_id"] == reference.run_id  # the identity ignores sharding

    phases = []
    resumed = lens.census(smollm2, store=store, shard_size=1, on_progress=lambda d, t, p: phases.append(p), **small_census)
    assert resumed.run_id == reference.run_id
    assert resumed.resumed_units == 4
    # 9 probe shards + 1 stage + 3 reduces, of which 4 were kept.
    assert resumed.units_run == 9 + 1 + 3 - 4
    assert "retrieval masking" in phases and "sinks reduce" in phases
    assert unfinished_runs(store) == [] and not (store.path / "units" / resumed.run_id).exists()
    # Its cost adds up the units of both processes: each detector's kept and recomputed units are timed.
    manifest = store.runs(run_id=resumed.run_id)
    assert (manifest["compute_s"] > 0).all() and (manifest["cpu_s"] > 0).all()
    assert "computing" in run_duration(store.runs(), resumed.run_id)
    # Three shards of one probe each give the reports of one shard of three.
    same_reports(store, resumed.run_id, reference_store, reference.run_id)

    again = lens.census(smollm2, store=store, **small_census)
    assert again.units_run == 0 and again.run_id == resumed.run_id  # finished: nothing is recomputed
    fresh = lens.census(smollm2, ["sinks"], store, limit=1, fresh=True)
    other = lens.census(smollm2, ["sinks"], store, limit=1, fresh=True)
    assert fresh.run_id != other.run_id and fresh.units_run == other.units_run == 2


def test_batched_and_unbatched_censuses_write_equal_reports(smollm2, small_census, same_reports, uninterrupted, tmp_path):
    reference_store, reference = uninterrupted  # one shard of three probes per detector, batched
    store = lens.ReportStore(tmp_path / "store")
    unbatched = lens.census(smollm2, store=store, shard_size=100, batched=False, **small_census)
    assert unbatched.run_id == reference.run_id and unbatched.n_forward_passes > reference.n_forward_passes
    same_reports(store, unbatched.run_id, reference_store, reference.run_id)


def test_run_identity_follows_what_determines_results(smollm2, tmp_path):
    store = lens.ReportStore(tmp_path / "store")
    base = lens.census(smollm2, ["sinks"], store, limit=1).run_id
    assert lens.census(smollm2, ["sinks"], store, limit=1, seed=1).run_id != base
    assert lens.census(smollm2, ["sinks"], store, limit=1, params={"sinks": {"eps": "0.2"}}).run_id != base
    assert lens.census(smollm2, ["sinks"], store, limit=2).run_id != base
    with pytest.raises(probes.ProbeError, match="other settings"):
        lens.census(smollm2, ["sinks"], store, limit=2, resume=base)


def test_a_census_recomputes_only_the_detectors_whose_settings_changed(smollm2, tmp_path):
    store = lens.ReportStore(tmp_path / "store")
    first = lens.census(smollm2, ["sinks", "preplan_anchor"], store, limit=1, params={"preplan_anchor": {"max_new_tokens": "16"}})
    second = lens.census(smollm2, ["sinks", "preplan_anchor"], store, limit=1, params={"preplan_anchor": {"max_new_tokens": "12"}})
    assert second.run_id != first.run_id and second.reused == {"sinks": first.run_id}
    assert second.units_run == 2  # preplan_anchor's shard and reduce; sinks was copied
    for report_type in ("sinks", "summary"):
        copied, computed = (store.read(report_type, run_id=run, detector="sinks").drop(columns="run_id") for run in (second.run_id, first.run_id))
        pd.testing.assert_frame_equal(copied, computed)
    manifest = store.runs(run_id=second.run_id).set_index("detector")
    assert manifest.loc["sinks", "reused_from"] == first.run_id and pd.isna(manifest.loc["preplan_anchor", "reused_from"])
    assert manifest.loc["sinks", "dtype"] == "torch.float32"
    census_time = run_duration(store.runs(), first.run_id)
    assert run_duration(store.runs(), second.run_id).endswith(f"; sinks reused from run {first.run_id} ({census_time})")
    alone = lens.census(smollm2, ["sinks"], store, limit=1)  # a copy's source is the run that computed it
    assert alone.reused == {"sinks": first.run_id} and alone.units_run == 0
    assert run_duration(store.runs(), alone.run_id) == f"sinks reused from run {first.run_id} ({census_time})"
    assert lens.census(smollm2, ["sinks"], store, limit=1, seed=1).reused == {}  # another seed: computed
    fresh = lens.census(smollm2, ["sinks"], store, limit=1, fresh=True)
    assert fresh.reused == {} and fresh.units_run == 2


def _cli(store: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lens", "census", "--model", "tiny-llama", "--detectors", "sinks,preplan_anchor", "--limit", "4",
            "--shard-size", "1", "--param", "preplan_anchor.max_new_tokens=16", "--store", str(store), *extra]


def _all_files_readable(store: lens.ReportStore) -> int:
    files = [f for f in store.path.rglob("*") if f.is_file() and ".tmp" not in f.parts and f.name != ".lock"]
    for f in files:
        if f.suffix == ".parquet":
            pq.read_table(f)
        elif f.suffix == ".pt":
            torch.load(f, weights_only=False)
    for report_type in store.report_types():
        store.read(report_type)
    return len(files)


def test_every_detector_has_a_full_preset_that_changes_its_parameters():
    # A detector without one would run its quick parameters inside a "full" census, unnoticed.
    for name in probes.available():
        detector = probes.get(name)
        assert "full" in detector.presets, f"{name} has no full preset"
        assert detector.parse_params(detector.presets["full"]) != detector.parse_params({}), name


def test_sigkill_at_random_moments_loses_nothing(same_reports, tmp_path):
    """20 kills at random moments of the work; every file stays readable, and the census run again
    completes with the reports of an uninterrupted run, keeping every unit finished before."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    reference = lens.ReportStore(tmp_path / "reference")
    started = time.perf_counter()
    subprocess.run(_cli(reference.path), check=True, capture_output=True, env=env, cwd=ROOT)
    whole = time.perf_counter() - started

    store = lens.ReportStore(tmp_path / "killed")
    rng = random.Random(0)
    kept_before = 0
    for _ in range(20):
        process = subprocess.Popen(_cli(store.path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
        time.sleep(rng.uniform(0.3 * whole, whole))  # past start-up, anywhere in the units
        process.send_signal(signal.SIGKILL)
        process.wait()
        _all_files_readable(store)
        units = sum(1 for _ in (store.path / "units").rglob("*.pt")) if (store.path / "units").exists() else 0
        finished = len(store.runs()) if "runs" in store.report_types() else 0
        assert units >= kept_before or finished  # finished units are never lost (until the run finishes)
        kept_before = units
    final = subprocess.run(_cli(store.path), check=True, capture_output=True, text=True, env=env, cwd=ROOT)
    if kept_before:
        assert "resumed run" in final.stderr + final.stdout
    [run_id] = set(store.runs()["run_id"])
    [reference_id] = set(reference.runs()["run_id"])
    assert run_id == reference_id
    same_reports(store, run_id, reference, reference_id)
    assert len(store.runs()) == 2  # one manifest row per detector, never two


def test_ctrl_c_stops_after_the_unit_and_says_how_to_resume(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    store = tmp_path / "store"
    process = subprocess.Popen(_cli(store), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.monotonic() + 300
    while not list(store.glob("units/*/plan.json")) and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    assert "resume with: lens census" in stderr and "Traceback" not in stderr
    done = sum(1 for _ in store.rglob("*.pt"))
    assert done >= 1  # the unit in progress finished and was kept
    resumed = subprocess.run(_cli(store), capture_output=True, text=True, env=env, cwd=ROOT)
    assert resumed.returncode == 0 and f"{done} finished units kept" in resumed.stderr + resumed.stdout


def test_four_censuses_into_one_store_lose_no_row(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    store = lens.ReportStore(tmp_path / "store")
    processes = [
        subprocess.Popen([*_cli(store.path), "--seed", str(seed)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        for seed in range(4)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, stderr
    runs = store.runs()
    assert runs["run_id"].nunique() == 4 and len(runs) == 8
    sinks = store.read("sinks")
    per_run = sinks.groupby("run_id").size()
    assert len(per_run) == 4 and (per_run == per_run.iloc[0]).all()
    assert len(store.read("summary").groupby(["run_id", "detector"])) == 8


def test_seeds_are_pooled_claim_by_claim(smollm2, tmp_path):
    store = lens.ReportStore(tmp_path / "store")
    per_seed, pooled = lens.census_seeds(smollm2, ["sinks"], store, seeds=[0, 1], limit=2)
    assert len({r.run_id for r in per_seed}) == 2
    seeds = store.read("summary", run_id=[r.run_id for r in per_seed])
    combined = store.read("summary", run_id=pooled.run_id).set_index("claim")
    assert set(combined.index) == set(seeds["claim"])
    for claim, group in seeds.groupby("claim"):
        row = combined.loc[claim]
        assert row["estimate"] == pytest.approx(group["estimate"].mean())
        if group["ci_low"].notna().all():
            assert row["ci_low"] == group["ci_low"].min() and row["ci_high"] == group["ci_high"].max()
        assert "pooled over seeds 0,1" in row["method"]
    manifest = store.runs(run_id=pooled.run_id)
    assert list(manifest["seed"]) == [-1] and list(manifest["reports"]) == ["summary"]
    assert manifest["compute_s"].iloc[0] == pytest.approx(store.runs(run_id=[r.run_id for r in per_seed])["compute_s"].sum())  # what the seeds cost
