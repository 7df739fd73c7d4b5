"""Report store: typed, atomic, concurrent-safe, readable by DuckDB."""

from __future__ import annotations

import multiprocessing
import os

import duckdb
import pandas as pd
import pytest

import lens
from lens._store.schema import SchemaMismatchError


def _sinks_frame(n: int = 3, score: float = 0.5) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "layer": list(range(n)),
            "head": [0] * n,
            "sink_score": [score] * n,
            "ci_low": [score - 0.1] * n,
            "ci_high": [score + 0.1] * n,
            "sink_rate": [100.0] * n,
            "is_sink": [True] * n,
            "eps": 0.3,
            "sink_mass_first4": [0.9] * n,
            "first_token": "The",
            "n_prompts": 2,
            "n_tokens": 0,
        }
    )


def _report(run_id="r1", model="m", frame=None):
    return lens.Report("sinks", _sinks_frame() if frame is None else frame, run_id=run_id, model=model, detector="sinks")


def test_write_then_read_round_trip(store):
    path = store.write(_report())
    assert path.parent.name == "run_id=r1" and path.parent.parent.name == "model=m"
    frame = store.read("sinks")
    assert list(frame.columns[:3]) == ["run_id", "model", "detector"]
    assert frame["sink_score"].tolist() == [0.5, 0.5, 0.5]
    assert not any((store.path / ".tmp").iterdir()), "no temporary file may remain"


def test_filters_select_runs_and_models(store):
    store.write(_report("r1", "a"))
    store.write(_report("r2", "a"))
    store.write(_report("r3", "b"))
    assert set(store.read("sinks", model="a")["run_id"]) == {"r1", "r2"}
    assert set(store.read("sinks", run_id=["r1", "r3"])["model"]) == {"a", "b"}
    assert len(store.read("sinks", layer=1)) == 3


def test_wrong_type_is_refused_with_column_name(store):
    bad = _sinks_frame().assign(layer=[0.5, 1.5, 2.5])
    with pytest.raises(SchemaMismatchError, match="'layer'"):
        store.write(_report(frame=bad))
    with pytest.raises(SchemaMismatchError, match="missing column 'is_sink'"):
        store.write(_report(frame=_sinks_frame().drop(columns="is_sink")))
    assert store.read("sinks").empty, "a refused report writes nothing"


def test_mismatched_file_on_read_names_file_and_column(store):
    path = store.write(_report())
    frame = pd.read_parquet(path).assign(sink_score="high")
    frame.to_parquet(path)
    with pytest.raises(SchemaMismatchError, match=f"{path}.*'sink_score'"):
        store.read("sinks")


def test_file_with_nulls_in_a_non_nullable_column_names_file_and_column(store):
    path = store.write(_report())
    pd.read_parquet(path).assign(first_token=["The", None, "The"]).to_parquet(path)  # as another tool might write it
    with pytest.raises(SchemaMismatchError, match=f"{path}.*'first_token': 1 null value"):
        store.read("sinks")


def test_a_file_written_before_a_nullable_column_was_added_reads_it_as_null(store):
    manifest = {"model_fingerprint": "f", "params": "{}", "probe_hash": "h", "n_probes": 1, "seed": 0, "bos": "auto", "bos_token": "",
                "bos_added": False, "versions": "{}", "device": "cpu", "started_at": "t0", "finished_at": "t1", "reports": "sinks",
                "dtype": "torch.float32", "reused_from": None, "compute_s": 1.5, "cpu_s": 2.5}
    path = store.write(lens.Report("runs", pd.DataFrame([manifest]), run_id="r1", model="m", detector="sinks"))
    pd.read_parquet(path).drop(columns=["dtype", "reused_from", "compute_s", "cpu_s"]).to_parquet(path)  # as the store wrote it before
    row = store.runs().iloc[0]
    assert row["device"] == "cpu" and pd.isna(row["dtype"]) and pd.isna(row["reused_from"]) and pd.isna(row["compute_s"])
    pd.read_parquet(path).drop(columns=["device"]).to_parquet(path)  # a column that may not be null stays required
    with pytest.raises(SchemaMismatchError, match=f"{path}.*missing column 'device'"):
        store.runs()


def test_unwritable_store_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(lens.StoreError, match="not writable"):
        lens.ReportStore(blocker / "store").check_writable()


def _writer(path: str, worker: int) -> None:
    store = lens.ReportStore(path)
    for i in range(25):  # half into a run every worker shares, half into the worker's own runs
        store.write(_report(run_id="shared" if i % 2 else f"w{worker}-{i}", model="m", frame=_sinks_frame(n=1 + i % 3)))


