"""`lens report --style paper`: figures at journal column widths in a serif face at 8-9 pt, PDFs with
their fonts embedded, and each figure's data beside it as CSV."""

from __future__ import annotations

import re
import shutil
import subprocess
import zlib

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from lens._cli import main
from lens.views import VIEWS, available_views, render
from lens.views._registry import run_report_types
from lens.views.charts import add_threshold
from lens.views.export import TABLE_COLUMNS, figure_table, find_browser
from lens.views.style import PAPER_FONT_FAMILY, PAPER_FONT_PT, PAPER_TITLE_PT, PAPER_WIDTHS_IN, PX_PER_IN, paper_styled, pt_to_px, styled

needs_browser = pytest.mark.skipif(find_browser() is None, reason="no Chromium-based browser for kaleido (apt-get install chromium)")


def _explicit_fonts(node, path=""):
    """(path, font dict) for every font a figure spells out."""
    if isinstance(node, list):
        for index, item in enumerate(node):
            yield from _explicit_fonts(item, f"{path}[{index}]")
    elif isinstance(node, dict):
        for key, value in node.items():
            if key.endswith("font") and isinstance(value, dict):
                yield f"{path}.{key}", value
            else:
                yield from _explicit_fonts(value, f"{path}.{key}")


def _assert_paper_fonts(fig: go.Figure) -> None:
    base = fig.layout.template.layout
    assert base.font.family == PAPER_FONT_FAMILY and "serif" in PAPER_FONT_FAMILY
    assert base.font.size == pytest.approx(pt_to_px(PAPER_FONT_PT)) and base.title.font.size == pytest.approx(pt_to_px(PAPER_TITLE_PT))
    spec = fig.to_dict()
    spec["layout"].pop("template")
    fonts = list(_explicit_fonts(spec))
    for where, font in fonts:
        assert font.get("family") == PAPER_FONT_FAMILY, where
        assert pt_to_px(8) <= font.get("size") <= pt_to_px(9), f"{where}: {font.get('size')} px"
    return fonts


def test_points_are_converted_to_plotly_pixels():
    assert pt_to_px(72) == PX_PER_IN and pt_to_px(8) == pytest.approx(10.667, abs=1e-3)


def test_paper_style_keeps_the_column_and_aspect_and_replaces_screen_fonts():
    fig = go.Figure(go.Heatmap(z=[[1, 2], [3, 4]], colorbar=dict(title=dict(text="score", font=dict(size=6)), tickfont=dict(size=6))))
    fig.add_annotation(text="note", font=dict(size=7), x=0, y=0)
    fig.update_layout(title="A title", xaxis=dict(tickfont=dict(size=6)), legend=dict(font=dict(size=7)))
    screen = styled(fig, width="double", height_in=3.0)
    paper = paper_styled(screen)
    assert paper.layout.width == round(PAPER_WIDTHS_IN["double"] * PX_PER_IN)
    assert paper.layout.height == round(3.0 * PX_PER_IN * 6.75 / 6.9)
    fonts = dict(_assert_paper_fonts(paper))
    assert {".data[0].colorbar.tickfont", ".layout.xaxis.tickfont", ".layout.annotations[0].font"} <= set(fonts)
    assert screen.layout.xaxis.tickfont.size == 6, "the view's own figure is left as it was"
    assert paper_styled(styled(go.Figure(), width="single")).layout.width == round(3.25 * PX_PER_IN)
    assert paper_styled(screen, width="single").layout.width == round(3.25 * PX_PER_IN)
    with pytest.raises(ValueError, match="paper width 'triple'"):
        paper_styled(screen, width="triple")


def test_figure_table_on_planted_traces():
    fig = go.Figure()
    fig.add_trace(go.Bar(x=["L0.H1", "L2.H3"], y=[0.5, 0.25], name="score",
                         error_y=dict(type="data", symmetric=False, array=[0.1, 0.05], arrayminus=[0.2, 0.05])))
    fig.add_trace(go.Heatmap(z=[[1.0, 2.0, np.nan], [4.0, 5.0, 6.0]], x=[0, 1, 2], y=[10, 11], xaxis="x2", yaxis="y2"))
    fig.add_trace(go.Bar(y=["token a"], x=[3], base=[4.5], orientation="h", name="span"))
    add_threshold(fig, 0.3, "eps")  # a dashed line and a legend-only trace
    table = figure_table(fig)
    assert list(table.columns) == list(TABLE_COLUMNS)
    bars = table[table["trace"] == 0]
    assert bars[["x", "y", "y_low", "y_high"]].values.tolist() == [["L0.H1", 0.5, 0.3, 0.6], ["L2.H3", 0.25, 0.2, 0.3]]
    cells = table[table["type"] == "heatmap"]
    assert len(cells) == 6 and set(cells["panel"]) == {"x2/y2"}
    assert cells.set_index(["y", "x"])["z"].loc[(11, 2)] == 6.0 and np.isnan(cells.set_index(["y", "x"])["z"].loc[(10, 2)])
    span = table[table["name"] == "span"]
    assert span[["y", "x", "base"]].values.tolist() == [["token a", 3, 4.5]]
    assert table[table["type"] == "hline"]["y"].tolist() == [0.3]
    assert "eps 0.3" not in set(table["name"]), "the legend-only entry has no points"


