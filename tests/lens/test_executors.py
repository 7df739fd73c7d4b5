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
