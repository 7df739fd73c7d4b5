"""Views of the retrieval detector: which heads copy the needle (with each score's interval), how sparse
they are, whether masking them breaks retrieval (the paired effect against uniform and layer-matched
controls, with its interval), and where in the haystack the model finds the needle. Every figure says n."""

from __future__ import annotations

import plotly.graph_objects as go

from lens.views._registry import view
from lens.views.charts import layer_head_heatmap, no_data, ranked_bar
from lens.views.style import NEUTRAL, SEQUENTIAL, detector_color, styled
from metrics.uncertainty import proportion_interval

COLOR = detector_color("retrieval")


def _threshold(frame) -> float | None:
    return float(frame["threshold"].iloc[0]) if len(frame) else None


def _counted_note(frame) -> str:
    return f" (n={int(frame['n_counted'].iloc[0])} counted of {int(frame['n_trials'].iloc[0])} trials)" if len(frame) else ""


@view("retrieval.heatmap", title="Retrieval score per head", reports=("retrieval",))
def heatmap(frames):
    scores = frames["retrieval"]
    threshold = _threshold(scores)
    return layer_head_heatmap(
        scores,
        "retrieval_score",
        title="Retrieval score per head" + _counted_note(scores),
        colorbar="retrieval score",
        zmin=0,
        mark="is_retrieval",
        mark_name=f"retrieval head (score > {threshold:g})" if threshold is not None else "retrieval head",
    )


@view("retrieval.ranked", title="Retrieval scores ranked", reports=("retrieval",))
def ranked(frames, top: int = 30):
    """The top heads by rank (ties in the detector's seeded order) with each score's 95% interval over
    counted trials as error bars: overlapping bars are ranks the trials cannot tell apart."""
    scores = frames["retrieval"]
    n_over = int(scores["is_retrieval"].sum()) if len(scores) else 0
    n = int(scores["n_counted"].iloc[0]) if len(scores) else 0
    ordered = scores.sort_values("rank")
    fig = ranked_bar(
        ordered,
        "retrieval_score",
        title=f"Top {top} heads by retrieval score: {n_over} of {len(scores)} over the line (95% CI, n={n} counted trials)",
        color=COLOR,
        axis_title="retrieval score",
        top=top,
        threshold=_threshold(scores),
        threshold_label="retrieval head >",
        width="double",
    )
    if len(scores):
        shown = ordered.sort_values("retrieval_score", ascending=False, kind="stable").head(top)  # the bars' order
        fig.data[0].error_y = dict(type="data", symmetric=False, array=(shown["ci_high"] - shown["retrieval_score"]).tolist(),
                                   arrayminus=(shown["retrieval_score"] - shown["ci_low"]).tolist(), color=NEUTRAL, thickness=1, width=2)
    return fig


@view("retrieval.ablation", title="Masking effect of the top retrieval heads", reports=("retrieval_masking",))
def ablation(frames):
    """The causal test: per K, accuracy with the top list masked minus with a control masked (paired per
    trial), with its 95% interval, for the uniform and the layer-matched control. Below 0: the top heads
    matter more than heads drawn at random."""
    table = frames["retrieval_masking"]
    title = "Masking the top-K retrieval heads"
    run = table[table["status"] == "run"] if len(table) else table
    if run.empty:
        reason = table["status"].iloc[0] if len(table) else "no masking test in this run"
        return no_data(title, reason, width="single")
    fig = go.Figure()
    for (control, rows), color in zip(run.groupby("control", sort=True), (NEUTRAL, COLOR)):
        rows = rows.sort_values("k_requested")
        label = [f"{k}" if k == used else f"{k} ({used} used)" for k, used in zip(rows["k_requested"], rows["k_used"])]
        fig.add_trace(
            go.Scatter(
                x=label, y=rows["effect"], mode="markers", marker=dict(color=color, size=7), name=f"top minus {control.replace('_', '-')}",
                error_y=dict(type="data", symmetric=False, array=(rows["ci_high"] - rows["effect"]).tolist(),
                             arrayminus=(rows["effect"] - rows["ci_low"]).tolist(), color=color, thickness=1.2),
                customdata=rows[["top_accuracy", "control_accuracy", "p_holm", "n_trials"]],
                hovertemplate="K=%{x}: %{y:.2f} (top %{customdata[0]:.2f}, control %{customdata[1]:.2f}), "
                "Holm p=%{customdata[2]:.2g}, n=%{customdata[3]}<extra></extra>",
            )
        )
    fig.add_hline(y=0, line=dict(color=NEUTRAL, width=1, dash="dot"))
    n, draws = int(run["n_trials"].iloc[0]), int(run["n_draws"].iloc[0])
    mask = run["mask"].iloc[0]
    where = "every position" if bool(run["mask_prompt"].iloc[0]) else "answer steps only"
    fig.update_layout(
        title=title,
        xaxis=dict(title=f"K heads masked ({'zeroed query' if mask == 'query' else 'zeroed output'}, {where})", type="category"),
        yaxis=dict(title=f"accuracy difference, 95% CI (n={n} trials, {draws} draws)", range=[-1.05, 1.05]),
        legend=dict(orientation="h", x=1, xanchor="right", y=1.02, yanchor="bottom"),
    )
    return styled(fig, width="single", height_in=2.6)


