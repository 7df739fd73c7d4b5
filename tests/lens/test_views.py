"""Views: every registered view draws from a store written by a real census; the overview reads
whatever detectors ran; figures export to PDF/SVG/PNG at print size."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

import probes
from lens.views import VIEWS, available_views, render
from lens.views._registry import run_report_types
from lens.views.export import ExportError, export, find_browser, png_dpi
from lens.views.overview import RunFrames, compare_labels, compare_scores, correlations, head_labels, head_table, label_counts
from lens.views.style import FONT_FAMILY, OKABE_ITO, PX_PER_IN, WIDTHS_IN, detector_colors
from probes.sinks import Sinks

needs_browser = pytest.mark.skipif(find_browser() is None, reason="no Chromium-based browser for kaleido (apt-get install chromium)")
needs_poppler = pytest.mark.skipif(shutil.which("pdftoppm") is None, reason="pdftoppm not installed (apt-get install poppler-utils)")


@pytest.mark.parametrize("name", available_views())
def test_every_view_renders_from_a_real_run(census_run, name):
    store, run_id = census_run
    types = run_report_types(store, run_id)
    if not VIEWS[name].applies_to(types):
        needed = VIEWS[name].reports or f"{VIEWS[name].min_optional} of {VIEWS[name].optional_reports}"
        pytest.skip(f"{name} needs reports {needed}; this run has {types}")
    fig = render(store, name, run_id=run_id)
    assert isinstance(fig, go.Figure)
    assert fig.layout.width in {round(w * PX_PER_IN) for w in WIDTHS_IN.values()}
    assert fig.layout.template.layout.font.family == FONT_FAMILY
    assert any(len(trace.x if trace.x is not None else trace.z) for trace in fig.data), "the figure plots nothing"
    go.Figure(fig.to_dict())  # round-trips through plotly's validation


def test_sinks_views_show_the_stored_numbers(census_run):
    store, run_id = census_run
    sinks = store.read("sinks", run_id=run_id)
    heatmap = render(store, "sinks.heatmap", run_id=run_id)
    z = np.asarray(heatmap.data[0].z, dtype=float)
    assert z.shape == (9, 30)
    expected = sinks.pivot(index="head", columns="layer", values="sink_score").to_numpy()
    np.testing.assert_allclose(z, expected)
    marked = heatmap.data[1]
    assert len(marked.x) == sinks["is_sink"].sum() > 0
    assert set(zip(marked.x, marked.y)) == set(zip(sinks.loc[sinks.is_sink, "layer"], sinks.loc[sinks.is_sink, "head"]))

    per_layer = render(store, "sinks.first_token_mass", run_id=run_id)
    mean_line = next(t for t in per_layer.data if t.name == "first token")
    np.testing.assert_allclose(mean_line.y, sinks.groupby("layer")["sink_score"].mean().to_numpy())
    assert mean_line.line.color == Sinks.color

    top = render(store, "sinks.top_heads", run_id=run_id)
    best = sinks.loc[sinks["sink_score"].idxmax()]
    assert top.data[0].x[0] == f"L{best['layer']}.H{best['head']}"
    assert top.data[0].y[0] == pytest.approx(best["sink_score"])
    assert list(top.data[0].y) == sorted(top.data[0].y, reverse=True) and len(top.data[0].y) == 20


def test_overview_of_a_sinks_only_run(census_run):
    store, run_id = census_run
    fig = render(store, "overview.labels", run_id=run_id)
    n_sinks = int(store.read("sinks", run_id=run_id)["is_sink"].sum())
    labelled = [t for t in fig.data if isinstance(t, go.Scatter)]
    assert [t.name for t in labelled] == [f"sink ({n_sinks})"] and labelled[0].showlegend
    assert "overview.correlations" not in available_views(run_report_types(store, run_id))  # one score: nothing to correlate


def _heads(n_layers=4, n_heads=3) -> pd.DataFrame:
    return pd.DataFrame([(layer, head) for layer in range(n_layers) for head in range(n_heads)], columns=["layer", "head"])


def _planted_frames() -> dict[str, pd.DataFrame]:
    """Every overview report, with known labels and exactly related scores."""
    heads = _heads()
    sink = np.linspace(0, 1, len(heads))
    distance = 10 - 5 * sink  # decreasing in sink: Spearman -1
    contextual_rank = np.arange(len(heads), 0, -1)  # 1-based; ranks 1..12, head 11 is rank 1
    return {
        "sinks": heads.assign(sink_score=sink, is_sink=sink > 0.8),
        "retrieval": heads.assign(retrieval_score=2 * sink, is_retrieval=heads["layer"] == 1, extra="ignored"),
        "head_locality": pd.concat(
            [
                heads.assign(variant="all", mean_distance=distance, group=np.where(distance < 6, "local", np.where(distance > 9, "global", "middle"))),
                heads.assign(variant="no_sink", mean_distance=1.0, group="local"),  # another variant: not read
            ]
        ),
        "contextual": heads.assign(contextual_score=sink**2, rank=contextual_rank),
        "circuit_heads": pd.concat(
            [
                heads.assign(task="ioi", method="patching", importance=sink, in_circuit=(heads["layer"] == 0) & (heads["head"] == 2)),
                heads.assign(task="copy", method="patching", importance=sink - 1, in_circuit=False),
                # Estimates are ignored when exact patching is there.
                heads.assign(task="ioi", method="attribution", importance=5.0, in_circuit=True),
            ]
        ),
    }


def test_overview_labels_and_scores_on_planted_reports():
    frames = _planted_frames()
    labels = head_labels(frames)
    by_label = {name: set(zip(group["layer"], group["head"])) for name, group in labels.groupby("label")}
    sink = frames["sinks"]
    assert by_label["sink"] == set(zip(sink.loc[sink.is_sink, "layer"], sink.loc[sink.is_sink, "head"]))
    assert by_label["retrieval"] == {(1, 0), (1, 1), (1, 2)}
    assert by_label["in-circuit"] == {(0, 2)}
    assert len(by_label["contextual"]) == 12  # fewer heads than the top 20: all of them
    assert by_label["local"] and by_label["global"] and not (by_label["local"] & by_label["global"])

    table = head_table(frames)
    assert len(table) == 12 and list(table.columns[:2]) == ["layer", "head"]
    # The circuit score is the largest magnitude over tasks, from exact patching: max(|sink|, |sink - 1|).
    np.testing.assert_allclose(table["circuit_importance"], np.maximum(sink["sink_score"], 1 - sink["sink_score"]))
    rho = correlations(table)
    assert rho.loc["sink_score", "retrieval_score"] == pytest.approx(1)
    assert rho.loc["sink_score", "mean_distance"] == pytest.approx(-1)
    assert rho.loc["sink_score", "contextual_score"] == pytest.approx(1)

    grid = VIEWS["overview.labels"].make(frames)
    legend = {t.name for t in grid.data if isinstance(t, go.Scatter)}
    assert legend == {f"{name} ({len(heads)})" for name, heads in by_label.items()}
    matrix = VIEWS["overview.correlations"].make(frames)
    assert np.asarray(matrix.data[0].z).shape == (5, 5)


def test_overview_skips_absent_and_malformed_reports():
    frames = _planted_frames()
    partial = {"contextual": frames["contextual"], "retrieval": frames["retrieval"].drop(columns="is_retrieval")}
    assert set(head_labels(partial)["label"]) == {"contextual"}  # retrieval lacks its label column: skipped
    assert set(head_table(partial).columns) == {"layer", "head", "retrieval_score", "contextual_score", "labels"}
    assert head_labels({}).empty
    assert "no head-level reports" in VIEWS["overview.labels"].make({}).layout.annotations[0].text


def test_comparing_two_runs_and_two_models():
    frames = _planted_frames()
    a = RunFrames("run-a", "model-x", frames)
    same = RunFrames("run-b", "model-x", frames)
    counts = label_counts(a, same)
    assert (counts["jaccard"] == 1).all() and (counts["heads_A"] == counts["heads_B"]).all()
    scores = compare_scores(a, same)
    assert all("ρ = 1.00" in annotation.text for annotation in scores.layout.annotations)

    other = RunFrames("run-c", "model-y", {"sinks": _heads(6, 2).assign(sink_score=0.5, is_sink=True)})
    counts = label_counts(a, other)
    assert counts.set_index("label").loc["sink", "percent_B"] == 100 and counts["jaccard"].isna().all()
    depth = compare_scores(a, other)
    assert [t.name for t in depth.data] == ["A", "B"] and max(depth.data[1].x) == 1  # relative depth
    bars = compare_labels(a, other)
    assert [(t.name, t.x[0]) for t in bars.data] == [(run, label) for run in "AB" for label in counts["label"]]
    assert [t.marker.color for t in bars.data[: len(counts)]] == list(counts["color"])


@needs_browser
@needs_poppler
def test_export_pdf_svg_png_at_print_size(census_run, tmp_path):
    store, run_id = census_run
    fig = render(store, "sinks.heatmap", run_id=run_id)
    pdf, svg, png = export([fig, fig, fig], [tmp_path / "h.pdf", tmp_path / "h.svg", tmp_path / "h.png"], dpi=300)
    width_in = fig.layout.width / PX_PER_IN
    assert width_in == pytest.approx(6.9, abs=0.01)

    info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True, check=True).stdout
    page_w, page_h = map(float, re.search(r"Page size:\s+([\d.]+) x ([\d.]+) pts", info).groups())
    assert page_w == pytest.approx(width_in * 72, abs=1) and page_h == pytest.approx(fig.layout.height / PX_PER_IN * 72, abs=1)

    assert re.search(rb'<svg[^>]*width="%d"' % fig.layout.width, svg.read_bytes())
    png_bytes = png.read_bytes()
    png_width, png_height = int.from_bytes(png_bytes[16:20], "big"), int.from_bytes(png_bytes[20:24], "big")
    assert png_width == pytest.approx(width_in * 300, abs=2) and png_height == pytest.approx(fig.layout.height / PX_PER_IN * 300, abs=2)
    assert png_dpi(png) == pytest.approx(300, abs=0.1)

    # The PDF shows the plot: rendered back to pixels, it holds many viridis-coloured cells and the sink markers' outline.
    pixels = _render_pdf(pdf, tmp_path)
    assert pixels.shape[1] == pytest.approx(width_in * 100, abs=2)
    coloured = (pixels.max(-1).astype(int) - pixels.min(-1)) > 60
    assert coloured.mean() > 0.3, f"only {coloured.mean():.0%} of the page is coloured"
    dark_purple = np.abs(pixels.astype(int) - [0x44, 0x01, 0x54]).sum(-1) < 60  # viridis at 0: heads with no sink
    assert dark_purple.sum() > 100


def _render_pdf(pdf, folder) -> np.ndarray:
    subprocess.run(["pdftoppm", "-r", "100", "-singlefile", str(pdf), str(folder / "page")], check=True)
    data = (folder / "page.ppm").read_bytes()
    header = re.match(rb"P6\s+(\d+)\s+(\d+)\s+\d+\s", data)
    width, height = map(int, header.groups())
    return np.frombuffer(data[header.end() :], dtype=np.uint8).reshape(height, width, 3)


def test_export_without_a_browser_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr("lens.views.export.find_browser", lambda: None)
    fig = go.Figure(go.Bar(x=[1], y=[1]))
    with pytest.raises(ExportError, match="apt-get install chromium"):
        export(fig, tmp_path / "f.pdf")
    with pytest.raises(ExportError, match="cannot export to gif"):
        export(fig, tmp_path / "f.gif")


def test_palette_is_okabe_ito_and_one_colour_per_detector():
    colours = list(detector_colors().values())
    assert len(set(colours)) == len(colours) == len(probes.available())
    assert set(colours) <= set(OKABE_ITO.values())
