"""Shared chart builders for views: every detector plots heads the same way.

Each takes a report frame with ``layer`` and ``head`` columns (one row per head) and returns a styled
plotly figure; a view adds its own traces or annotations on top when it needs more.

- ``layer_head_heatmap``: one cell per head (layers across, heads up), optional markers on flagged heads;
- ``ranked_bar``: the top heads by a score, with the detector's threshold as a dashed line;
- ``per_layer``: a score per layer, mean over heads with the min-max band over heads;
- ``no_data``: an empty figure that says why (a view over a report with no rows).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from lens.views.style import NEUTRAL, SEQUENTIAL, styled


def head_label(layer: int, head: int) -> str:
    return f"L{int(layer)}.H{int(head)}"


def no_data(title: str, message: str, *, width: str | float = "single") -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(title=title, xaxis_visible=False, yaxis_visible=False)
    return styled(fig, width=width, height_in=1.2)


def head_grid(frame: pd.DataFrame, value: str) -> pd.DataFrame:
    """``value`` as a head x layer table covering every layer and head up to the largest seen (gaps are NaN)."""
    layers = range(int(frame["layer"].max()) + 1)
    heads = range(int(frame["head"].max()) + 1)
    grid = frame.pivot_table(index="head", columns="layer", values=value, aggfunc="mean")
    return grid.reindex(index=heads, columns=layers)


def layer_head_heatmap(
    frame: pd.DataFrame,
    value: str,
    *,
    title: str,
    colorbar: str,
    zmin: float | None = None,
    zmax: float | None = None,
    colorscale=SEQUENTIAL,
    zmid: float | None = None,
    mark: str | None = None,
    mark_name: str = "",
    mark_color: str = "white",
    width: str | float = "double",
) -> go.Figure:
    """Heads as cells (layer on x, head on y) coloured by ``value``; heads where the bool column ``mark``
    is true get an outlined dot, listed in the legend as ``mark_name``."""
    if frame.empty:
        return no_data(title, "no rows in this run", width=width)
    grid = head_grid(frame, value)
    fig = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(dtype=float),
            x=list(grid.columns),
            y=list(grid.index),
            colorscale=colorscale,
            zmin=zmin,
            zmax=zmax,
            zmid=zmid,
            xgap=1,
            ygap=1,
            colorbar=dict(title=dict(text=colorbar, side="right"), thickness=8, len=0.9),
            hovertemplate="layer %{x}, head %{y}<br>" + value + " = %{z:.4g}<extra></extra>",
        )
    )
    if mark is not None:
        flagged = frame[frame[mark].astype(bool)]
        fig.add_trace(
            go.Scatter(
                x=flagged["layer"],
                y=flagged["head"],
                mode="markers",
                name=mark_name or mark,
                showlegend=True,
                marker=dict(symbol="circle", size=5, color=mark_color, line=dict(color="black", width=0.8)),
                hovertemplate="layer %{x}, head %{y}<extra>" + (mark_name or mark) + "</extra>",
            )
        )
    n_layers, n_heads = grid.shape[1], grid.shape[0]
    fig.update_layout(
        title=title,
        xaxis=dict(title="layer", dtick=5 if n_layers > 12 else 1, range=[-0.5, n_layers - 0.5], showgrid=False, mirror=True),
        yaxis=dict(title="head", dtick=1 if n_heads <= 12 else 4, range=[-0.5, n_heads - 0.5], showgrid=False, mirror=True),
        legend=dict(orientation="h", x=1, xanchor="right", y=1.02, yanchor="bottom"),
        margin=dict(b=44),
    )
    return styled(fig, width=width, height_in=max(1.5, 0.9 + 0.16 * n_heads))


def ranked_bar(
    frame: pd.DataFrame,
    value: str,
    *,
    title: str,
    color: str,
    axis_title: str | None = None,
    top: int = 20,
    threshold: float | None = None,
    threshold_label: str = "threshold",
    width: str | float = "single",
) -> go.Figure:
    """The ``top`` heads by ``value``, highest first, with a dashed line at ``threshold``."""
    if frame.empty:
        return no_data(title, "no rows in this run", width=width)
    ranked = frame.sort_values(value, ascending=False, kind="stable").head(top)
    labels = [head_label(layer, head) for layer, head in zip(ranked["layer"], ranked["head"])]
    fig = go.Figure(go.Bar(x=labels, y=ranked[value], marker_color=color, hovertemplate="%{x}: %{y:.4g}<extra></extra>", showlegend=False))
    if threshold is not None:
        add_threshold(fig, threshold, threshold_label)
    fig.update_layout(
        title=title,
        xaxis=dict(tickangle=-90, type="category"),
        yaxis_title=axis_title or value,
        bargap=0.25,
        legend=dict(orientation="h", x=1, xanchor="right", y=1.02, yanchor="bottom"),
    )
    return styled(fig, width=width)


def per_layer(
    frame: pd.DataFrame,
    value: str,
    *,
    title: str,
    color: str,
    name: str | None = None,
    axis_title: str | None = None,
    threshold: float | None = None,
    threshold_label: str = "threshold",
    width: str | float = "single",
) -> go.Figure:
    """``value`` per layer: the mean over heads as a line, the range over heads as a shaded band."""
    if frame.empty:
        return no_data(title, "no rows in this run", width=width)
    fig = go.Figure()
    add_per_layer(fig, frame, value, color=color, name=name or value)
    if threshold is not None:
        add_threshold(fig, threshold, threshold_label)
    n_layers = int(frame["layer"].max()) + 1
    fig.update_layout(
        title=title,
        xaxis=dict(title="layer", dtick=5 if n_layers > 12 else 1),
        yaxis_title=axis_title or value,
        legend=dict(orientation="h", x=1, xanchor="right", y=1.02, yanchor="bottom"),
    )
    return styled(fig, width=width)


def add_threshold(fig: go.Figure, value: float, label: str) -> go.Figure:
    """A dashed horizontal line at ``value``, named in the legend as "label value"."""
    line = dict(color=NEUTRAL, dash="dash", width=1)
    fig.add_hline(y=value, line=line)
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=line, name=f"{label} {value:g}", showlegend=True, hoverinfo="skip"))
    return fig


def add_per_layer(fig: go.Figure, frame: pd.DataFrame, value: str, *, color: str, name: str, dash: str = "solid") -> go.Figure:
    """Add one per-layer series (mean line, min-max band) to ``fig``."""
    stats = frame.groupby("layer")[value].agg(["mean", "min", "max"]).sort_index()
    layers = stats.index.to_numpy()
    fig.add_trace(
        go.Scatter(
            x=np.concatenate([layers, layers[::-1]]),
            y=np.concatenate([stats["max"].to_numpy(), stats["min"].to_numpy()[::-1]]),
            fill="toself",
            fillcolor=_transparent(color, 0.2),
            line=dict(width=0),
            hoverinfo="skip",
            showlegend=False,
            legendgroup=name,
        )
    )
    fig.add_trace(
        go.Scatter(
            x=layers,
            y=stats["mean"],
            mode="lines+markers",
            name=name,
            legendgroup=name,
            line=dict(color=color, width=1.5, dash=dash),
            marker=dict(size=3),
            hovertemplate="layer %{x}: mean %{y:.4g}<extra>" + name + "</extra>",
        )
    )
    return fig


def _transparent(hex_color: str, alpha: float) -> str:
    red, green, blue = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({red},{green},{blue},{alpha})"