def test_four_concurrent_writers_lose_nothing(tmp_path):
    path = str(tmp_path / "store")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer, args=(path, w)) for w in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
        assert worker.exitcode == 0
    frame = lens.ReportStore(path).read("sinks")
    expected_rows = 4 * sum(1 + i % 3 for i in range(25))
    assert len(frame) == expected_rows and (frame["run_id"] == "shared").sum() == 4 * sum(1 + i % 3 for i in range(1, 25, 2))
    assert len(lens.ReportStore(path).files("sinks")) == 100


def test_duckdb_reads_the_store_with_hive_partitioning(store):
    store.write(_report("r1", "a"))
    store.write(_report("r2", "b"))
    query = f"SELECT model, run_id, count(*) AS n, avg(sink_score) AS s FROM read_parquet('{store.sql_glob('sinks')}', hive_partitioning=true) GROUP BY ALL ORDER BY model"
    result = duckdb.sql(query).df()
    assert result["model"].tolist() == ["a", "b"] and result["n"].tolist() == [3, 3]


def test_write_failing_midway_leaves_nothing_read_returns(store, monkeypatch):
    store.write(_report("r1"))

    def half_then_fail(table, where, **kwargs):
        with open(where, "wb") as handle:  # a truncated Parquet file, as a crash mid-write leaves
            handle.write(b"PAR1" + b"\0" * 100)
        raise RuntimeError("writer died")

    monkeypatch.setattr(lens._store.store.pq, "write_table", half_then_fail)
    with pytest.raises(RuntimeError, match="writer died"):
        store.write(_report("r2"))
    monkeypatch.undo()
    assert store.read("sinks")["run_id"].tolist() == ["r1"] * 3
    assert not any((store.path / ".tmp").glob("*.parquet")), "the failed write cleans up its temporary file"


def test_leftover_temporary_file_is_ignored(store):
    """A process killed mid-write leaves at most a file in .tmp; reads never look there."""
    store.write(_report("r1"))
    (store.path / ".tmp" / "0123-part-0123.parquet").write_bytes(b"PAR1 truncated")
    assert len(store.read("sinks")) == 3 and store.latest_run() is None  # no manifest: no finished run


def test_interrupted_write_leaves_no_file(store, monkeypatch):
    def explode(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", explode)
    with pytest.raises(lens.StoreError, match="No space left"):
        store.write(_report())
    monkeypatch.undo()
    assert list(store.path.rglob("*.parquet")) == []


def test_filters_are_pushed_down_and_results_match_pandas_filtering(store):
    for run, model in [("r1", "a"), ("r2", "a"), ("r3", "b")]:
        store.write(_report(run, model, frame=_sinks_frame().assign(layer=[0, 1, 2], head=[int(run[1])] * 3)))
    everything = store.read("sinks")
    chosen = store.read("sinks", model="a", layer=[1, 2], head=2)
    expected = everything[(everything["model"] == "a") & everything["layer"].isin([1, 2]) & (everything["head"] == 2)]
    assert chosen.equals(expected.reset_index(drop=True)) and len(chosen) == 2
    assert list(store.read("sinks", columns=["run_id", "layer"], run_id="r3").columns) == ["run_id", "layer"]
    empty = store.read("sinks", run_id="nope")
    assert empty.empty and list(empty.columns) == list(everything.columns) and (empty.dtypes == everything.dtypes).all()
    with pytest.raises(SchemaMismatchError, match="no column"):
        store.read("sinks", colour="red")
    with pytest.raises(SchemaMismatchError, match="filter layer='one' does not fit the column's type int64"):
        store.read("sinks", layer="one")


def _manifest(run_id: str, model: str = "m", started_at: str = "2026-01-01T00:00:00Z") -> lens.Report:
    from lens._store.store import RUNS

    values = {"string": "x", "int64": 1, "bool": True, "float64": 1.0}
    frame = pd.DataFrame({c.name: [values[c.dtype]] for c in RUNS.columns}).assign(started_at=started_at)
    return lens.Report("runs", frame, run_id=run_id, model=model, detector="sinks")


def test_latest_run_is_the_newest_start(store):
    for run, started in [("old", "2026-01-01T00:00:00Z"), ("new", "2026-03-01T00:00:00Z"), ("mid", "2026-02-01T00:00:00Z")]:
        store.write(_manifest(run, started_at=started))
    store.write(_manifest("other-model", model="b", started_at="2026-04-01T00:00:00Z"))
    assert store.latest_run() == "other-model" and store.latest_run("m") == "new"
    assert store.runs()["run_id"].tolist() == ["other-model", "new", "mid", "old"]


def _unit_store(store, units: int = 5) -> pd.DataFrame:
    """A finished run written as many unit files, and another run beside it."""
    for unit in range(units):
        store.write(_report("r1", frame=_sinks_frame().assign(layer=[3 * unit, 3 * unit + 1, 3 * unit + 2])))
    store.write(_report("r2"))
    store.write(_manifest("r1"))
    return _sorted(store.read("sinks"))


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["run_id", "layer"], ignore_index=True)


