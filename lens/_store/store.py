"""The report store: a directory of Parquet datasets, one per report type.

Layout: ``<store>/<report_type>/model=<model>/run_id=<run_id>/part-<uuid>.parquet`` (Hive partitions,
so DuckDB and pyarrow read it as one dataset). The ``runs`` dataset holds one manifest row per
(run, detector), written last: a run whose manifest is missing did not finish.

Safety: each file is written under ``<store>/.tmp`` and renamed into place (atomic on one file
system), with a fresh name, so a crash never leaves a half-written file, nothing earlier is ever
overwritten, and concurrent writers cannot lose each other's rows.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow
import pyarrow.parquet as pq

from lens._store.schema import Column, ReportSchema, SchemaMismatchError, register_schema, schema_for

RUNS = register_schema(
    ReportSchema(
        "runs",
        "Run manifest: one row per (run, detector), written after all of the run's reports.",
        (
            Column("model_fingerprint", "string", "sha256 (16 hex) of the model weights"),
            Column("params", "string", "detector parameters, JSON"),
            Column("probe_hash", "string", "sha256 (16 hex) of the detector's probe set as run"),
            Column("n_probes", "int64", "number of probes the detector ran on"),
            Column("seed", "int64", "the run's seed"),
            Column("bos", "string", "BOS policy of the probe texts: auto (the tokenizer's own), always or never"),
            Column("bos_token", "string", "the tokenizer's BOS token (empty: it has none)"),
            Column("bos_added", "bool", "the policy put bos_token before every probe text (auto resolved for this tokenizer; a text already starting with it keeps one)"),
            Column("versions", "string", "package versions, JSON"),
            Column("device", "string", "torch device the run used"),
            Column("started_at", "string", "UTC start time, ISO 8601"),
            Column("finished_at", "string", "UTC end time, ISO 8601"),
            Column("reports", "string", "report types the detector wrote, comma separated"),
        ),
    )
)


class StoreError(OSError):
    pass


@dataclass
class Report:
    """One detector's rows of one report type, for one run and model."""

    type: str
    frame: pd.DataFrame
    run_id: str = ""
    model: str = ""
    detector: str = ""
    meta: dict = field(default_factory=dict)

    def _repr_html_(self) -> str:
        return f"<b>{self.type}</b> ({len(self.frame)} rows, {self.model}, run {self.run_id})" + self.frame.head(10)._repr_html_()


def _partition_value(value: str) -> str:
    # Partition directories must not contain path separators or '='.
    return str(value).replace("/", "_").replace("=", "_")


