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
