"""Everything about one run, from the store: its figures as files and one self-contained HTML report.

``write_report(store, out, run_id=...)`` writes ``<out>/<run_id>/<view>.<pdf|svg|png|csv>`` for every
view that applies to the run (``style="paper"``: at journal column widths in a serif face, see
``lens.views.style.paper_styled``; the CSV is the figure's data), and ``<out>/<run_id>/report.html``:
the census overview, a section per detector (its headline numbers and figures), the run manifest, and plotly's JavaScript embedded so
the file works offline. ``lens report`` is the command-line form.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import plotly.offline

from lens.views._registry import VIEWS, render, run_report_types
from lens.views.export import FORMATS, ExportError, export
from lens.views.overview import compare_labels, compare_scores, correlations, head_table, label_counts, load_run
from lens.views.style import FONT_FAMILY, detector_color, detector_colors, paper_styled

REPORT_FORMATS = (*FORMATS, "html")
STYLES = ("screen", "paper")
CAUTION = (
    "Attention weights are not explanations by themselves: a head that attends to a token has not been shown to use it. "
    "The labels here are patterns in attention and activations; causal checks (ablating or patching the head and measuring "
    "the change in behaviour) are what turn a pattern into a claim."
)
SCREEN_SCALE = 1.4  # figures are laid out at print size; the HTML shows them larger


class ReportError(ValueError):
    """A report that cannot be made: no such run, or no finished runs."""


def run_views(store, run_id: str) -> list[str]:
    """Names of the views that apply to the run (the overview first, then by detector)."""
    types = run_report_types(store, run_id)
    names = [name for name, v in VIEWS.items() if v.applies_to(types)]
    return sorted(names, key=lambda name: (VIEWS[name].group != "overview", name))


def run_figures(store, run_id: str) -> dict[str, go.Figure]:
    return {name: render(store, name, run_id=run_id) for name in run_views(store, run_id)}


def resolve_runs(store, run: str | None) -> list[str]:
    """``run`` None: the newest finished run; "all": every finished run; else that run (checked)."""
    runs = store.runs()
    if runs.empty:
        raise ReportError(f"no finished runs in {store.path}")
    if run is None:
        return [str(runs["run_id"].iloc[0])]
    if run == "all":
        return list(dict.fromkeys(runs["run_id"].astype(str)))
    if run not in set(runs["run_id"]):
        raise ReportError(f"no finished run {run!r} in {store.path}; runs: {', '.join(dict.fromkeys(runs['run_id'].astype(str)))}")
    return [run]


def write_report(
    store, out: str | Path, *, run_id: str, formats=REPORT_FORMATS, compare: str | None = None, dpi: int = 300,
    views: list[str] | None = None, style: str = "screen",
) -> list[Path]:
    """Write the run's figures in ``formats`` and (with "html") its HTML report under ``out/<run_id>/``;
    ``views`` limits the figures to those names; ``style="paper"`` lays the figure files out for a
    journal (the HTML report keeps the screen figures)."""
    unknown = sorted(set(formats) - set(REPORT_FORMATS))
    if unknown:
        raise ReportError(f"unknown format(s) {', '.join(unknown)}; formats: {', '.join(REPORT_FORMATS)}")
    if dpi <= 0:
        raise ReportError(f"--dpi must be positive, got {dpi}")
    if style not in STYLES:
        raise ReportError(f"unknown style {style!r}; styles: {', '.join(STYLES)}")
    folder = Path(out) / run_id
    try:  # before minutes of rendering
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ReportError(f"--out {out} is not writable: {error.strerror or error}") from None
    applicable = run_views(store, run_id)
    missing = sorted(set(views or ()) - set(applicable))
    if missing:
        raise ReportError(f"view(s) {', '.join(missing)} do not apply to run {run_id}; views: {', '.join(applicable)}")
    figures = {name: render(store, name, run_id=run_id) for name in (views or applicable)}
    comparison = _comparison(store, run_id, compare)[2] if compare else {}
    all_figures = {**figures, **{f"compare.{name}": fig for name, fig in comparison.items()}}
    files = {name: paper_styled(fig) for name, fig in all_figures.items()} if style == "paper" else all_figures
    written = []
    if "html" in formats:  # first: it needs no browser, so it is written where static export is impossible
        page = folder / "report.html"
        page.write_text(html_report(store, run_id, figures=figures, compare=compare), encoding="utf-8")
        written.append(page)
    static = [fmt for fmt in FORMATS if fmt in formats]
    paths = [folder / f"{name}.{fmt}" for fmt in static for name in files]
    try:
        return (export([files[p.stem] for p in paths], paths, dpi=dpi) if paths else []) + written
    except ExportError as error:
        raise ExportError(f"{error}; the HTML report was written: {written[0]}" if written else str(error)) from None


def _comparison(store, run_id: str, other: str) -> tuple[object, object, dict[str, go.Figure]]:
    """Both runs' overview frames and the comparison figures."""
    resolve_runs(store, other)
    a, b = load_run(store, run_id), load_run(store, other)
    return a, b, {"labels": compare_labels(a, b), "scores": compare_scores(a, b)}


