"""Views of the ``preplan_anchor`` reports: WAAD and FAI along a response, which heads are local or
global, and what a local and a global head's attention looks like (sawtooth against vertical stripes).

Every figure shows both variants: ``all`` (attention as is) and ``no_sink`` (sink keys removed).
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lens.views._registry import view
from lens.views.charts import head_grid, head_label, no_data
from lens.views.style import OKABE_ITO, SEQUENTIAL, styled
from probes.preplan_anchor import LOCALITY_COLORS

VARIANTS = ("all", "no_sink")
ATTENTION_TICKS = [0, 0.01, 0.05, 0.25, 1]
VARIANT_TITLES = {"all": "all keys", "no_sink": "sink keys removed"}


@view("preplan_anchor.token_strip", title="WAAD and FAI along one response", reports=("reasoning_tokens",))
def token_strip(frames):
    tokens = frames["reasoning_tokens"]
    title = "WAAD and FAI along the first response"
    if tokens.empty:
        return no_data(title, "no rows in this run", width="double")
    probe = tokens["probe_id"].iloc[0]
    tokens = tokens[tokens["probe_id"] == probe]
    rows = [(variant, metric) for variant in VARIANTS for metric in ("waad", "fai")]
    fig = make_subplots(rows=len(rows), cols=1, shared_xaxes=True, vertical_spacing=0.04,
                        subplot_titles=[f"{metric.upper()} ({VARIANT_TITLES[variant]})" for variant, metric in rows])
    for row, (variant, metric) in enumerate(rows, start=1):
        strip = tokens[tokens["variant"] == variant].sort_values("index")
        marked = "is_preplan" if metric == "waad" else "is_anchor"
        fig.add_trace(go.Heatmap(
            z=[strip[metric].to_numpy()], x=strip["index"], y=[""], colorscale=SEQUENTIAL, showscale=False,
            customdata=[strip["token"].to_numpy()],
            hovertemplate="%{customdata}<br>" + metric + " = %{z:.4g}<extra></extra>",
        ), row=row, col=1)
        flagged = strip[strip[marked]]
        fig.add_trace(go.Scatter(
            x=flagged["index"], y=[""] * len(flagged), mode="markers",
            marker=dict(symbol="triangle-down" if metric == "waad" else "circle", size=5, color="white", line=dict(color="black", width=0.8)),
            name="preplan token" if metric == "waad" else "anchor token", showlegend=row <= 2, hoverinfo="skip",
        ), row=row, col=1)
    last = tokens[tokens["variant"] == VARIANTS[0]].sort_values("index")
    fig.update_xaxes(tickvals=last["index"], ticktext=[t.replace("\n", "\\n") for t in last["token"]], tickangle=-90, tickfont=dict(size=6), row=len(rows), col=1)
    fig.update_layout(title=f"{title}: probe {probe} (colour: value within each strip)", legend=dict(orientation="h", y=-0.45))
    fig.update_annotations(font_size=8)
    return styled(fig, width="double", height_in=3.4)


@view("preplan_anchor.head_map", title="Local and global heads", reports=("head_locality",))
def head_map(frames):
    heads = frames["head_locality"]
    title = "Local and global heads by mean attention distance d"
    if heads.empty:
        return no_data(title, "no rows in this run", width="double")
    codes = {"excluded": 0, "middle": 1, "local": 2, "global": 3}
    colours = ["#FFFFFF", "#E5E5E5", LOCALITY_COLORS["local"], LOCALITY_COLORS["global"]]
    scale = [[bound, colour] for i, colour in enumerate(colours) for bound in (i / 4, (i + 1) / 4)]
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.04, subplot_titles=[VARIANT_TITLES[v] for v in VARIANTS])
    for col, variant in enumerate(VARIANTS, start=1):
        frame = heads[heads["variant"] == variant].assign(code=lambda f: f["group"].map(codes))
        grid, distance, first = head_grid(frame, "code"), head_grid(frame, "mean_distance"), head_grid(frame, "first_token_attention")
        fig.add_trace(go.Heatmap(
            z=grid.to_numpy(dtype=float), x=list(grid.columns), y=list(grid.index), zmin=-0.5, zmax=3.5, colorscale=scale,
            showscale=False, xgap=1, ygap=1, customdata=[[[d, f] for d, f in zip(dr, fr)] for dr, fr in zip(distance.to_numpy(), first.to_numpy())],
            hovertemplate="layer %{x}, head %{y}<br>d = %{customdata[0]:.3g}<br>first-token attention = %{customdata[1]:.2f}<extra></extra>",
        ), row=1, col=col)
        # Dots on heads that park most of their attention on the first token: in the "all" variant they crowd the global group.
        sinks = frame[frame["first_token_attention"] > 0.5]
        fig.add_trace(go.Scatter(x=sinks["layer"], y=sinks["head"], mode="markers", marker=dict(size=3, color=OKABE_ITO["black"]),
                                 name="first-token attention > 0.5", showlegend=col == 1, hoverinfo="skip"), row=1, col=col)
    for group in ("local", "global"):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", marker=dict(symbol="square", size=8, color=LOCALITY_COLORS[group]), name=f"{group} heads"))
    fig.update_xaxes(title_text="layer")
    fig.update_yaxes(title_text="head", col=1)
    fig.update_layout(title=title, legend=dict(orientation="h", y=-0.3))
    fig.update_annotations(font_size=8)
    return styled(fig, width="double", height_in=2.6)


@view("preplan_anchor.attention_maps", title="A local and a global head's attention", reports=("locality_excerpt",))
def attention_maps(frames):
    excerpt = frames["locality_excerpt"]
    title = "Attention of the most local and most global head (first probe)"
    if excerpt.empty:
        return no_data(title, "no rows in this run", width="double")
    panels = [(variant, role) for variant in VARIANTS for role in ("local", "global")]
    names = []
    for variant, role in panels:
        cells = excerpt[(excerpt["variant"] == variant) & (excerpt["role"] == role)]
        names.append(f"{role}, {VARIANT_TITLES[variant]}: {head_label(cells['layer'].iloc[0], cells['head'].iloc[0])}" if len(cells) else f"{role}, {variant}")
    fig = make_subplots(rows=1, cols=len(panels), horizontal_spacing=0.03, subplot_titles=names)
    for col, (variant, role) in enumerate(panels, start=1):
        cells = excerpt[(excerpt["variant"] == variant) & (excerpt["role"] == role)]
        grid = cells.pivot_table(index="query_pos", columns="key_pos", values="attention")
        # Keys as categories so the first token sits next to the window instead of across a gap.
        # Colour by the square root so weak off-diagonal structure shows next to the sink column.
        fig.add_trace(go.Heatmap(
            z=np.sqrt(grid.to_numpy()), x=[str(k) for k in grid.columns], y=list(grid.index), colorscale=SEQUENTIAL, zmin=0, zmax=1,
            customdata=grid.to_numpy(), showscale=col == len(panels),
            colorbar=dict(title=dict(text="attention", side="right"), thickness=8, tickvals=np.sqrt(ATTENTION_TICKS), ticktext=[f"{t:g}" for t in ATTENTION_TICKS]),
            hovertemplate="query %{y}, key %{x}<br>A = %{customdata:.3f}<extra></extra>",
        ), row=1, col=col)
        fig.update_xaxes(type="category", showticklabels=False, title_text="key (first token, then window)", title_font=dict(size=7), row=1, col=col)
        fig.update_yaxes(autorange="reversed", showticklabels=col == 1, row=1, col=col)
    fig.update_yaxes(title_text="query position", col=1)
    fig.update_layout(title=title)
    fig.update_annotations(font_size=7)
    return styled(fig, width="double", height_in=2.3)
