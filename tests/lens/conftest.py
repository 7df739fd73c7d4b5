"""Fixtures shared by the view and report tests."""

from __future__ import annotations

import pytest

# Detectors run for the view and report tests (two probes each); a detector adding views adds itself here.
CENSUS_DETECTORS = ["sinks"]


@pytest.fixture(scope="session")
def census_run(smollm2, tmp_path_factory):
    """(store, run_id) of a real census of ``CENSUS_DETECTORS`` on the embedded model."""
    import lens

    store = lens.ReportStore(tmp_path_factory.mktemp("views") / "store")
    result = lens.census(smollm2, CENSUS_DETECTORS, store, limit=2)
    return store, result.run_id


@pytest.fixture(scope="session")
def small_census() -> dict:
    """``lens.census`` arguments for a cheap real-model census with every kind of unit: sinks (probe
    shards only), preplan_anchor (generation) and retrieval (a later stage, its masking test)."""
    return {
        "detectors": ["sinks", "preplan_anchor", "retrieval"],
        "limit": 3,
        "params": {
            "preplan_anchor": {"max_new_tokens": "24"},
            "retrieval": {"lengths": "[200]", "depths": "[0.5]", "needles_per_cell": "3", "ablation_ks": "[2]",
                          "ablation_draws": "1", "max_new_tokens": "12"},
        },
    }


@pytest.fixture(scope="session")
def same_reports():
    """``same_reports(store_a, run_a, store_b, run_b)`` asserts two runs wrote equal reports (every
    report type but the manifest, rows in any order, floats to a relative 1e-4: batched forward passes
    of different shard compositions differ from each other in float rounding only)."""
    import pandas as pd

    def frames(store, run_id):
        out = {}
        for report_type in store.report_types():
            if report_type != "runs":
                frame = store.read(report_type, run_id=run_id).drop(columns=["run_id"])
                out[report_type] = frame.sort_values(list(frame.columns)).reset_index(drop=True)
        return out

    def check(store_a, run_a, store_b, run_b) -> None:
        a, b = frames(store_a, run_a), frames(store_b, run_b)
        assert a.keys() == b.keys()
        for report_type in a:
            pd.testing.assert_frame_equal(a[report_type], b[report_type], check_exact=False, rtol=1e-4, atol=1e-7, obj=report_type)

    return check