@view("retrieval.needle_grid", title="Needle recall by depth and context length", reports=("retrieval_trials",))
def needle_grid(frames):
    """The classic needle-in-a-haystack chart: ROUGE-1 recall per (depth, length) cell, mean over needles."""
    trials = frames["retrieval_trials"]
    title = "Needle recall by depth and haystack length"
    if trials.empty:
        return no_data(title, "no trials in this run", width="single")
    grid = trials.pivot_table(index="depth", columns="length", values="recall", aggfunc="mean").sort_index()
    counts = trials.pivot_table(index="depth", columns="length", values="recall", aggfunc="count").reindex_like(grid)
    title = f"{title} (mean per cell, n={len(trials)} trials, {int(counts.min().min())}-{int(counts.max().max())} per cell)"
    fig = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(dtype=float), x=[str(c) for c in grid.columns], y=[f"{d:.0%}" for d in grid.index], colorscale=SEQUENTIAL,
            zmin=0, zmax=1, xgap=1, ygap=1, colorbar=dict(title=dict(text="recall", side="right"), thickness=8, len=0.9),
            customdata=counts.to_numpy(dtype=float), hovertemplate="length %{x}, depth %{y}: recall %{z:.2f} (n=%{customdata})<extra></extra>",
        )
    )
    fig.update_layout(title=title, xaxis=dict(title="haystack tokens", type="category"), yaxis=dict(title="needle depth", type="category", autorange="reversed"))
    return styled(fig, width="single", height_in=2.2)



@view("retrieval.recall_by", title="Needle recall by kind and haystack length", reports=("retrieval_trials",))
def recall_by(frames):
    """The fraction of trials that recalled the needle, per needle kind and per haystack length, with
    Wilson 95% intervals (each group's n on its label)."""
    trials = frames["retrieval_trials"]
    title = "Needle recall rate by kind and haystack length"
    if trials.empty:
        return no_data(title, "no trials in this run", width="single")
    fig = go.Figure()
    for column, color in (("kind", COLOR), ("length", NEUTRAL)):
        groups = trials.groupby(column, sort=True)["counted"]
        intervals = [proportion_interval(int(rows.sum()), len(rows)) for _, rows in groups]
        labels = [f"{value} (n={len(rows)})" for value, rows in groups]
        fig.add_trace(
            go.Scatter(
                x=labels, y=[i.estimate for i in intervals], mode="markers", marker=dict(color=color, size=7), name=f"by {column}",
                error_y=dict(type="data", symmetric=False, array=[i.high - i.estimate for i in intervals],
                             arrayminus=[i.estimate - i.low for i in intervals], color=color, thickness=1.2),
                hovertemplate="%{x}: %{y:.2f}<extra></extra>",
            )
        )
    fig.update_layout(
        title=f"{title} (n={len(trials)} trials)",
        xaxis=dict(type="category", tickangle=-45),
        yaxis=dict(title="recalled (ROUGE-1 > 0.5), Wilson 95% CI", range=[-0.03, 1.03]),
        legend=dict(orientation="h", x=1, xanchor="right", y=1.02, yanchor="bottom"),
    )
    return styled(fig, width="single", height_in=2.6)
