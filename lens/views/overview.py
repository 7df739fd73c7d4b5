"""The census overview: every head's labels and scores across detectors, and two runs side by side.

The labels and scores come from the detectors themselves (``Detector.overview_labels`` and
``overview_scores``, declared in each ``probes/<detector>.py`` with ``probes.OverviewLabel`` and
``probes.OverviewScore``), so a new detector appears here without an edit. Each is read from a report
the run has (a detector that did not run is simply absent); where a report has several rows per head,
the label or score names the rows it reads (``Rows``: e.g. exact activation patching of circuits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

import probes
from lens.views._registry import read_frames, view
from lens.views.charts import head_grid, head_label, no_data
from lens.views.style import DIVERGING, NEUTRAL, detector_color, styled
from probes import OverviewLabel, OverviewScore, Rows


def overview_labels() -> list[tuple[str, OverviewLabel]]:
    """(detector, label) for every registered detector's overview labels."""
    return [(name, label) for name in probes.available() for label in probes.get(name).overview_labels]


def overview_scores() -> list[tuple[str, OverviewScore]]:
    """(detector, score) for every registered detector's overview scores."""
    return [(name, score) for name in probes.available() for score in probes.get(name).overview_scores]


def overview_reports() -> tuple[str, ...]:
    """The reports the overview reads: those of the registered detectors' labels and scores."""
    return tuple(dict.fromkeys([label.report for _, label in overview_labels()] + [score.report for _, score in overview_scores()]))


def label_color(detector: str, label: OverviewLabel) -> str:
    return label.color or detector_color(detector)


def _usable(frames: dict[str, pd.DataFrame], report: str, column: str, rows: Rows | None) -> pd.DataFrame | None:
    frame = frames.get(report)
    if frame is None or frame.empty or not {"layer", "head", column} <= set(frame.columns):
        return None
    return rows.select(frame) if rows else frame


