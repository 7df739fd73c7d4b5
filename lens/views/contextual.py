"""Views of the contextual detector: which heads attend to the gold document (with 95% intervals over
probes), how the focus directions trained (loss curves, the kept epoch) and what they change on
held-out questions (the top heads' gold-document attention and answer accuracy, by gold position and
by scale), every estimate with its interval and n."""

from __future__ import annotations

import plotly.graph_objects as go

from lens.views._registry import view
from lens.views.charts import layer_head_heatmap, no_data, ranked_bar
from lens.views.style import NEUTRAL, detector_color, styled

COLOR = detector_color("contextual")
TOP_K = 20  # heads marked on the heatmap and ranked: the paper's k


def _error_y(rows, value: str, low: str, high: str, color: str) -> dict:
    return dict(type="data", symmetric=False, array=(rows[high] - rows[value]).tolist(), arrayminus=(rows[value] - rows[low]).tolist(),
                color=color, thickness=1.2, width=3)


@view("contextual.heatmap", title="Contextual score per head", reports=("contextual",))
def heatmap(frames):
    contextual = frames["contextual"].assign(top=lambda f: f["rank"] <= TOP_K)
    n = int(contextual["n_probes"].iloc[0]) if len(contextual) else 0
    return layer_head_heatmap(
        contextual,
        "contextual_score",
        title=f"Attention of the answer on the gold document (mean of n={n} probes)",
        colorbar="gold mass",
        zmin=0,
        mark="top",
        mark_name=f"top {TOP_K}",
    )


@view("contextual.top_heads", title="Top contextual heads with 95% intervals over probes", reports=("contextual",))
def top_heads(frames):
    """Overlapping bars are ranks the probes cannot tell apart."""
    contextual = frames["contextual"].dropna(subset=["contextual_score"])
    n = int(contextual["n_probes"].iloc[0]) if len(contextual) else 0
    fig = ranked_bar(contextual, "contextual_score", title=f"Top {TOP_K} contextual heads (95% CI, n={n} probes)", color=COLOR,
                     axis_title="gold-document mass", top=TOP_K, width="double")
    if len(contextual):
        shown = contextual.sort_values("contextual_score", ascending=False, kind="stable").head(TOP_K)  # the bars' order
        fig.data[0].error_y = _error_y(shown, "contextual_score", "ci_low", "ci_high", NEUTRAL)
    return fig


def _by_position(frames, value: str, low: str, high: str, *, title: str, axis_title: str, fixed_range: bool):
    effect = frames["focus_effect"]
    effect = effect[(effect["gold_position"] >= 0) & effect["scale"].isin([0.0, 1.0])].dropna(subset=[value])
    if effect.empty:
        return no_data(title, "no held-out probes with this value in this run")
    fig = go.Figure()
    for scale, color, dash, name in ((0.0, NEUTRAL, "dash", "without focus"), (1.0, COLOR, "solid", "with focus")):
        rows = effect[effect["scale"] == scale].sort_values("gold_position")
        fig.add_trace(
            go.Scatter(
                x=rows["gold_position"] + (0.08 if scale else -0.08),  # side by side, so the bars do not hide each other
                y=rows[value],
                mode="lines+markers",
                name=name,
                line=dict(color=color, dash=dash, width=1.5),
                marker=dict(size=5),
                error_y=_error_y(rows, value, low, high, color),
                customdata=rows[["gold_position", "n_probes"]],
                hovertemplate="gold at %{customdata[0]}: %{y:.3g} (n=%{customdata[1]} probes)<extra>" + name + "</extra>",
            )
        )
    n = sorted(set(effect["n_probes"]))
    k = int(effect["top_k"].iloc[0])
    fig.update_layout(
        title=f"{title} (top {k} heads; 95% CI, n={'/'.join(map(str, n))} held-out probes a position)",
        xaxis=dict(title="gold document position", tickvals=sorted(effect["gold_position"].unique())),
        yaxis=dict(title=axis_title, range=[0, 1.02] if fixed_range else None, rangemode="tozero"),
        legend=dict(orientation="h", x=1, xanchor="right", y=1.02, yanchor="bottom"),
    )
    return styled(fig, width="single")


