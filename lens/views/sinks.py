"""Views of the ``sinks`` report: which heads park attention on the first token, and where in depth."""

from __future__ import annotations

from lens.views.charts import add_per_layer, layer_head_heatmap, per_layer, ranked_bar
from lens.views.style import detector_color
from lens.views._registry import view

COLOR = detector_color("sinks")


def _eps(frame) -> float | None:
    return float(frame["eps"].iloc[0]) if len(frame) else None


@view("sinks.heatmap", title="First-token sink score per head", reports=("sinks",))
def heatmap(frames):
    sinks = frames["sinks"]
    eps = _eps(sinks)
    return layer_head_heatmap(
        sinks,
        "sink_score",
        title="First-token attention per head (Sink<sub>1</sub>)",
        colorbar="sink score",
        zmin=0,
        zmax=1,
        mark="is_sink",
        mark_name=f"sink head (score > {eps:g})" if eps is not None else "sink head",
    )


@view("sinks.first_token_mass", title="First-token attention per layer", reports=("sinks",))
def first_token_mass(frames):
    sinks = frames["sinks"]
    fig = per_layer(
        sinks,
        "sink_score",
        title="Attention on the first token, by layer",
        name="first token",
        color=COLOR,
        axis_title="attention mass",
        threshold=_eps(sinks),
        threshold_label="eps",
    )
    if len(sinks):
        add_per_layer(fig, sinks, "sink_mass_first4", color=COLOR, name="first 4 tokens", dash="dot")
        fig.update_yaxes(range=[0, 1.02])
    return fig


@view("sinks.top_heads", title="Strongest first-token sinks", reports=("sinks",))
def top_heads(frames):
    sinks = frames["sinks"]
    return ranked_bar(
        sinks, "sink_score", title="Top heads by first-token sink score", color=COLOR, axis_title="sink score", threshold=_eps(sinks), threshold_label="eps"
    )