def test_compact_merges_a_run_into_one_file_per_report(store):
    before = _unit_store(store)
    assert store.compact("r1") == 5
    assert [f.name.startswith("compact-") for f in store.files("sinks", run_id="r1")] == [True]
    assert len(list(store.path.glob("sinks/model=m/run_id=r1/*"))) == 1, "the parts are gone"
    assert len(store.files("sinks", run_id="r2")) == 1, "other runs are untouched"
    assert _sorted(store.read("sinks")).equals(before)
    assert store.compact("r1") == 0, "a compact run stays as it is"
    with pytest.raises(lens.StoreError, match="no finished run 'r2'"):
        store.compact("r2")


class _Killed(BaseException):
    """Stands for SIGKILL: nothing catches it."""


@pytest.mark.parametrize("kill_at", range(8))
def test_compaction_killed_or_watched_at_every_step_keeps_each_row_once(store, monkeypatch, kill_at):
    """The steps of a compaction are a write of the merged file, its rename into place and the removal
    of each part; a reader runs before every one of them, and the compaction dies before step
    ``kill_at``. Every read returns the rows exactly once; compacting again finishes the job."""
    before = _unit_store(store)
    steps = []

    def watched(step):
        def run(*args, **kwargs):
            if not any(str(arg).endswith(".parquet") for arg in args):  # not a step on report files
                return step(*args, **kwargs)
            if len(steps) == kill_at:
                raise _Killed  # also stops the clean-up a caught error would run, as SIGKILL does
            assert _sorted(lens.ReportStore(store.path).read("sinks")).equals(before), f"read before step {len(steps)}"
            steps.append(step.__name__)
            return step(*args, **kwargs)

        return run

    store_module = lens._store.store
    monkeypatch.setattr(store_module.pq, "write_table", watched(store_module.pq.write_table))
    monkeypatch.setattr(store_module.os, "replace", watched(os.replace))
    monkeypatch.setattr(store_module.os, "unlink", watched(os.unlink))
    try:
        store.compact("r1")
    except _Killed:
        pass
    monkeypatch.undo()
    assert steps == (["write_table", "replace"] + ["unlink"] * 5)[:kill_at]
    assert _sorted(store.read("sinks")).equals(before)
    store.compact("r1")
    assert _sorted(store.read("sinks")).equals(before) and len(store.files("sinks", run_id="r1")) == 1
    assert len(list(store.path.glob("sinks/model=m/run_id=r1/*.parquet"))) == 1


def test_part_written_during_compaction_is_kept(store, monkeypatch):
    before = _unit_store(store)
    late = _sinks_frame().assign(layer=[100, 101, 102])
    replace = os.replace

    def write_then_place(source, target):
        if "compact-" in str(target):  # a census writer adds a part while the merged file is placed
            monkeypatch.setattr(lens._store.store.os, "replace", replace)
            store.write(_report("r1", frame=late))
        return replace(source, target)

    monkeypatch.setattr(lens._store.store.os, "replace", write_then_place)
    store.compact("r1")
    assert len(store.read("sinks")) == len(before) + 3


def test_readers_during_repeated_compactions_see_every_row_once(store):
    """A reader thread reads while parts are added and compacted, round after round: the row count
    it sees never drops, never counts a row twice (3 rows per part) and never exceeds what is written."""
    import threading

    store.write(_manifest("r1"))
    written, seen, stop = [0], [], threading.Event()

    def read_loop():
        while not stop.is_set():
            count = len(lens.ReportStore(store.path).read("sinks"))
            seen.append((count, written[0] + 3))  # + the one part that may be placed but not yet counted

    reader = threading.Thread(target=read_loop)
    reader.start()
    try:
        for _ in range(12):
            for _ in range(2):
                store.write(_report("r1"))
                written[0] += 3
            store.compact("r1")
    finally:
        stop.set()
        reader.join()
    counts = [count for count, _ in seen]
    assert len(seen) > 5 and counts == sorted(counts) and all(count % 3 == 0 and count <= ceiling for count, ceiling in seen)
    assert len(store.read("sinks")) == 72 and len(store.files("sinks")) == 1
