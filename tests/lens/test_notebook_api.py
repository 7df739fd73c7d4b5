"""The notebook path: a census without a store, its display, one view, keeping it; only public names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import lens

ROOT = Path(__file__).resolve().parents[2]


def test_census_without_a_store_shows_and_saves(tmp_path):
    model = lens.load("tiny-llama")
    result = lens.census(model, ["preplan_anchor"], limit=1, params={"preplan_anchor": {"max_new_tokens": "6"}}, progress=False)
    assert result.store.path.exists() and "lens-store-" in result.store.path.name
    claims = result.claims()
    assert {"claim", "estimate", "ci_low", "ci_high", "n", "p_value"} <= set(claims.columns) and len(claims)
    html = result._repr_html_()
    assert result.run_id in html and "preplan_anchor.n_probes" in html
    assert "preplan_anchor.head_map" in result.views()
    assert len(result.show("preplan_anchor.head_map").data) > 0
    kept = result.save(tmp_path / "kept")
    assert kept.latest_run() == result.run_id
    for report in ("head_locality", "reasoning_tokens", "summary"):
        assert kept.read(report, run_id=result.run_id).equals(result.store.read(report, run_id=result.run_id))


def test_notebooks_and_benchmarks_use_only_public_names():
    private = re.compile(r"(?:from|import)\s+(?:lens|probes|metrics)(?:\.\w+)*\._\w+|\b(?:lens|probes|metrics)\._\w+")
    offenders = []
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(notebook.read_text())["cells"]:
            if cell["cell_type"] == "code":
                offenders += [f"{notebook.name}: {m}" for m in private.findall("".join(cell["source"]))]
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        offenders += [f"{script.name}: {m}" for m in private.findall(script.read_text())]
    assert not offenders, "private names used: " + "; ".join(offenders)
