"""Work units: merging accumulated state, sharding, and keeping unit outputs (fast, no model)."""

from __future__ import annotations

from collections import Counter

import pytest

from lens._store.store import ReportStore
from lens._units import Checkpoints, RunLockedError, Unit, UnitCost, map_units, timed, unfinished_runs
from probes._base import merge_values


def test_merge_values_follows_probe_order():
    assert merge_values([1, 2], [3]) == [1, 2, 3]
    assert merge_values(2, 3) == 5
    assert merge_values(Counter(a=1), Counter(a=2, b=1)) == Counter(a=3, b=1)
    assert merge_values({"x": [1], "y": [2]}, {"y": [3], "z": [4]}) == {"x": [1], "y": [2, 3], "z": [4]}
    assert merge_values(None, "excerpt") == "excerpt"
    assert merge_values("first", "second") == "first"  # a one-off value is kept from the first probe that made it


def test_map_units_keep_every_probe_once_with_its_index():
    probes = [{"text": str(i)} for i in range(7)]
    units = map_units("sinks", probes, 3)
    assert [u.name for u in units] == ["map-0000", "map-0001", "map-0002"]
    assert [index for u in units for index, _ in u.probes] == list(range(7))
    assert [p for u in units for _, p in u.probes] == probes


def test_checkpoints_are_atomic_and_listed(tmp_path):
    store = ReportStore(tmp_path / "store")
    checkpoints = Checkpoints(store, "run-a")
    unit = Unit("sinks", "map", "map-0000")
    assert not checkpoints.done(unit)
    checkpoints.write_plan({"model": "m", "detectors": ["sinks"], "map_units": 2, "command": "lens census", "created_at": "t"})
    checkpoints.save(unit, {"values": [1, 2]})
    assert checkpoints.done(unit) and checkpoints.load(unit) == {"values": [1, 2]}
    assert not list((store.path / ".tmp").iterdir())  # nothing half-written left behind
    [run] = unfinished_runs(store)
    assert (run["run_id"], run["units_done"], run["map_units"]) == ("run-a", 1, 2)
    checkpoints.clear()
    assert unfinished_runs(store) == []


def test_checkpoints_sum_unit_costs_only_when_every_unit_has_one(tmp_path):
    checkpoints = Checkpoints(ReportStore(tmp_path / "store"), "run-a")
    first, second, third = (Unit("sinks", "map", f"map-000{i}") for i in range(3))
    checkpoints.save(first, {}, UnitCost(1.5, 3.0))
    checkpoints.save(second, {}, UnitCost(2.0, 1.0))
    checkpoints.save(third, {})  # kept before costs were recorded
    assert checkpoints.cost([first, second]) == UnitCost(3.5, 4.0)
    assert checkpoints.cost([first, third]) is None
    assert checkpoints.count() == 3  # a cost is not a unit
    assert checkpoints.recorded_cost() == UnitCost(3.5, 4.0)
    checkpoints.write_plan({"model": "m", "detectors": ["sinks"], "map_units": 3, "command": "lens census", "created_at": "t"})
    [run] = unfinished_runs(checkpoints.store)
    assert run["units_done"] == 3 and run["compute_s_so_far"] == 3.5


def test_timed_returns_the_result_and_what_it_cost():
    result, cost = timed(sum, range(1000))
    assert result == sum(range(1000)) and cost.wall_s >= 0 and cost.cpu_s >= 0


def test_a_run_is_computed_by_one_process_at_a_time(tmp_path):
    store = ReportStore(tmp_path / "store")
    with Checkpoints(store, "run-a").locked():
        with pytest.raises(RunLockedError, match="another process"):
            with Checkpoints(store, "run-a").locked():
                pass
        with Checkpoints(store, "run-b").locked():  # another run is free
            pass
    with Checkpoints(store, "run-a").locked():  # released
        pass
