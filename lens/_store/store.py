"""The report store: a directory of Parquet datasets, one per report type.

Layout: ``<store>/<report_type>/model=<model>/run_id=<run_id>/part-<uuid>.parquet`` (Hive partitions,
so DuckDB and pyarrow read it as one dataset). The ``runs`` dataset holds one manifest row per
(run, detector), written last: a run whose manifest is missing did not finish.

Safety: each file is written under ``<store>/.tmp`` and renamed into place (atomic on one file
system), with a fresh name, so a crash never leaves a half-written file, nothing earlier is ever
overwritten, and concurrent writers cannot lose each other's rows.

Reads push filters down (partition directories, then one pyarrow dataset scan) and check each file's
schema from its footer. ``compact(run_id)`` merges a finished run's parts into one
``compact-<uuid>.parquet`` per (report type, model), which names the files it replaces, so a read
never sees a row twice or misses one while a compaction runs or after one was killed (docs/store.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow
import pyarrow.compute
import pyarrow.dataset
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
            Column("dtype", "string", "torch dtype of the model's weights (empty in runs made before it was recorded)", nullable=True),
            Column("reused_from", "string", "the run whose equal results were copied instead of recomputed (empty: computed in this run)", nullable=True),
            Column("compute_s", "float64", "wall seconds the detector's units took where they ran (probe shards, stages, reduce; model loading excluded), "
                   "summed over resumes and workers (empty: a unit was kept before costs were recorded)", nullable=True),
            Column("cpu_s", "float64", "CPU seconds of the same units, every thread of the processes that ran them", nullable=True),
        ),
    )
)


class StoreError(OSError):
    pass


# A compacted file is named compact-<uuid>.parquet; its footer lists the files of its directory it replaces.
COMPACT_PREFIX = "compact-"
REPLACES_KEY = b"lens.replaces"
# Listings and reads that race with a compaction start again; compactions run one at a time, so a few
# tries suffice unless they run back to back on the same partition.
_RETRIES = 8


def _readable_as(actual: pyarrow.DataType, declared: pyarrow.DataType) -> bool:
    """Whether a column stored as ``actual`` reads as ``declared``: the same type, a large string (what
    pandas writes) for a string, or integers where floats are declared (accepted on write too)."""
    if actual == declared:
        return True
    if pyarrow.types.is_string(declared):
        return pyarrow.types.is_large_string(actual) or pyarrow.types.is_string_view(actual)
    return pyarrow.types.is_floating(declared) and pyarrow.types.is_integer(actual)


def _check_columns(file: Path, found: pyarrow.Schema, declared: pyarrow.Schema, report_type: str) -> None:
    names = [name for name in found.names if name != "__index_level_0__"]  # pandas' index, not read
    # A nullable column added to a schema later reads as null from the files written before it.
    missing = [c.name for c in declared if c.name not in names and not c.nullable]
    extra = [c for c in names if c not in declared.names]
    if missing or extra:
        problems = [f"missing column {c!r}" for c in missing] + [f"unexpected column {c!r}" for c in extra]
        raise SchemaMismatchError(f"{file}: report {report_type!r}: {', '.join(problems)}")
    for field in declared:
        if field.name not in names:
            continue
        actual = found.field(field.name).type
        if not _readable_as(actual, field.type):
            raise SchemaMismatchError(f"{file}: report {report_type!r}: column {field.name!r}: type {actual}, declared {field.type}")
    # A file that did not come from ReportStore.write may hold nulls where none are allowed: read those columns.
    may_hold_nulls = [field.name for field in declared if not field.nullable and field.name in names and found.field(field.name).nullable]
    if may_hold_nulls:
        table = pq.read_table(file, columns=may_hold_nulls)
        for name in may_hold_nulls:
            if table.column(name).null_count:
                raise SchemaMismatchError(f"{file}: report {report_type!r}: column {name!r}: {table.column(name).null_count} null value(s) in a column declared non-nullable")


def _dataset(files: list[Path], schema: pyarrow.Schema) -> pyarrow.dataset.Dataset:
    # Unit files are small and local: reading ahead (pre_buffer) costs more than it saves (benchmarks/store_scale.py).
    parquet = pyarrow.dataset.ParquetFileFormat(default_fragment_scan_options=pyarrow.dataset.ParquetFragmentScanOptions(pre_buffer=False))
    return pyarrow.dataset.dataset([str(f) for f in files], schema=schema, format=parquet)


def _live(listed: list[Path]) -> list[Path]:
    """The listed files but those a listed compacted file replaces."""
    replaced: set[Path] = set()
    for compacted in (f for f in listed if f.name.startswith(COMPACT_PREFIX)):
        metadata = pq.read_schema(compacted).metadata or {}
        replaced |= {compacted.parent / name for name in json.loads(metadata.get(REPLACES_KEY, b"[]"))}
    return [f for f in listed if f not in replaced]


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
        """Fail early, with one line, when the store cannot be written. Creates nothing, so input found
        bad after this check leaves no trace (the first write creates the store)."""
        existing = self.path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise StoreError(f"store {self.path} is not writable: {existing} is not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StoreError(f"store {self.path} is not writable: permission denied on {existing}")

    def write(self, report: Report, *, part: str | None = None) -> Path:
        """Validate ``report`` against its schema and write it as one new Parquet file, atomically.

        ``part`` names the file (``part-<part>.parquet``) so that writing it again replaces it instead
        of adding rows (the census writes each detector's reports this way, so a resumed run is
        idempotent); by default every write is a new file."""
        if not (report.run_id and report.model and report.detector):
            raise ValueError("a report needs run_id, model and detector before it is stored")
        schema = schema_for(report.type)
        frame = report.frame.assign(run_id=report.run_id, model=report.model, detector=report.detector)
        frame = schema.conform(frame, where=f"report {report.type!r} from {report.detector!r}")
        table = pyarrow.Table.from_pandas(frame, schema=schema.arrow_schema(), preserve_index=False)
        final_dir = self.path / report.type / f"model={_partition_value(report.model)}" / f"run_id={_partition_value(report.run_id)}"
        name = f"part-{_partition_value(part) if part else uuid.uuid4().hex}.parquet"
        self.check_writable()
        return self._place(final_dir / name, lambda tmp: pq.write_table(table, tmp))

    def write_artifact(self, relative: str, data: bytes) -> Path:
        """Write a detector's file (e.g. trained directions) to ``<store>/<relative>``, atomically."""
        self.check_writable()
        return self._place(self.path / relative, lambda tmp: tmp.write_bytes(data))

    def _place(self, final: Path, fill: Callable[[Path], object]) -> Path:
        """Write a file at ``final`` atomically: ``fill`` writes it under ``<store>/.tmp`` (which no read
        looks in), it is flushed to disk, then renamed into place. Whatever stops ``fill`` or the rename
        (an error, Ctrl-C) removes the temporary file, and ``final`` is never half-written; a process
        killed outright leaves at most a file in ``.tmp``."""
        tmp = self.path / ".tmp" / f"{uuid.uuid4().hex}-{final.name}"
        try:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            fill(tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        except BaseException as error:
            tmp.unlink(missing_ok=True)
            if isinstance(error, OSError):
                raise StoreError(f"cannot write to store {self.path}: {error.strerror or error}") from None
            raise
        return final

    def copy_run(self, run_id: str, target: ReportStore) -> int:
        """Copy every file of run ``run_id`` (reports and artifacts) into ``target``, each atomically,
        the run manifest last, so the copy is a finished run only once it is complete. Returns the
        number of files copied."""
        if self.path.resolve() == target.path.resolve():
            return 0
        target.check_writable()
        files = [f for t in self.report_types() if t != "runs" for f in self.files(t, run_id=run_id)]
        files += [f for f in (self.path / "artifacts").rglob(f"{run_id}.*") if f.is_file()] if (self.path / "artifacts").exists() else []
        files += self.files("runs", run_id=run_id)
        for source in files:
            target._place(target.path / source.relative_to(self.path), lambda tmp, source=source: shutil.copyfile(source, tmp))
        return len(files)

    def compact(self, run_id: str) -> int:
        """Merge each (report type, model) partition of the finished run ``run_id`` into one file;
        returns the number of files merged (0: already compact).

        Per partition: the merged file ``compact-<uuid>.parquet`` is written atomically beside the parts,
        its footer naming every file it replaces; then the parts are removed. A read lists the files and
        drops those a compacted file replaces, and lists again (or reads again, should a file vanish
        under it) when a compaction moved meanwhile, so at every moment, a compaction killed at any
        point included, a read returns each row exactly once; compacting again finishes the removal.
        Parts written after the merge began are not replaced and stay. Compactions of a store run one
        at a time (a lock file in ``<store>/.tmp``)."""
        if self.read("runs", columns=["run_id"], run_id=run_id).empty:
            raise StoreError(f"store {self.path} has no finished run {run_id!r} (see `lens runs`)")
        self.check_writable()
        merged = 0
        with self._lock("compact"):
            for report_type in self.report_types():
                for folder in sorted((self.path / report_type).glob(f"model=*/run_id={_partition_value(run_id)}")):
                    merged += self._compact_partition(folder, schema_for(report_type))
        return merged

    def _compact_partition(self, folder: Path, schema: ReportSchema) -> int:
        # One listing gives both what is merged and what is replaced, so a part a writer adds meanwhile
        # is in neither; no other compaction changes the folder while the lock is held.
        listed = sorted(folder.glob("*.parquet"))
        live = _live(listed)
        if len(live) <= 1:  # nothing to merge; remove what a killed compaction left replaced
            for file in set(listed) - set(live):
                os.unlink(file)
            return 0
        self._check_files(live, schema)
        table = _dataset(live, schema.arrow_schema()).to_table()
        # Replaced: every file listed, so leftovers of a killed compaction go too.
        table = table.replace_schema_metadata({REPLACES_KEY: json.dumps(sorted(f.name for f in listed)).encode()})
        self._place(folder / f"{COMPACT_PREFIX}{uuid.uuid4().hex}.parquet", lambda tmp: pq.write_table(table, tmp))
        for file in listed:
            os.unlink(file)
        return len(live)

    @contextlib.contextmanager
    def _lock(self, name: str):
        """An exclusive lock (flock: released when the process ends, however it ends)."""
        (self.path / ".tmp").mkdir(exist_ok=True)
        with open(self.path / ".tmp" / f"{name}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _listing(self, report_type: str, model: str | None, run_id: str | None) -> list[Path]:
        # Equality filters on the partition columns choose directories, so other runs' files are never opened.
        model_glob = f"model={_partition_value(model)}" if model else "model=*"
        run_glob = f"run_id={_partition_value(run_id)}" if run_id else "run_id=*"
        return sorted((self.path / report_type).glob(f"{model_glob}/{run_glob}/*.parquet"))

    def files(self, report_type: str, model: str | None = None, run_id: str | None = None) -> list[Path]:
        """The live Parquet files of ``report_type``: every listed file but those a compacted file
        replaces (which a compaction removes right after writing it)."""
        return self._snapshot(report_type, model, run_id)

    def _snapshot(self, report_type: str, model: str | None, run_id: str | None) -> list[Path]:
        """The live files, listed until two listings agree.

        A compaction adds its merged file before it removes the parts, so a listing that races with it
        may miss both (a directory scan need not return entries added or removed during it); the second
        listing then shows a compacted file the first lacked, or lacks a live file of the first."""
        for _ in range(_RETRIES):
            listed = self._listing(report_type, model, run_id)
            try:
                live = _live(listed)
            except FileNotFoundError:
                continue  # a later compaction replaced a compacted file: list again
            compacted = frozenset(f for f in listed if f.name.startswith(COMPACT_PREFIX))
            again = set(self._listing(report_type, model, run_id))
            if {f for f in again if f.name.startswith(COMPACT_PREFIX)} == compacted and again.issuperset(live):
                return live
        raise StoreError(f"store {self.path}: {report_type} kept changing under a compaction; try again")

    def read(self, report_type: str, columns: list[str] | None = None, **filters) -> pd.DataFrame:
        """Rows of ``report_type``; each filter is ``column=value`` or ``column=[values]``; ``columns``
        selects columns (default all).

        Filters are pushed down: ``model`` and ``run_id`` values choose partition directories, and every
        filter goes to the Parquet scan (row groups whose statistics exclude it are skipped). Every file's
        schema is checked from its footer first; a mismatch names the file and the column.
        """
        schema = schema_for(report_type)
        unknown = [key for key in [*filters, *(columns or [])] if key not in schema.column_names]
        if unknown:
            raise SchemaMismatchError(f"report {report_type!r} has no column(s) {unknown}")
        one = {key: value for key, value in filters.items() if isinstance(value, str)}
        arrow_schema = schema.arrow_schema()
        condition = None
        for key, value in filters.items():
            wanted = list(value) if isinstance(value, (list, tuple, set)) else [value]
            column_type = arrow_schema.field(key).type
            try:
                term = pyarrow.compute.field(key).isin(pyarrow.array(wanted, type=column_type))
            except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError, TypeError):
                raise SchemaMismatchError(f"report {report_type!r}: filter {key}={value!r} does not fit the column's type {column_type}") from None
            condition = term if condition is None else condition & term
        for _ in range(_RETRIES):
            files = self._snapshot(report_type, one.get("model"), one.get("run_id"))
            try:
                self._check_files(files, schema)
                dataset = _dataset(files, arrow_schema)
                table = dataset.to_table(columns=columns, filter=condition)
            except FileNotFoundError:
                continue  # a compaction replaced a file after the listing: its rows are in the merged file
            except (OSError, pyarrow.ArrowInvalid) as error:
                raise StoreError(f"{report_type}: unreadable Parquet file: {error}") from None
            return table.to_pandas() if table.num_rows or columns else schema.empty_frame()
        raise StoreError(f"store {self.path}: {report_type} kept changing under a compaction; try again")

    @staticmethod
    def _check_files(files: list[Path], schema: ReportSchema) -> None:
        """Each file's column names and types against ``schema``, from its Parquet footer only."""
        declared = schema.arrow_schema()
        for file in files:
            try:
                found = pq.read_schema(file)
            except FileNotFoundError:
                raise
            except (OSError, pyarrow.ArrowInvalid) as error:
                raise StoreError(f"{file}: unreadable Parquet file: {error}") from None
            if not found.equals(declared):  # what ReportStore.write writes; anything else is looked at closely
                _check_columns(file, found, declared, schema.name)

    def runs(self, **filters) -> pd.DataFrame:
        """Finished runs: one manifest row per (run, detector), newest first."""
        return self.read("runs", **filters).sort_values("started_at", ascending=False, ignore_index=True)

    def report_types(self) -> list[str]:
        if not self.path.exists():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.is_dir() and not p.name.startswith(".") and any(p.rglob("*.parquet")))

    def latest_run(self, model: str | None = None) -> str | None:
        # Two columns of the manifests, not whole rows: the newest start names the run.
        runs = self.read("runs", columns=["run_id", "started_at"], **({"model": model} if model else {}))
        return None if runs.empty else str(runs["run_id"].iloc[runs["started_at"].argmax()])

    def sql_glob(self, report_type: str) -> str:
        """The ``read_parquet`` pattern DuckDB reads this report type with."""
        return str(self.path / report_type / "**" / "*.parquet")
