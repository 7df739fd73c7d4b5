"""Views of the sinks detector: which heads park attention on the first token and where in depth (with
each head's 95% interval over probes); which tokens are sinks at which layers; how long tokens aligned
with the first token last (secondary sinks). Every figure of an estimate says its n."""

from __future__ import annotations

import plotly.graph_objects as go

from lens.views.charts import add_per_layer, layer_head_heatmap, no_data, per_layer, ranked_bar
from lens.views.style import NEUTRAL, OKABE_ITO, SEQUENTIAL, detector_color, styled
from lens.views._registry import view

COLOR = detector_color("sinks")
LABEL_COLORS = {"primary": OKABE_ITO["black"], "secondary": COLOR, "noise": NEUTRAL}


def _eps(frame) -> float | None:
    return float(frame["eps"].iloc[0]) if len(frame) else None


def _n(frame) -> str:
    return f"n={int(frame['n_prompts'].iloc[0])} probes" if len(frame) else "n=0"


@view("sinks.heatmap", title="First-token sink score per head", reports=("sinks",))
def heatmap(frames):
    sinks = frames["sinks"]
    eps = _eps(sinks)
    return layer_head_heatmap(
        sinks,
        "sink_score",
        title=f"First-token importance per head, mean over probes ({_n(sinks)})",
        colorbar="sink score",
        zmin=0,
        zmax=1,
        mark="is_sink",
        mark_name=f"sink on most probes (importance > {eps:g})" if eps is not None else "sink head",
    )


@view("sinks.first_token_mass", title="First-token attention per layer", reports=("sinks",))
def first_token_mass(frames):
    sinks = frames["sinks"]
    fig = per_layer(
        sinks,
        "sink_score",
        title=f"Attention on the first token, by layer (mean and range over heads; {_n(sinks)})",
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
def top_heads(frames, top: int = 20):
    """The top heads by mean first-token importance, with each head's 95% bootstrap interval over probes
    as error bars: heads whose bars overlap are ranks the probes cannot tell apart."""
    sinks = frames["sinks"]
    fig = ranked_bar(
        sinks,
        "sink_score",
        title=f"Top heads by first-token sink score (95% CI, {_n(sinks)})",
        color=COLOR,
        axis_title="sink score",
        top=top,
        threshold=_eps(sinks),
        threshold_label="eps",
    )
    if len(sinks):
        shown = sinks.sort_values("sink_score", ascending=False, kind="stable").head(top)
        fig.data[0].error_y = dict(
            type="data",
            symmetric=False,
            array=(shown["ci_high"] - shown["sink_score"]).fillna(0).tolist(),
            arrayminus=(shown["sink_score"] - shown["ci_low"]).fillna(0).tolist(),
            color=NEUTRAL,
            thickness=1,
            width=2,
        )
    return fig


def _strip_probe(tokens) -> str:
    """The probe with the most hidden-sink rows (ties: the first by name): the most to see in a strip."""
    hidden = tokens[~tokens["is_first"]].groupby("probe").size()
    counts = hidden.reindex(sorted(tokens["probe"].unique()), fill_value=0)
    return str(counts.idxmax())


@view("sinks.token_strip", title="Which tokens are sinks at which layers", reports=("sink_tokens", "secondary_sinks"))
def token_strip(frames, max_positions: int = 48):
    tokens, secondary = frames["sink_tokens"], frames["secondary_sinks"]
    title = "Sink tokens by layer"
    if tokens.empty:
        return no_data(title, "no sink tokens in this run")
    probe = _strip_probe(tokens)
    rows = tokens[tokens["probe"] == probe]
    heads = rows.groupby(["position", "layer"]).size().rename("heads").reset_index()
    # The most-attended positions when a long probe has more than fit across the page.
    busiest = heads.groupby("position")["heads"].sum().nlargest(max_positions).index
    heads = heads[heads["position"].isin(busiest)]
    positions = sorted(busiest)
    text = rows.drop_duplicates("position").set_index("position")["token"]
    labels = [f"{p} {text[p]!r}" for p in positions]
    n_layers = int(max(tokens["layer"].max(), secondary["last_layer"].max() if len(secondary) else 0)) + 1
    grid = heads.pivot(index="layer", columns="position", values="heads").reindex(index=range(n_layers), columns=positions)
    fig = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(dtype=float),
            x=labels,
            y=list(grid.index),
            colorscale=SEQUENTIAL,
            zmin=0,
            xgap=1,
            ygap=1,
            colorbar=dict(title=dict(text="heads", side="right"), thickness=8, len=0.9),
            hovertemplate="%{x}, layer %{y}: sink in %{z} heads<extra></extra>",
        )
    )
    aligned = secondary[(secondary["probe"] == probe) & (secondary["position"] > 0) & secondary["position"].isin(positions)]
    if len(aligned):
        spans = [(f"{p} {text[p]!r}", layer) for p, first, last in zip(aligned["position"], aligned["formation_layer"], aligned["last_layer"]) for layer in range(first, last + 1)]
        fig.add_trace(
            go.Scatter(
                x=[x for x, _ in spans],
                y=[y for _, y in spans],
                mode="markers",
                name="hidden state aligned with the first token",
                marker=dict(symbol="circle-open", size=5, color=COLOR, line=dict(width=1.2)),
                hovertemplate="%{x}, layer %{y}: secondary-sink span<extra></extra>",
            )
        )
    fig.update_layout(
        title=f"{title}: probe {probe}",
        xaxis=dict(title="token (position, text)", type="category", tickangle=-90, showgrid=False, mirror=True),
        yaxis=dict(title="layer", dtick=5 if n_layers > 12 else 1, range=[-0.5, n_layers - 0.5], showgrid=False, mirror=True),
        legend=dict(orientation="h", x=1, xanchor="right", y=1.02, yanchor="bottom"),
        margin=dict(b=70),
    )
    return styled(fig, width="double", height_in=3.2)


