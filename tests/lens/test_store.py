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


def test_unwritable_store_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(lens.StoreError, match="not writable"):
        lens.ReportStore(blocker / "store").check_writable()


def _writer(path: str, worker: int) -> None:
    store = lens.ReportStore(path)
    for i in range(10):
        store.write(_report(run_id=f"w{worker}-{i}", model="m"))


def test_concurrent_writers_lose_nothing(tmp_path):
    path = str(tmp_path / "store")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer, args=(path, w)) for w in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
        assert worker.exitcode == 0
    frame = lens.ReportStore(path).read("sinks")
    assert frame["run_id"].nunique() == 30 and len(frame) == 90


def test_duckdb_reads_the_store_with_hive_partitioning(store):
    store.write(_report("r1", "a"))
    store.write(_report("r2", "b"))
    query = f"SELECT model, run_id, count(*) AS n, avg(sink_score) AS s FROM read_parquet('{store.sql_glob('sinks')}', hive_partitioning=true) GROUP BY ALL ORDER BY model"
    result = duckdb.sql(query).df()
    assert result["model"].tolist() == ["a", "b"] and result["n"].tolist() == [3, 3]


def test_interrupted_write_leaves_no_file(store, monkeypatch):
    def explode(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", explode)
    with pytest.raises(lens.StoreError, match="No space left"):
        store.write(_report())
    monkeypatch.undo()
    assert list(store.path.rglob("*.parquet")) == []