class ReportStore:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"ReportStore({str(self.path)!r})"

    def _repr_html_(self) -> str:
        """Notebook summary: the finished runs (newest first) and each report type's row count."""
        runs = self.runs()
        per_run = (
            runs.groupby("run_id", sort=False)
            .agg(model=("model", "first"), detectors=("detector", ", ".join), probes=("n_probes", "sum"), started_at=("started_at", "min"))
            .reset_index()
        )
        rows = {t: sum(pq.ParquetFile(f).metadata.num_rows for f in self.files(t)) for t in self.report_types() if t != "runs"}
        types = pd.DataFrame({"report": list(rows), "rows": list(rows.values())})
        return (
            f"<b>ReportStore</b> <code>{self.path}</code>: {len(per_run)} finished runs"
            + (per_run.head(20)._repr_html_() if len(per_run) else "")
            + (types._repr_html_() if len(types) else "<p>no reports</p>")
        )

    def check_writable(self) -> None:
        """Fail early, with one line, when the store cannot be written."""
        try:
            tmp = self.path / ".tmp"
            tmp.mkdir(parents=True, exist_ok=True)
            probe = tmp / f"probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise StoreError(f"store {self.path} is not writable: {error.strerror or error}") from None

    def write(self, report: Report) -> Path:
        """Validate ``report`` against its schema and write it as one new Parquet file, atomically."""
        if not (report.run_id and report.model and report.detector):
            raise ValueError("a report needs run_id, model and detector before it is stored")
        schema = schema_for(report.type)
        frame = report.frame.assign(run_id=report.run_id, model=report.model, detector=report.detector)
        frame = schema.conform(frame, where=f"report {report.type!r} from {report.detector!r}")
        table = pyarrow.Table.from_pandas(frame, schema=schema.arrow_schema(), preserve_index=False)
        final_dir = self.path / report.type / f"model={_partition_value(report.model)}" / f"run_id={_partition_value(report.run_id)}"
        name = f"part-{uuid.uuid4().hex}.parquet"
        self.check_writable()
        tmp = self.path / ".tmp" / name
        try:
            pq.write_table(table, tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            final_dir.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final_dir / name)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot write to store {self.path}: {error.strerror or error}") from None
        return final_dir / name

    def write_artifact(self, relative: str, data: bytes) -> Path:
        """Write a detector's file (e.g. trained directions) to ``<store>/<relative>``, atomically."""
        self.check_writable()
        final = self.path / relative
        tmp = self.path / ".tmp" / f"artifact-{uuid.uuid4().hex}"
        try:
            tmp.write_bytes(data)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot write to store {self.path}: {error.strerror or error}") from None
        return final

    def copy_run(self, run_id: str, target: ReportStore) -> int:
        """Copy every file of run ``run_id`` (reports and artifacts) into ``target``, each atomically,
        the run manifest last, so the copy is a finished run only once it is complete. Returns the
        number of files copied."""
        if self.path.resolve() == target.path.resolve():
            return 0
        target.check_writable()
        run_dir = f"run_id={_partition_value(run_id)}"
        files = [f for t in self.report_types() if t != "runs" for f in (self.path / t).glob(f"model=*/{run_dir}/*.parquet")]
        files += [f for f in (self.path / "artifacts").rglob(f"{run_id}.*") if f.is_file()] if (self.path / "artifacts").exists() else []
        files += sorted((self.path / "runs").glob(f"model=*/{run_dir}/*.parquet"))
        for source in files:
            relative = source.relative_to(self.path)
            tmp = target.path / ".tmp" / f"copy-{uuid.uuid4().hex}"
            try:
                shutil.copyfile(source, tmp)
                with open(tmp, "rb") as handle:
                    os.fsync(handle.fileno())
                (target.path / relative).parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, target.path / relative)
            except OSError as error:
                tmp.unlink(missing_ok=True)
                raise StoreError(f"cannot write to store {target.path}: {error.strerror or error}") from None
        return len(files)

    def files(self, report_type: str, model: str | None = None, run_id: str | None = None) -> list[Path]:
        root = self.path / report_type
        model_glob = f"model={_partition_value(model)}" if model else "model=*"
        run_glob = f"run_id={_partition_value(run_id)}" if run_id else "run_id=*"
        return sorted(root.glob(f"{model_glob}/{run_glob}/*.parquet"))

    def read(self, report_type: str, **filters) -> pd.DataFrame:
        """All rows of ``report_type``; each filter is ``column=value`` or ``column=[values]``.

        Every file is checked against the schema; a mismatch names the file and the column.
        """
        schema = schema_for(report_type)
        unknown = [key for key in filters if key not in schema.column_names]
        if unknown:
            raise SchemaMismatchError(f"report {report_type!r} has no column(s) {unknown}")
        one = {key: value for key, value in filters.items() if isinstance(value, str)}
        frames = []
        for file in self.files(report_type, one.get("model"), one.get("run_id")):
            try:
                frame = pq.read_table(file).to_pandas()
            except (OSError, pyarrow.ArrowInvalid) as error:
                raise StoreError(f"{file}: unreadable Parquet file: {error}") from None
            frames.append(schema.conform(frame, where=str(file)))
        if not frames:
            return schema.empty_frame()
        result = pd.concat(frames, ignore_index=True)
        for key, value in filters.items():
            wanted = value if isinstance(value, (list, tuple, set)) else [value]
            result = result[result[key].isin(list(wanted))]
        return result.reset_index(drop=True)

    def runs(self, **filters) -> pd.DataFrame:
        """Finished runs: one manifest row per (run, detector), newest first."""
        return self.read("runs", **filters).sort_values("started_at", ascending=False, ignore_index=True)

    def report_types(self) -> list[str]:
        if not self.path.exists():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.is_dir() and not p.name.startswith(".") and any(p.rglob("*.parquet")))

    def latest_run(self, model: str | None = None) -> str | None:
        runs = self.runs(**({"model": model} if model else {}))
        return None if runs.empty else str(runs["run_id"].iloc[0])

    def sql_glob(self, report_type: str) -> str:
        """The ``read_parquet`` pattern DuckDB reads this report type with."""
        return str(self.path / report_type / "**" / "*.parquet")