@view("contextual.accuracy_by_position", title="Held-out accuracy against gold position, with and without focus", reports=("focus_effect",))
def accuracy_by_position(frames):
    return _by_position(frames, "accuracy", "accuracy_ci_low", "accuracy_ci_high", title="Held-out accuracy", axis_title="accuracy (Wilson 95% CI)", fixed_range=True)


@view("contextual.focus_shift", title="Gold-document attention of the top heads, with and without focus", reports=("focus_effect",))
def focus_shift(frames):
    return _by_position(frames, "gold_mass_top_heads", "gold_mass_ci_low", "gold_mass_ci_high", title="Gold-document mass",
                        axis_title="attention mass (bootstrap 95% CI)", fixed_range=False)


@view("contextual.scale_sweep", title="Held-out effect of the focus directions against their scale", reports=("focus_effect",))
def scale_sweep(frames):
    """Every held-out probe together, per scale (0: without; 1: as trained; others: ``scale_sweep``)."""
    effect = frames["focus_effect"]
    pooled = effect[effect["gold_position"] == -1].sort_values("scale")
    title = "Focus directions by scale"
    if pooled.empty:
        return no_data(title, "no held-out probes in this run")
    fig = go.Figure()
    for value, low, high, color, name, axis in (
        ("gold_mass_top_heads", "gold_mass_ci_low", "gold_mass_ci_high", COLOR, "gold-document mass", "y"),
        ("accuracy", "accuracy_ci_low", "accuracy_ci_high", NEUTRAL, "accuracy", "y2"),
    ):
        rows = pooled.dropna(subset=[value])
        fig.add_trace(go.Scatter(x=rows["scale"], y=rows[value], mode="lines+markers", name=name, yaxis=axis, line=dict(color=color, width=1.5),
                                 error_y=_error_y(rows, value, low, high, color), customdata=rows["n_probes"],
                                 hovertemplate="scale %{x:g}: %{y:.3g} (n=%{customdata} probes)<extra>" + name + "</extra>"))
    n = int(pooled["n_probes"].iloc[0])
    fig.update_layout(
        title=f"{title} (top {int(pooled['top_k'].iloc[0])} heads; 95% CI, n={n} held-out probes)",
        xaxis=dict(title="scale (1 = as trained)", tickvals=pooled["scale"].tolist()),
        yaxis=dict(title="top heads' gold-document mass", rangemode="tozero"),
        yaxis2=dict(title="accuracy", overlaying="y", side="right", range=[0, 1.02], showgrid=False),
        legend=dict(orientation="h", x=1, xanchor="right", y=1.02, yanchor="bottom"),
    )
    return styled(fig, width="single")


@view("contextual.training", title="Focus-direction training curve", reports=("contextual_training",))
def training(frames):
    """Loss = minus the top heads' gold-document mass (the reference's); training stops when the
    validation loss has not improved for ``patience`` epochs and keeps the best epoch."""
    curve = frames["contextual_training"].sort_values("epoch")
    title = "Focus-direction training"
    if curve.empty:
        return no_data(title, "no focus training in this run (it needs training, validation and held-out questions)")
    fig = go.Figure()
    for value, color, dash, name in (("train_loss", NEUTRAL, "dash", "training"), ("validation_loss", COLOR, "solid", "validation")):
        fig.add_trace(go.Scatter(x=curve["epoch"], y=curve[value], mode="lines+markers", name=name, line=dict(color=color, dash=dash, width=1.5),
                                 marker=dict(size=4), customdata=curve["step"],
                                 hovertemplate="epoch %{x} (step %{customdata}): %{y:.4f}<extra>" + name + "</extra>"))
    kept = curve[curve["kept"]]
    fig.add_trace(go.Scatter(x=kept["epoch"], y=kept["validation_loss"], mode="markers", name="kept",
                             marker=dict(color=COLOR, size=10, symbol="circle-open", line=dict(width=2))))
    n_train, n_validation = int(curve["n_train"].iloc[0]), int(curve["n_validation"].iloc[0])
    fig.update_layout(
        title=f"{title} (n={n_train} training, {n_validation} validation probes)",
        xaxis=dict(title="epoch (one training probe a step)"),
        yaxis=dict(title="loss = minus gold-document mass"),
        legend=dict(orientation="h", x=1, xanchor="right", y=1.02, yanchor="bottom"),
    )
    return styled(fig, width="single")