def head_labels(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Long table (layer, head, label): one row per label a head carries."""
    rows = []
    for _, label in overview_labels():
        frame = _usable(frames, label.report, label.column, label.rows)
        if frame is None:
            continue
        hits = frame[label.selects(frame).to_numpy()][["layer", "head"]].drop_duplicates()
        rows.append(hits.assign(label=label.name))
    if not rows:
        return pd.DataFrame({"layer": pd.Series(dtype="int64"), "head": pd.Series(dtype="int64"), "label": pd.Series(dtype="string")})
    return pd.concat(rows, ignore_index=True)


def head_table(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per head: each detector's score (the detectors that ran) and the head's labels."""
    columns = []
    for _, score in overview_scores():
        frame = _usable(frames, score.report, score.column, score.rows)
        if frame is not None:
            columns.append(score.per_head(frame))
    if not columns:
        return pd.DataFrame(columns=["layer", "head", "labels"])
    table = pd.concat(columns, axis=1).sort_index().reset_index()
    labels = head_labels(frames).groupby(["layer", "head"])["label"].agg(lambda names: ", ".join(names))
    table = table.merge(labels.rename("labels").reset_index(), on=["layer", "head"], how="left")
    table["labels"] = table["labels"].fillna("")
    return table


def score_columns(table: pd.DataFrame) -> list[str]:
    return [score.name for _, score in overview_scores() if score.name in table.columns]


def correlations(table: pd.DataFrame) -> pd.DataFrame:
    """Spearman rank correlation between every pair of detector scores, over the heads scored by both."""
    scores = table[score_columns(table)]
    return scores.corr(method="spearman", min_periods=3)


@view("overview.labels", title="Head labels across detectors", optional=overview_reports)
def labels_grid(frames):
    labels = head_labels(frames)
    shape = _grid_shape(frames)
    title = "Head census: labels across detectors"
    if shape is None:
        return no_data(title, "no head-level reports in this run", width="double")
    n_layers, n_heads = shape
    counts = labels.groupby(["layer", "head"]).size().rename("n").reset_index()
    grid = pd.DataFrame([(layer, head) for layer in range(n_layers) for head in range(n_heads)], columns=["layer", "head"])
    grid = grid.merge(counts, on=["layer", "head"], how="left").fillna({"n": 0})
    per_head = labels.groupby(["layer", "head"])["label"].agg(", ".join)
    grid["text"] = [per_head.get((layer, head), "no label") for layer, head in zip(grid["layer"], grid["head"])]
    fig = go.Figure(
        go.Heatmap(
            z=head_grid(grid, "n").to_numpy(dtype=float),
            x=list(range(n_layers)),
            y=list(range(n_heads)),
            colorscale=[[0, "#FFFFFF"], [1, "#BDBDBD"]],
            zmin=0,
            zmax=max(3, float(grid["n"].max())),
            xgap=1,
            ygap=1,
            showscale=False,
            customdata=_cell_text(grid, n_layers, n_heads),
            hovertemplate="layer %{x}, head %{y}: %{customdata}<extra></extra>",
        )
    )
    for detector, label in overview_labels():
        hits = labels[labels["label"] == label.name]
        if hits.empty:
            continue
        dx, dy = label.offset
        fig.add_trace(
            go.Scatter(
                x=hits["layer"] + dx,
                y=hits["head"] + dy,
                mode="markers",
                name=f"{label.name} ({len(hits)})",
                showlegend=True,  # also when a single label is present
                marker=dict(symbol=label.symbol, size=5, color=label_color(detector, label), line=dict(color="black", width=0.4)),
                hoverinfo="skip",
            )
        )
    fig.update_layout(
        title=title,
        xaxis=dict(title="layer", dtick=5 if n_layers > 12 else 1, range=[-0.5, n_layers - 0.5], showgrid=False, mirror=True),
        yaxis=dict(title="head", dtick=1 if n_heads <= 12 else 4, range=[-0.5, n_heads - 0.5], showgrid=False, mirror=True),
        legend=dict(orientation="h", x=1, xanchor="right", y=1.02, yanchor="bottom"),
        margin=dict(b=44),
    )
    return styled(fig, width="double", height_in=max(1.6, 1.0 + 0.18 * n_heads))


def _cell_text(grid: pd.DataFrame, n_layers: int, n_heads: int) -> np.ndarray:
    cells = np.full((n_heads, n_layers), "", dtype=object)
    for layer, head, text in zip(grid["layer"], grid["head"], grid["text"]):
        cells[head, layer] = text
    return cells


def _grid_shape(frames: dict[str, pd.DataFrame]) -> tuple[int, int] | None:
    heads = [f[["layer", "head"]] for f in frames.values() if f is not None and not f.empty and {"layer", "head"} <= set(f.columns)]
    if not heads:
        return None
    both = pd.concat(heads)
    return int(both["layer"].max()) + 1, int(both["head"].max()) + 1


@view("overview.correlations", title="Correlations between detector scores", optional=overview_reports, min_optional=2)
def correlation_matrix(frames):
    table = head_table(frames)
    columns = score_columns(table)
    title = "Spearman correlation between detector scores (per head)"
    if len(columns) < 2:
        return no_data(title, f"needs two detectors' scores; this run has {', '.join(columns) or 'none'}")
    matrix = correlations(table)
    fig = go.Figure(
        go.Heatmap(
            z=matrix.to_numpy(),
            x=columns,
            y=columns,
            zmin=-1,
            zmax=1,
            colorscale=DIVERGING,
            text=np.vectorize(lambda v: "" if np.isnan(v) else f"{v:.2f}")(matrix.to_numpy()),
            texttemplate="%{text}",
            colorbar=dict(title=dict(text="Spearman ρ", side="right"), thickness=8),
            hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>",
        )
    )
    fig.update_layout(title=title, yaxis=dict(autorange="reversed"), xaxis=dict(tickangle=-30))
    return styled(fig, width="single", height_in=3.0)


# -- two runs or two models ---------------------------------------------------------------------


@dataclass
class RunFrames:
    run_id: str
    model: str
    frames: dict[str, pd.DataFrame]

    @property
    def name(self) -> str:
        return f"{self.model} ({self.run_id})"


def load_run(store, run_id: str) -> RunFrames:
    from lens.views._registry import VIEWS

    runs = store.runs(run_id=run_id)
    if runs.empty:
        raise LookupError(f"no finished run {run_id!r} in {store.path}")
    frames = read_frames(store, VIEWS["overview.labels"], run_id=run_id)
    return RunFrames(run_id, str(runs["model"].iloc[0]), frames)


def compare_labels(a: RunFrames, b: RunFrames) -> go.Figure:
    """Percent of heads carrying each label, in run A (solid) and run B (hatched), in the label's colour."""
    title = f"Head labels: A = {a.name} vs B = {b.name}"
    counts = label_counts(a, b)
    if counts.empty:
        return no_data(title, "neither run has head labels", width="double")
    fig = go.Figure()
    # One trace per (label, run), so each bar has one colour; A and B share a legend entry each.
    for which, pattern in (("A", ""), ("B", "/")):
        for row in counts.itertuples():
            fig.add_trace(
                go.Bar(
                    x=[row.label],
                    y=[getattr(row, f"percent_{which}")],
                    name=which,
                    offsetgroup=which,
                    legendgroup=which,
                    showlegend=row.Index == 0,
                    marker=dict(color=row.color, pattern=dict(shape=pattern, fgcolor="black", size=4), line=dict(color="black", width=0.5)),
                    hovertemplate="%{x}: %{y:.1f}% of heads<extra>" + which + "</extra>",
                )
            )
    fig.update_layout(title=title, barmode="group", yaxis_title="% of heads", legend=dict(orientation="h", x=1, xanchor="right", y=1.02, yanchor="bottom"))
    return styled(fig, width="double", height_in=2.4)


def label_counts(a: RunFrames, b: RunFrames) -> pd.DataFrame:
    """Per label: heads labelled in A and B, their percent of all heads, and (same architecture) the Jaccard overlap."""
    labels_a, labels_b = head_labels(a.frames), head_labels(b.frames)
    shape_a, shape_b = _grid_shape(a.frames), _grid_shape(b.frames)
    same_shape = shape_a is not None and shape_a == shape_b
    rows = []
    for detector, label in overview_labels():
        heads_a = set(zip(*labels_a[labels_a["label"] == label.name][["layer", "head"]].to_numpy().T)) if len(labels_a) else set()
        heads_b = set(zip(*labels_b[labels_b["label"] == label.name][["layer", "head"]].to_numpy().T)) if len(labels_b) else set()
        ran_a = _usable(a.frames, label.report, label.column, label.rows) is not None
        ran_b = _usable(b.frames, label.report, label.column, label.rows) is not None
        if not (ran_a or ran_b):
            continue
        union = heads_a | heads_b
        rows.append(
            {
                "label": label.name,
                "color": label_color(detector, label),
                "heads_A": len(heads_a) if ran_a else np.nan,
                "heads_B": len(heads_b) if ran_b else np.nan,
                "percent_A": 100 * len(heads_a) / np.prod(shape_a) if ran_a else np.nan,
                "percent_B": 100 * len(heads_b) / np.prod(shape_b) if ran_b else np.nan,
                "jaccard": len(heads_a & heads_b) / len(union) if same_shape and ran_a and ran_b and union else np.nan,
            }
        )
    return pd.DataFrame(rows)


def compare_scores(a: RunFrames, b: RunFrames) -> go.Figure:
    """Each detector score in both runs: head by head when the architectures match, else by relative depth."""
    table_a, table_b = head_table(a.frames), head_table(b.frames)
    shared = [c for c in score_columns(table_a) if c in score_columns(table_b)]
    title = f"Detector scores: A = {a.name} vs B = {b.name}"
    if not shared:
        return no_data(title, "the runs share no detector score", width="double")
    same_shape = _grid_shape(a.frames) == _grid_shape(b.frames)
    n_cols = min(3, len(shared))
    n_rows = -(-len(shared) // n_cols)
    titles = [_score_title(c, table_a, table_b, same_shape) for c in shared]
    fig = make_subplots(rows=n_rows, cols=n_cols, subplot_titles=titles, horizontal_spacing=0.12, vertical_spacing=0.3 / n_rows)
    for index, column in enumerate(shared):
        row, col = index // n_cols + 1, index % n_cols + 1
        color = detector_color(next(detector for detector, score in overview_scores() if score.name == column))
        if same_shape:
            paired = _paired(column, table_a, table_b)
            fig.add_trace(
                go.Scatter(
                    x=paired["A"],
                    y=paired["B"],
                    mode="markers",
                    marker=dict(color=color, size=4, opacity=0.8),
                    text=[head_label(layer, head) for layer, head in zip(paired["layer"], paired["head"])],
                    hovertemplate="%{text}: A %{x:.3g}, B %{y:.3g}<extra></extra>",
                    showlegend=False,
                ),
                row=row,
                col=col,
            )
            low, high = float(paired[["A", "B"]].min().min()), float(paired[["A", "B"]].max().max())
            fig.add_trace(go.Scatter(x=[low, high], y=[low, high], mode="lines", line=dict(color=NEUTRAL, dash="dash", width=1), hoverinfo="skip", showlegend=False), row=row, col=col)
            fig.update_xaxes(title_text="A", row=row, col=col)
            fig.update_yaxes(title_text="B", row=row, col=col)
        else:
            for which, table, dash in (("A", table_a, "solid"), ("B", table_b, "dash")):
                depth = table.groupby("layer")[column].mean()
                relative = depth.index / max(depth.index.max(), 1)
                fig.add_trace(
                    go.Scatter(x=relative, y=depth.to_numpy(), mode="lines+markers", name=which, line=dict(color=color, dash=dash, width=1.5), marker=dict(size=3), showlegend=index == 0),
                    row=row,
                    col=col,
                )
            fig.update_xaxes(title_text="relative depth", row=row, col=col)
    fig.update_layout(title=title, legend=dict(orientation="h", x=1, xanchor="right", y=1.0, yanchor="bottom"), margin=dict(t=50))
    fig.update_annotations(font_size=8)
    return styled(fig, width="double", height_in=0.4 + 2.2 * n_rows)


def _paired(column: str, table_a: pd.DataFrame, table_b: pd.DataFrame) -> pd.DataFrame:
    """Heads scored in both runs: columns layer, head, A, B."""
    paired = table_a[["layer", "head", column]].merge(table_b[["layer", "head", column]], on=["layer", "head"], suffixes=("_A", "_B"))
    return paired.rename(columns={f"{column}_A": "A", f"{column}_B": "B"}).dropna()


def _score_title(column: str, table_a: pd.DataFrame, table_b: pd.DataFrame, same_shape: bool) -> str:
    if not same_shape:
        return f"{column} (mean per layer)"
    paired = _paired(column, table_a, table_b)
    # Spearman as the Pearson correlation of ranks (pandas' Series.corr would need scipy).
    rho = paired["A"].rank().corr(paired["B"].rank()) if len(paired) > 2 else np.nan
    return f"{column}: ρ = {rho:.2f}" if np.isfinite(rho) else column