def _ranges(text: str) -> list[tuple[int, int]]:
    """``"1-8,11"`` -> ``[(1, 8), (11, 11)]`` (the ``active_layers`` column)."""
    spans = []
    for part in filter(None, text.split(",")):
        start, _, end = part.partition("-")
        spans.append((int(start), int(end or start)))
    return spans


@view("sinks.secondary_lifetime", title="Lifetime of sink-aligned tokens", reports=("secondary_sinks",))
def secondary_lifetime(frames, max_rows: int = 60):
    secondary = frames["secondary_sinks"]
    title = "Layers where a token's hidden state aligns with the first token's"
    if secondary.empty:
        return no_data(title, "no aligned tokens in this run")
    rows = secondary.sort_values(["probe", "position"]).head(max_rows)
    fig = go.Figure()
    segments = {label: [] for label in LABEL_COLORS}
    for row in rows.itertuples(index=False):
        name = f"{row.probe} {row.position} {row.token!r}"
        # Bars cover formation..last layer, cut where the first-token sink is inactive (alignment is only tested there).
        for start, end in _ranges(row.active_layers):
            start, end = max(start, row.formation_layer), min(end, row.last_layer)
            if start <= end:
                segments[row.label].append((name, start, end, row.lifetime, row.mlp_norm))
    for label, color in LABEL_COLORS.items():
        if not segments[label]:
            continue
        names, starts, ends, lifetimes, norms = zip(*segments[label])
        fig.add_trace(
            go.Bar(
                y=list(names),
                x=[end - start + 1 for start, end in zip(starts, ends)],
                base=[start - 0.5 for start in starts],
                orientation="h",
                name=label,
                marker_color=color,
                customdata=list(zip(lifetimes, norms)),
                hovertemplate="%{y}<br>lifetime %{customdata[0]} layers, MLP norm at formation %{customdata[1]:.4g}<extra>" + label + "</extra>",
            )
        )
    labels = [f"{probe} {position} {token!r}" for probe, position, token in zip(rows["probe"], rows["position"], rows["token"])]
    fig.update_layout(
        title=title,
        barmode="overlay",
        xaxis=dict(title="layer", dtick=5),
        yaxis=dict(type="category", categoryorder="array", categoryarray=labels[::-1], tickfont=dict(size=7)),
        legend=dict(orientation="h", x=1, xanchor="right", y=1.02, yanchor="bottom"),
    )
    return styled(fig, width="double", height_in=max(1.6, 0.8 + 0.11 * len(rows)))
