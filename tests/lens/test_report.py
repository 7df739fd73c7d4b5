"""`lens report`: every figure of a run as PDF/SVG/PNG, and a self-contained HTML report that renders
in headless Chromium with no script errors."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from lens._cli import main
from lens.views import run_views
from lens.views.report import CAUTION

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium): static export and the browser test need it")


@pytest.fixture(scope="module")
def report(census_run, tmp_path_factory):
    store, run_id = census_run
    out = tmp_path_factory.mktemp("report")
    formats = "pdf,svg,png,html" if CHROMIUM else "html"
    code = main(["report", "--store", str(store.path), "--out", str(out), "--format", formats, "--compare", run_id])
    assert code == 0
    return store, run_id, out / run_id


def test_report_writes_every_figure_of_the_run(report):
    store, run_id, folder = report
    views = run_views(store, run_id)
    assert {"sinks.heatmap", "sinks.first_token_mass", "overview.labels"} <= set(views)
    formats = ("pdf", "svg", "png") if CHROMIUM else ()
    for name in views + ["compare.labels", "compare.scores"]:
        for fmt in formats:
            path = folder / f"{name}.{fmt}"
            assert path.exists() and path.stat().st_size > 2000, path
    html = (folder / "report.html").read_text()
    assert CAUTION in html
    assert run_id in html and "Run manifest" in html and "sinks.sink_rate" in html
    assert not re.search(r"<script[^>]+src=", html), "the report must not load scripts from elsewhere"
    assert "Comparison with run" in html


@needs_chromium
def test_html_report_renders_in_headless_chromium(report, tmp_path):
    store, run_id, folder = report
    page = folder / "report.html"
    html = page.read_text()
    figure_ids = re.findall(r'<div id="(fig-[^"]+)" class="plotly-graph-div"', html)
    assert len(figure_ids) == len(run_views(store, run_id)) + 2  # + the comparison's two
    browser = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=20000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    assert browser.returncode == 0, browser.stderr[-2000:]
    console = [line for line in browser.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, "script errors or console messages:\n" + "\n".join(console)
    dom = browser.stdout
    # plotly marks each div it has drawn into and fills it with its SVG layers.
    for figure_id in figure_ids:
        drawn = re.search(rf'<div id="{figure_id}" class="plotly-graph-div js-plotly-plot"[^>]*>.*?class="main-svg"', dom, re.S)
        assert drawn, f"{figure_id} was not drawn"
    sinks = store.read("sinks", run_id=run_id)
    assert dom.count('class="hm"') >= 2  # the heatmaps' cell images (sinks.heatmap, overview.labels)
    assert dom.count('class="point"') >= int(sinks["is_sink"].sum())  # the sink heads' markers


def test_report_bad_input_is_one_line(census_run, capsys, tmp_path):
    store, run_id = census_run
    cases = [
        (["--store", str(tmp_path / "empty")], "no finished runs"),
        (["--store", str(store.path), "--run", "no-such-run"], "no finished run 'no-such-run'"),
        (["--store", str(store.path), "--format", "html,gif"], "unknown format(s) gif"),
        (["--store", str(store.path), "--format", "png", "--dpi", "0"], "--dpi must be positive"),
        (["--store", str(store.path), "--views", "sinks.nope"], "view(s) sinks.nope do not apply"),
        (["--store", str(store.path), "--markdown", str(tmp_path / "missing-dir" / "x.md")], "No such file"),
    ]
    for arguments, expected in cases:
        code = main(["report", "--out", str(tmp_path / "out"), *arguments])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and expected in err, err


def test_html_only_report_needs_no_browser(census_run, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("lens.views.export.find_browser", lambda: None)
    store, run_id = census_run
    assert main(["report", "--store", str(store.path), "--out", str(tmp_path), "--format", "html"]) == 0
    assert (tmp_path / run_id / "report.html").exists()
    code = main(["report", "--store", str(store.path), "--out", str(tmp_path), "--format", "pdf"])
    err = capsys.readouterr().err
    assert code == 2 and "apt-get install chromium" in err and err.count("\n") == 1


def test_store_and_report_display_in_notebooks(census_run):
    store, run_id = census_run
    page = store._repr_html_()
    n_sinks = len(store.read("sinks", run_id=run_id))
    assert run_id in page and "smollm2-135m" in page and f"<td>{n_sinks}</td>" in page
    from lens import Report

    shown = Report("sinks", store.read("sinks", run_id=run_id), run_id=run_id, model="smollm2-135m")._repr_html_()
    assert f"{n_sinks} rows" in shown and "sink_score" in shown


def test_markdown_claims_table_comes_from_the_store(census_run, tmp_path, capsys):
    store, run_id = census_run
    page = tmp_path / "results.md"
    assert main(["report", "--store", str(store.path), "--run", run_id, "--markdown", str(page)]) == 0
    text = page.read_text()
    summary = store.read("summary", run_id=run_id)
    assert "## sinks" in text and f"smollm2-135m ({run_id}, " in text  # the run and its census time
    rate = summary.set_index("claim").loc["sinks.sink_rate"]
    assert f"{rate['estimate']:.3g} [{rate['ci_low']:.3g}, {rate['ci_high']:.3g}] n={rate['n']} probes" in text


def test_report_of_chosen_views_only(census_run, tmp_path):
    store, run_id = census_run
    assert main(["report", "--store", str(store.path), "--out", str(tmp_path), "--format", "html", "--views", "sinks.heatmap"]) == 0
    assert "sinks.heatmap" in (tmp_path / run_id / "report.html").read_text()
