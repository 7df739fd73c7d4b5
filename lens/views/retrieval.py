"""Views of the retrieval detector: which heads copy the needle, how sparse they are, whether masking them
breaks retrieval (top-K against random heads), and where in the haystack the model finds the needle."""

from __future__ import annotations

import plotly.graph_objects as go

from lens.views._registry import view
from lens.views.charts import _transparent, layer_head_heatmap, no_data, ranked_bar
from lens.views.style import NEUTRAL, SEQUENTIAL, detector_color, styled

COLOR = detector_color("retrieval")


def _threshold(frame) -> float | None:
    return float(frame["threshold"].iloc[0]) if len(frame) else None


def _counted_note(frame) -> str:
    return f" ({int(frame['n_counted'].iloc[0])} of {int(frame['n_trials'].iloc[0])} trials counted)" if len(frame) else ""


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
    scores = frames["retrieval"]
    n_over = int(scores["is_retrieval"].sum()) if len(scores) else 0
    return ranked_bar(
        scores,
        "retrieval_score",
        title=f"Top {top} heads by retrieval score: {n_over} of {len(scores)} over the line",
        color=COLOR,
        axis_title="retrieval score",
        top=top,
        threshold=_threshold(scores),
        threshold_label="retrieval head >",
        width="double",
    )


@view("retrieval.ablation", title="Needle accuracy with heads masked", reports=("retrieval_ablation",))
def ablation(frames, value: str = "accuracy"):
    """``value`` ("accuracy" or "mean_recall") against K: the top-K heads masked, and K random heads with
    the range over draws as a band and each draw as a dot."""
    table = frames["retrieval_ablation"]
    title = "Needle retrieval, K heads masked"
    if table.empty:
        return no_data(title, "no ablation in this run", width="single")
    fig = go.Figure()
    random_rows = table[table["condition"] == "random"]
    spread = random_rows.groupby("k")[value].agg(["mean", "min", "max"]).sort_index()
    ks = spread.index.to_numpy()
    fig.add_trace(
        go.Scatter(
            x=list(ks) + list(ks[::-1]), y=list(spread["max"]) + list(spread["min"][::-1]), fill="toself",
            fillcolor=_transparent(NEUTRAL, 0.2), line=dict(width=0), hoverinfo="skip", showlegend=False, legendgroup="random",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=random_rows["k"], y=random_rows[value], mode="markers", marker=dict(color=NEUTRAL, size=4, symbol="circle-open"),
            name="random draws", legendgroup="random", customdata=random_rows[["draw", "heads"]],
            hovertemplate="K=%{x}, draw %{customdata[0]}: %{y:.2f}<br>%{customdata[1]}<extra></extra>",
        )
    )
    fig.add_trace(
        go.Scatter(x=ks, y=spread["mean"], mode="lines", line=dict(color=NEUTRAL, width=1.5, dash="dash"), name="random heads (mean)",
                   legendgroup="random", hovertemplate="K=%{x}: mean %{y:.2f}<extra>random</extra>")
    )
    top = table[table["condition"] == "top"].sort_values("k")
    fig.add_trace(
        go.Scatter(
            x=top["k"], y=top[value], mode="lines+markers", line=dict(color=COLOR, width=2), marker=dict(size=5), name="top retrieval heads",
            customdata=top[["heads"]], hovertemplate="K=%{x}: %{y:.2f}<br>%{customdata[0]}<extra>top</extra>",
        )
    )
    mask = table["mask"].iloc[0]
    where = "every position" if bool(table["mask_prompt"].iloc[0]) else "answer steps only"
    fig.update_layout(
        title=title,
        xaxis=dict(title=f"K heads masked ({'zeroed query' if mask == 'query' else 'zeroed output'}, {where})", tickvals=list(ks)),
        yaxis=dict(title=f"{value.replace('_', ' ')} ({int(table['n_trials'].iloc[0])} trials)", range=[-0.03, 1.03]),
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
    fig = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(dtype=float), x=[str(c) for c in grid.columns], y=[f"{d:.0%}" for d in grid.index], colorscale=SEQUENTIAL,
            zmin=0, zmax=1, xgap=1, ygap=1, colorbar=dict(title=dict(text="recall", side="right"), thickness=8, len=0.9),
            hovertemplate="length %{x}, depth %{y}: recall %{z:.2f}<extra></extra>",
        )
    )
    fig.update_layout(title=title, xaxis=dict(title="haystack tokens", type="category"), yaxis=dict(title="needle depth", type="category", autorange="reversed"))
    return styled(fig, width="single", height_in=2.2)

