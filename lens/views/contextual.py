"""Views of the contextual detector: which heads attend to the gold document, and what focus directions
change on held-out probes (answer accuracy and the top heads' gold-document attention, by gold position)."""

from __future__ import annotations

import plotly.graph_objects as go

from lens.views._registry import view
from lens.views.charts import layer_head_heatmap, no_data
from lens.views.style import NEUTRAL, detector_color, styled

COLOR = detector_color("contextual")
TOP_K = 20  # heads marked on the heatmap: the paper's k


@view("contextual.heatmap", title="Contextual score per head", reports=("contextual",))
def heatmap(frames):
    contextual = frames["contextual"].assign(top=lambda f: f["rank"] <= TOP_K)
    return layer_head_heatmap(
        contextual,
        "contextual_score",
        title="Attention of the answer on the gold document",
        colorbar="gold mass",
        zmin=0,
        mark="top",
        mark_name=f"top {TOP_K}",
    )


def _by_position(frames, value: str, *, title: str, axis_title: str, fixed_range: bool):
    effect = frames["focus_effect"].dropna(subset=[value])
    if effect.empty:
        return no_data(title, "no held-out probes with this value in this run")
    fig = go.Figure()
    for focus, color, dash, name in ((False, NEUTRAL, "dash", "without focus"), (True, COLOR, "solid", "with focus")):
        rows = effect[effect["focus"] == focus].sort_values("gold_position")
        fig.add_trace(
            go.Scatter(
                x=rows["gold_position"],
                y=rows[value],
                mode="lines+markers",
                name=name,
                line=dict(color=color, dash=dash, width=1.5),
                marker=dict(size=5),
                customdata=rows["n_probes"],
                hovertemplate="gold at %{x}: %{y:.3g} (%{customdata} probes)<extra>" + name + "</extra>",
            )
        )
    k, scale = int(effect["top_k"].iloc[0]), float(effect["scale"].iloc[0])
    fig.update_layout(
        title=f"{title} (top {k} heads, scale {scale:g})",
        xaxis=dict(title="gold document position", tickvals=sorted(effect["gold_position"].unique())),
        yaxis=dict(title=axis_title, range=[0, 1.02] if fixed_range else None, rangemode="tozero"),
        legend=dict(orientation="h", x=1, xanchor="right", y=1.02, yanchor="bottom"),
    )
    return styled(fig, width="single")


@view("contextual.accuracy_by_position", title="Held-out accuracy against gold position, with and without focus", reports=("focus_effect",))
def accuracy_by_position(frames):
    return _by_position(frames, "accuracy", title="Held-out accuracy", axis_title="accuracy", fixed_range=True)


@view("contextual.focus_shift", title="Gold-document attention of the top heads, with and without focus", reports=("focus_effect",))
def focus_shift(frames):
    return _by_position(frames, "gold_mass_top_heads", title="Gold-document mass", axis_title="attention mass", fixed_range=False)
