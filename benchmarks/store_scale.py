"""Reading a large store: "the latest run's sinks report" from a store of ~10,000 unit files.

Usage: ``python benchmarks/store_scale.py [--runs 52] [--units 10] [--rows 8] [--store DIR]``.
Builds (once per DIR) a store of ``runs`` runs over two models; in each run every detector writes each
of its report types as ``units`` files of ``rows`` rows (as a census of work units does) and its
manifest row. Files are written straight with pyarrow in the store's layout (ReportStore.write would
take minutes for 10,000 files and is not what is measured). Then times, each on a fresh ReportStore:
the store's read path (``store.read("sinks", run_id=store.latest_run())``: directories chosen by the
partition filters, footers checked, one pyarrow dataset scan), the same after ``lens store compact``
of that run, and the read path it replaced (every manifest file read and validated in pandas to find
the latest run, then every file of the report read and validated, then filtered). Prints seconds and
the ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
import pyarrow
import pyarrow.parquet as pq

import lens
import probes
from lens import ReportStore

MODELS = ("smollm2-135m", "gemma3-270m")
VALUE = {"string": "x", "int64": 1, "float64": 0.5, "bool": True}


def _table(report_type: str, rows: int, run_id: str, model: str, detector: str, started_at: str) -> pyarrow.Table:
    schema = lens.schema_for(report_type)
    columns = {c.name: [VALUE[c.dtype]] * rows for c in schema.all_columns}
    columns |= {"run_id": [run_id] * rows, "model": [model] * rows, "detector": [detector] * rows}
    if report_type == "runs":
        columns["started_at"] = [started_at] * rows
    return pyarrow.table(columns, schema=schema.arrow_schema())


def build(path: Path, runs: int, units: int, rows: int) -> int:
    """Write the store; returns its number of Parquet files."""
    for index in range(runs):
        run_id, model = f"run{index:04d}", MODELS[index % len(MODELS)]
        started_at = f"2026-01-01T00:{index // 60:02d}:{index % 60:02d}Z"
        for name in probes.available():
            for report in probes.get(name).reports:
                for _ in range(units):
                    _write(path, _table(report.name, rows, run_id, model, name, started_at), report.name, model, run_id)
            _write(path, _table("runs", 1, run_id, model, name, started_at), "runs", model, run_id)
    return sum(1 for _ in path.rglob("*.parquet"))


def _write(path: Path, table: pyarrow.Table, report_type: str, model: str, run_id: str) -> None:
    folder = path / report_type / f"model={model}" / f"run_id={run_id}"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / f"part-{uuid.uuid4().hex}.parquet")


def previous_read(store: ReportStore, report_type: str, **filters) -> pd.DataFrame:
    """The read path before pushdown: every file of the chosen partitions read and validated by pandera
    one by one, concatenated, then filtered in pandas."""
    schema = lens.schema_for(report_type)
    model, run_id = filters.get("model"), filters.get("run_id")
    pattern = f"{'model=' + model if model else 'model=*'}/{'run_id=' + run_id if run_id else 'run_id=*'}/*.parquet"
    frames = [schema.conform(pq.read_table(f).to_pandas(), where=str(f)) for f in sorted((store.path / report_type).glob(pattern))]
    result = pd.concat(frames, ignore_index=True)
    for key, value in filters.items():
        result = result[result[key] == value]
    return result.reset_index(drop=True)


def previous_latest_sinks(path: Path) -> pd.DataFrame:
    store = ReportStore(path)
    runs = previous_read(store, "runs").sort_values("started_at", ascending=False, ignore_index=True)
    return previous_read(store, "sinks", run_id=str(runs["run_id"].iloc[0]))


def latest_sinks(path: Path) -> pd.DataFrame:
    store = ReportStore(path)
    return store.read("sinks", run_id=store.latest_run())


def _seconds(function, path: Path) -> tuple[float, pd.DataFrame]:
    started = time.perf_counter()
    result = function(path)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=52)
    parser.add_argument("--units", type=int, default=10, help="files per (run, report type)")
    parser.add_argument("--rows", type=int, default=8, help="rows per file")
    parser.add_argument("--store", default=None, help="store directory (built if empty; default: a temporary one)")
    args = parser.parse_args()
    path = Path(args.store or tempfile.mkdtemp(prefix="lens-store-scale-"))
    started = time.perf_counter()
    n_files = sum(1 for _ in path.rglob("*.parquet")) if path.exists() and any(path.iterdir()) else build(path, args.runs, args.units, args.rows)
    print(f"store {path}: {n_files} Parquet files (built or listed in {time.perf_counter() - started:.1f} s)")

    latest_sinks(path)  # warm the OS file cache for both paths alike
    new, frame = _seconds(latest_sinks, path)
    old, previous = _seconds(previous_latest_sinks, path)
    assert frame.equals(previous), "both paths must return the same rows"
    print(f"latest run's sinks report ({len(frame)} rows): {new:.3f} s; previous read path {old:.3f} s; ratio {old / new:.1f}x")

    store = ReportStore(path)
    run_id = store.latest_run()
    merged = store.compact(run_id)
    compacted, after = _seconds(latest_sinks, path)
    assert after.sort_values(list(after.columns)).reset_index(drop=True).equals(frame.sort_values(list(frame.columns)).reset_index(drop=True))
    print(f"after `lens store compact --run {run_id}` ({merged} files merged): {compacted:.3f} s")


if __name__ == "__main__":
    main()
