"""A census on a local Ray with 2 workers writes the same reports as the in-process census."""

from __future__ import annotations

import pytest

import lens


def test_ray_census_equals_in_process(smollm2, small_census, same_reports, tmp_path):
    import ray

    local = lens.ReportStore(tmp_path / "local")
    distributed = lens.ReportStore(tmp_path / "ray")
    in_process = lens.census(smollm2, store=local, shard_size=2, **small_census)
    try:
        on_ray = lens.census(smollm2, store=distributed, shard_size=1, executor="ray", workers=2, **small_census)
    finally:
        ray.shutdown()
    assert on_ray.run_id == in_process.run_id
    assert on_ray.units_run == 9 + 1 + 3  # every shard, the retrieval masking stage and three reduces, all on Ray workers
    same_reports(distributed, on_ray.run_id, local, in_process.run_id)


def test_unknown_executor_is_one_clear_error(smollm2, tmp_path):
    import probes

    with pytest.raises(probes.ProbeError, match="executor must be one of local, ray"):
        lens.census(smollm2, ["sinks"], tmp_path / "store", limit=1, executor="dask")


def test_ray_stage_scheduler_runs_independent_stages_at_once_and_others_in_order():
    """On a stand-in for Ray (a call finishes when the scheduler waits for it): the circuits detector's
    per-task stages share idle workers; another detector's stages run one at a time, each given the
    results of those before it."""
    from types import SimpleNamespace

    from lens._executors import RayExecutor
    from lens._units import DetectorSpec, UnitCost

    running: set[tuple[str, str]] = set()
    started: list[tuple[str, str, frozenset, tuple]] = []

    def remote(spec, states, earlier, name):
        running.add((spec.name, name))
        started.append((spec.name, name, frozenset(running), tuple(earlier)))
        return (spec.name, name)

    def get(ref):
        running.discard(ref)
        return f"result of {ref[1]}", UnitCost(1.0, 2.0)

    executor = object.__new__(RayExecutor)
    executor.ray = SimpleNamespace(put=lambda value: value, wait=lambda refs, num_returns: (refs[:1], refs[1:]), get=get)
    executor.actors = [SimpleNamespace(stage=SimpleNamespace(remote=remote)) for _ in range(3)]
    chains = {
        "circuits": (DetectorSpec("circuits", {}, 0, "auto"), [], {}, ["task:ioi", "task:capitals", "task:induction"]),
        "contextual": (DetectorSpec("contextual", {}, 0, "auto"), [], {"warmup": 1}, ["train", "evaluate"]),
    }
    results = list(executor.stages(chains))
    assert all(cost == UnitCost(1.0, 2.0) for *_, cost in results)
    assert sorted((d, n) for d, n, _, _ in results) == sorted((d, n) for d, chain in chains.items() for n in chain[3])
    assert max(sum(d == "circuits" for d, _ in at_start) for _, _, at_start, _ in started) == 2, "two tasks at once (the third worker took contextual)"
    assert all(sum(d == "contextual" for d, _ in at_start) <= 1 for _, _, at_start, _ in started)
    earlier = {(d, n): before for d, n, _, before in started}
    assert earlier[("contextual", "train")] == ("warmup",) and earlier[("contextual", "evaluate")] == ("warmup", "train")
