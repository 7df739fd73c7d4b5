"""Views of the circuits detector: per-task head importance side by side, the faithfulness curve (heads
kept on x, with its bootstrap band), the task x task overlap of in-circuit heads (with intervals and the
stratified p-value), which in-circuit heads are shared and which unique, and how the fast attribution
methods agree with exact patching."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lens.views.charts import _transparent, add_threshold, head_grid, head_label, no_data
from lens.views.style import CATEGORICAL, DIVERGING, NEUTRAL, SEQUENTIAL, detector_color, styled
from lens.views._registry import view

COLOR = detector_color("circuits")
METHOD_LABELS = {"patching": "exact patching", "path_patching": "path patching", "attribution": "attribution patching", "eap_ig": "EAP-IG"}


def _exact(heads: pd.DataFrame) -> pd.DataFrame:
    return heads[heads["method"] == "patching"]


@view("circuits.faithfulness", title="Faithfulness curve: heads kept against the share of the task kept", reports=("circuit_faithfulness", "circuit_tasks"))
def faithfulness_curve(frames):
    curve = frames["circuit_faithfulness"]
    title = "Normalised faithfulness of the top-k heads (others mean-ablated)"
    if curve.empty:
        return no_data(title, "no faithfulness rows in this run", width="double")
    n_pairs = dict(zip(frames["circuit_tasks"]["task"], frames["circuit_tasks"]["n_pairs"]))
    fig = go.Figure()
    for color, (task, rows) in zip(CATEGORICAL, curve.groupby("task", sort=False)):
        rows = rows[rows["n_heads"] > 0].sort_values("n_heads")  # log axis: k = 0 is the ablated baseline, 0 by definition
        x = rows["n_heads"].tolist()
        fig.add_trace(go.Scatter(x=x + x[::-1], y=rows["ci_high"].tolist() + rows["ci_low"].tolist()[::-1], fill="toself", mode="lines",
                                 line=dict(width=0), fillcolor=_transparent(color, 0.2), hoverinfo="skip", showlegend=False))
        fig.add_trace(go.Scatter(x=x, y=rows["faithfulness"], mode="lines", name=f"{task} (n={n_pairs.get(task, '?')} pairs)", line=dict(color=color, width=1.2),
                                 hovertemplate="%{x} heads: %{y:.3f}<extra>" + task + "</extra>"))
        cut = rows[rows["is_cut"]]
        fig.add_trace(go.Scatter(x=cut["n_heads"], y=cut["faithfulness"], mode="markers", marker=dict(color=color, size=6, symbol="diamond"),
                                 showlegend=False, hovertemplate="cut at %{x} heads: %{y:.3f}<extra>" + task + "</extra>"))
    add_threshold(fig, 1.0, "full model")
    fig.update_layout(title=title, xaxis_title="heads kept (top by |exact patching score|)", xaxis_type="log", yaxis_title="normalised faithfulness",
                      legend=dict(font=dict(size=7)))
    return styled(fig, width="double", height_in=2.6)


@view("circuits.importance", title="Head importance per task, side by side", reports=("circuit_heads",))
def importance(frames):
    heads = _exact(frames["circuit_heads"])
    title = "Exact patching score per head and task"
    if heads.empty:
        return no_data(title, "no circuit heads in this run", width="double")
    tasks = list(dict.fromkeys(heads["task"]))
    limit = float(heads["importance"].abs().max()) or 1.0
    fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=tasks, shared_yaxes=True, horizontal_spacing=0.02)
    for column, task in enumerate(tasks, start=1):
        rows = heads[heads["task"] == task]
        grid = head_grid(rows, "importance")
        fig.add_trace(
            go.Heatmap(
                z=grid.to_numpy(dtype=float),
                x=list(grid.columns),
                y=list(grid.index),
                colorscale=DIVERGING,
                zmin=-limit,
                zmax=limit,
                xgap=1,
                ygap=1,
                showscale=column == len(tasks),
                colorbar=dict(title=dict(text="patching score", side="right"), thickness=8, len=0.9),
                hovertemplate=task + "<br>layer %{x}, head %{y}<br>score = %{z:.3g}<extra></extra>",
            ),
            row=1,
            col=column,
        )
        circuit = rows[rows["in_circuit"]]
        fig.add_trace(
            go.Scatter(
                x=circuit["layer"],
                y=circuit["head"],
                mode="markers",
                name="in circuit",
                showlegend=column == 1,
                marker=dict(symbol="circle-open", size=6, color="black", line=dict(width=1.2)),
                hovertemplate="layer %{x}, head %{y}<extra>in circuit</extra>",
            ),
            row=1,
            col=column,
        )
        fig.update_xaxes(title_text="layer", dtick=10, row=1, col=column)
    fig.update_yaxes(title_text="head", dtick=1, row=1, col=1)
    fig.update_layout(title=title, legend=dict(orientation="h", x=1, xanchor="right", y=1.08, yanchor="bottom"))
    return styled(fig, width="double", height_in=2.2)


@view("circuits.overlap", title="Task x task overlap of in-circuit heads", reports=("circuit_overlap", "circuit_tasks"))
def overlap(frames, method: str = "patching"):
    pairs = frames["circuit_overlap"]
    pairs = pairs[pairs["method"] == method]
    tasks = list(frames["circuit_tasks"]["task"])
    title = f"Jaccard overlap of in-circuit heads ({METHOD_LABELS.get(method, method)})"
    tasks = [t for t, can in zip(tasks, frames["circuit_tasks"]["can_do"]) if can]
    if len(tasks) < 2:
        return no_data(title, "fewer than two tasks the model can do in this run")
    index = {task: i for i, task in enumerate(tasks)}
    values = np.eye(len(tasks))
    text = [["" for _ in tasks] for _ in tasks]
    sizes = dict(zip(frames["circuit_tasks"]["task"], frames["circuit_tasks"]["n_in_circuit"]))
    for task in tasks:
        text[index[task]][index[task]] = f"{sizes[task]} heads"
    for row in pairs.itertuples():
        i, j = index[row.task_a], index[row.task_b]
        values[i, j] = values[j, i] = row.jaccard
        label = f"{row.jaccard:.2f} [{row.jaccard_low:.2f}, {row.jaccard_high:.2f}]<br>{row.n_shared} shared ({row.null_shared:.1f} by chance)<br>p_adj={row.p_adjusted:.1g}"
        text[i][j] = text[j][i] = label
    fig = go.Figure(
        go.Heatmap(
            z=values,
            x=tasks,
            y=tasks,
            zmin=0,
            zmax=1,
            colorscale=SEQUENTIAL,
            text=text,
            texttemplate="%{text}",
            colorbar=dict(title=dict(text="Jaccard", side="right"), thickness=8, len=0.9),
            hovertemplate="%{y} ~ %{x}: %{text}<extra></extra>",
        )
    )
    fig.update_layout(title=title, yaxis=dict(autorange="reversed"))
    return styled(fig, width="single", height_in=3.0)


@view("circuits.shared_heads", title="Shared and unique in-circuit heads", reports=("circuit_heads",))
def shared_heads(frames):
    heads = _exact(frames["circuit_heads"])
    title = "In-circuit heads by task (shared first)"
    circuit = heads[heads["in_circuit"]]
    if circuit.empty:
        return no_data(title, "no in-circuit heads in this run")
    tasks = list(dict.fromkeys(heads["task"]))
    members = circuit.groupby(["layer", "head"])["task"].nunique().rename("n_tasks").reset_index()
    members = members.sort_values(["n_tasks", "layer", "head"], ascending=[False, True, True])
    labels = [head_label(layer, head) for layer, head in zip(members["layer"], members["head"])]
    scores = heads.set_index(["task", "layer", "head"])["importance"]
    inside = set(zip(circuit["task"], circuit["layer"], circuit["head"]))
    z = [[scores[(task, layer, head)] if (task, layer, head) in inside else np.nan for task in tasks] for layer, head in zip(members["layer"], members["head"])]
    limit = float(np.nanmax(np.abs(z))) or 1.0
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=tasks,
            y=labels,
            colorscale=DIVERGING,
            zmin=-limit,
            zmax=limit,
            xgap=2,
            ygap=2,
            colorbar=dict(title=dict(text="patching score", side="right"), thickness=8, len=0.9),
            hovertemplate="%{y} in %{x}: %{z:.3g}<extra></extra>",
        )
    )
    n_shared = int((members["n_tasks"] > 1).sum())
    if 0 < n_shared < len(members):
        fig.add_hline(y=n_shared - 0.5, line=dict(color=NEUTRAL, dash="dash", width=1))
    fig.update_layout(title=f"{title}: {n_shared} shared, {len(members) - n_shared} unique", yaxis=dict(autorange="reversed", type="category"))
    return styled(fig, width="single", height_in=max(2.0, 0.9 + 0.14 * len(labels)))


@view("circuits.method_agreement", title="Attribution methods against exact patching", reports=("circuit_heads",))
def method_agreement(frames, method: str = "eap_ig"):
    heads = frames["circuit_heads"]
    title = f"{METHOD_LABELS.get(method, method)} against exact patching, per head"
    if heads.empty:
        return no_data(title, "no circuit heads in this run")
    keys = ["task", "layer", "head"]
    paired = _exact(heads)[keys + ["importance"]].merge(heads[heads["method"] == method][keys + ["importance"]], on=keys, suffixes=("_exact", "_fast"))
    fig = go.Figure()
    for color, (task, rows) in zip(CATEGORICAL, paired.groupby("task", sort=False)):
        fig.add_trace(
            go.Scatter(
                x=rows["importance_exact"],
                y=rows["importance_fast"],
                mode="markers",
                name=task,
                marker=dict(size=4, color=color, opacity=0.8),
                text=[head_label(layer, head) for layer, head in zip(rows["layer"], rows["head"])],
                hovertemplate="%{text}: exact %{x:.3g}, fast %{y:.3g}<extra>" + task + "</extra>",
            )
        )
    low = float(min(paired["importance_exact"].min(), paired["importance_fast"].min()))
    high = float(max(paired["importance_exact"].max(), paired["importance_fast"].max()))
    fig.add_trace(go.Scatter(x=[low, high], y=[low, high], mode="lines", line=dict(color=NEUTRAL, dash="dash", width=1), name="y = x"))
    fig.update_layout(title=title, xaxis_title="exact patching score", yaxis_title=f"{METHOD_LABELS.get(method, method)} estimate", legend=dict(font=dict(size=7)))
    return styled(fig, width="single", height_in=2.8)