@pytest.mark.parametrize("name", available_views())
def test_every_view_has_a_paper_form_and_a_data_table(census_run, name):
    store, run_id = census_run
    types = run_report_types(store, run_id)
    if not VIEWS[name].applies_to(types):
        pytest.skip(f"{name} does not apply to a run with {types}")
    paper = paper_styled(render(store, name, run_id=run_id))
    assert paper.layout.width in {round(w * PX_PER_IN) for w in PAPER_WIDTHS_IN.values()}
    _assert_paper_fonts(paper)
    table = figure_table(paper)
    assert len(table) and table[["x", "y"]].notna().any().all(), "the table holds the figure's points"


@needs_browser
def test_paper_report_of_a_real_run(census_run, tmp_path):
    store, run_id = census_run
    views = ["sinks.heatmap", "sinks.top_heads"]
    code = main(["report", "--store", str(store.path), "--out", str(tmp_path), "--run", run_id, "--style", "paper", "--views", ",".join(views)])
    assert code == 0
    folder = tmp_path / run_id
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{v}.{fmt}" for v in views for fmt in ("pdf", "csv"))

    sinks = store.read("sinks", run_id=run_id)
    for name, column in (("sinks.heatmap", "double"), ("sinks.top_heads", "single")):
        paper = paper_styled(render(store, name, run_id=run_id))
        assert paper.layout.width == round(PAPER_WIDTHS_IN[column] * PX_PER_IN)
        _assert_paper_fonts(paper)
        pdf = (folder / f"{name}.pdf").read_bytes()
        page_w = float(re.search(rb"/MediaBox \[0 0 ([\d.]+) [\d.]+\]", pdf).group(1))
        assert page_w == pytest.approx(PAPER_WIDTHS_IN[column] * 72, abs=1)
        _assert_fonts_embedded(folder / f"{name}.pdf", pdf)

    # The CSVs are the numbers drawn: every head's cell, and the top heads' bars with their intervals.
    cells = pd.read_csv(folder / "sinks.heatmap.csv")
    heatmap = cells[cells["type"] == "heatmap"]
    assert len(heatmap) == len(sinks)
    drawn = heatmap.set_index(["x", "y"])["z"].sort_index()
    stored = sinks.set_index(["layer", "head"])["sink_score"].sort_index()
    np.testing.assert_allclose(drawn.to_numpy(), stored.to_numpy(), rtol=1e-6)
    marked = cells[cells["type"] == "scatter"]
    assert len(marked) == int(sinks["is_sink"].sum())

    bars = pd.read_csv(folder / "sinks.top_heads.csv")
    top = sinks.sort_values("sink_score", ascending=False, kind="stable").head(20)
    bar_rows = bars[bars["type"] == "bar"]
    assert bar_rows["x"].tolist() == [f"L{r.layer}.H{r.head}" for r in top.itertuples()]
    np.testing.assert_allclose(bar_rows[["y", "y_low", "y_high"]].to_numpy(), top[["sink_score", "ci_low", "ci_high"]].to_numpy(), rtol=1e-6)
    assert bars.loc[bars["type"] == "hline", "y"].tolist() == [pytest.approx(float(sinks["eps"].iloc[0]))]


def _assert_fonts_embedded(path, pdf: bytes) -> None:
    """Every font of the PDF carries its font program (pdffonts' "emb" column, or /FontFile entries)."""
    if shutil.which("pdffonts"):
        lines = subprocess.run(["pdffonts", str(path)], capture_output=True, text=True, check=True).stdout.splitlines()[2:]
        assert lines, "the PDF has no fonts: its text did not render"
        for line in lines:
            name, embedded = line.split()[0], re.search(r"\s(yes|no)\s+(yes|no)\s+(yes|no)\s+\d+\s+\d+$", line).group(1)
            assert embedded == "yes", line
            assert "Serif" in name, f"{name}: not the paper's serif face"
    descriptors = re.findall(rb"/Type\s*/FontDescriptor(.*?)>>", pdf, re.S) + [
        block for stream in re.findall(rb"stream\r?\n(.*?)endstream", pdf, re.S) for block in _inflated_descriptors(stream)
    ]
    assert descriptors and all(re.search(rb"/FontFile[23]?\b", d) for d in descriptors)


def _inflated_descriptors(stream: bytes) -> list[bytes]:
    try:
        text = zlib.decompress(stream)
    except zlib.error:
        return []
    return re.findall(rb"/Type\s*/FontDescriptor(.*?)>>", text, re.S)