# -- HTML ----------------------------------------------------------------------------------------

_CSS = f"""
body {{ font-family: {FONT_FAMILY}; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #111; line-height: 1.4; }}
h1 {{ font-size: 1.5em; }} h2 {{ border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }}
.caution {{ border-left: 4px solid #E69F00; background: #FFF8E6; padding: .6em 1em; }}
.figures {{ display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }}
figure {{ margin: 0; }} figcaption {{ font-size: .85em; color: #555; }}
table {{ border-collapse: collapse; font-size: .85em; margin: .5em 0; }}
table {{ display: block; overflow-x: auto; max-width: 100%; }}
th, td {{ border: 1px solid #ddd; padding: .2em .5em; text-align: left; vertical-align: top; }} th {{ background: #f4f4f4; }}
.swatch {{ display: inline-block; width: .8em; height: .8em; margin-right: .3em; vertical-align: baseline; }}
nav a {{ margin-right: 1em; }} code {{ font-size: .9em; }}
"""


def html_report(store, run_id: str, *, figures: dict[str, go.Figure] | None = None, compare: str | None = None) -> str:
    """The run's report as one HTML page with plotly.js inlined (no network needed to view it)."""
    figures = figures if figures is not None else run_figures(store, run_id)
    manifest = store.runs(run_id=run_id)
    model = str(manifest["model"].iloc[0]) if len(manifest) else ""
    detectors = list(dict.fromkeys(manifest.sort_values("detector")["detector"]))
    sections = [("overview", "Census overview", _overview_section(store, run_id, figures))]
    for detector in detectors:
        sections.append((detector, f"<span class='swatch' style='background:{detector_color(detector)}'></span>{html.escape(detector)}", _detector_section(store, run_id, detector, figures)))
    if compare:
        sections.append(("compare", f"Comparison with run {html.escape(compare)}", _compare_section(store, run_id, compare)))
    sections.append(("run", "Run manifest", _manifest_section(manifest)))
    nav = " ".join(f"<a href='#{key}'>{html.escape(key)}</a>" for key, _, _ in sections)
    body = "\n".join(f"<section id='{key}'><h2>{title}</h2>\n{content}</section>" for key, title, content in sections)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>lens report: {html.escape(model)} run {html.escape(run_id)}</title>
<style>{_CSS}</style>
<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script>
</head><body>
<h1>Head census of {html.escape(model)}, run {html.escape(run_id)}</h1>
<p class="caution"><b>Caution.</b> {html.escape(CAUTION)}</p>
<nav>{nav}</nav>
{body}
</body></html>
"""


def _figure_html(name: str, fig: go.Figure) -> str:
    screen = go.Figure(fig)
    layout = fig.layout
    screen.update_layout(
        width=round(layout.width * SCREEN_SCALE) if layout.width else None,
        height=round(layout.height * SCREEN_SCALE) if layout.height else None,
        font_size=12,
        title_font_size=13,
        legend_font_size=11,
        modebar_orientation="v",  # beside the plot, clear of the legend
    )
    div = screen.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{name.replace('.', '-')}", config={"displaylogo": False})
    title = VIEWS[name].title if name in VIEWS else name
    return f"<figure>{div}<figcaption><code>{html.escape(name)}</code>: {html.escape(title)}</figcaption></figure>"


def _figures_html(figures: dict[str, go.Figure], group: str) -> str:
    chosen = [_figure_html(name, fig) for name, fig in figures.items() if VIEWS[name].group == group]
    return f"<div class='figures'>{''.join(chosen)}</div>" if chosen else "<p>No views for this detector yet.</p>"


def _table_html(frame: pd.DataFrame, **kwargs) -> str:
    return frame.to_html(index=False, border=0, float_format=lambda v: f"{v:.4g}", na_rep="", escape=True, **kwargs)


def _overview_section(store, run_id: str, figures: dict[str, go.Figure]) -> str:
    from lens.views._registry import read_frames

    frames = read_frames(store, VIEWS["overview.labels"], run_id=run_id)
    table = head_table(frames)
    parts = [
        "<p>Each head's labels across the detectors that ran (a detector that did not run is absent), and how their "
        "per-head scores relate. Colours: "
        + ", ".join(f"<span class='swatch' style='background:{color}'></span>{name}" for name, color in detector_colors().items())
        + ".</p>",
        _figures_html(figures, "overview"),
    ]
    if len(table):
        scores = [c for c in table.columns if c not in ("layer", "head", "labels")]
        if len(scores) >= 2:
            parts.append("<h3>Spearman correlations between detector scores</h3>" + correlations(table).reset_index(names="score").pipe(_table_html))
        labelled = table[table["labels"] != ""]
        parts.append(
            f"<details><summary>Cross-detector table: {len(table)} heads, {len(labelled)} with a label (click to open)</summary>"
            + _table_html(table)
            + "</details>"
        )
    return "\n".join(parts)


def _detector_section(store, run_id: str, detector: str, figures: dict[str, go.Figure]) -> str:
    summary = store.read("summary", run_id=run_id, detector=detector)
    parts = []
    if len(summary):
        parts.append("<h3>Headline numbers</h3>" + _table_html(summary[["claim", "estimate", "ci_low", "ci_high", "n", "unit", "p_value", "method", "detail"]]))
    reports = store.runs(run_id=run_id, detector=detector)["reports"].iloc[0]
    counts = ", ".join(f"<code>{html.escape(r)}</code> ({len(store.read(r, run_id=run_id, detector=detector))} rows)" for r in reports.split(",") if r)
    parts.append(f"<p>Reports: {counts}.</p>")
    parts.append(_figures_html(figures, detector))
    return "\n".join(parts)


def _compare_section(store, run_id: str, other: str) -> str:
    a, b, comparison = _comparison(store, run_id, other)
    counts = label_counts(a, b)
    parts = [f"<p>A = {html.escape(a.name)}, B = {html.escape(b.name)}.</p>"]
    for name, fig in comparison.items():
        parts.append(f"<div class='figures'>{_figure_html(f'compare.{name}', fig)}</div>")
    if len(counts):
        parts.append(_table_html(counts.drop(columns="color")))
    return "\n".join(parts)


def _manifest_section(manifest: pd.DataFrame) -> str:
    if manifest.empty:
        return "<p>No manifest.</p>"
    shown = manifest[["detector", "n_probes", "seed", "params", "probe_hash", "model_fingerprint", "device", "started_at", "finished_at", "reports"]]
    versions = json.loads(manifest["versions"].iloc[0])
    return _table_html(shown) + "<p>Package versions: " + ", ".join(f"{html.escape(k)} {html.escape(str(v))}" for k, v in versions.items()) + "</p>"
