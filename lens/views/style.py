"""The paper figure style: one plotly template, two column widths, colour-blind-safe colours.

Every view builds its figure with the helpers in ``lens.views.charts`` and finishes it with
``styled(fig, width=...)``, so all figures share fonts, sizes and colours:

- widths: ``SINGLE_COLUMN_IN`` (3.3 in) and ``DOUBLE_COLUMN_IN`` (6.9 in); plotly lays out in CSS
  pixels (96 per inch), and ``lens.views.export`` scales PNGs to the requested dpi;
- categories: the Okabe-Ito palette (Okabe & Ito 2008, safe for the common colour-vision deficiencies);
- scores: the sequential scale ``SEQUENTIAL`` (viridis), and ``DIVERGING`` (RdBu, ColorBrewer's
  colour-blind-safe diverging scale) for signed values such as correlations;
- one colour per detector (``DETECTOR_COLORS``), the same in every figure and in the HTML report.
"""

from __future__ import annotations

import plotly.graph_objects as go
import plotly.io as pio

PX_PER_IN = 96  # plotly's layout unit is the CSS pixel
SINGLE_COLUMN_IN = 3.3
DOUBLE_COLUMN_IN = 6.9
WIDTHS_IN = {"single": SINGLE_COLUMN_IN, "double": DOUBLE_COLUMN_IN}

FONT_FAMILY = "Helvetica, Arial, 'Liberation Sans', 'DejaVu Sans', sans-serif"
FONT_SIZE = 9  # pt-like size at print width; titles a little larger

# Okabe-Ito, in their published order (black first).
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
}
CATEGORICAL = [OKABE_ITO[name] for name in ("blue", "orange", "bluish_green", "vermillion", "reddish_purple", "sky_blue", "black", "yellow")]

# One colour per detector. preplan_anchor labels heads local or global: global heads take the
# detector's colour, local heads a light tint of it, so the detector keeps one hue.
DETECTOR_COLORS = {
    "sinks": OKABE_ITO["vermillion"],
    "retrieval": OKABE_ITO["blue"],
    "preplan_anchor": OKABE_ITO["bluish_green"],
    "contextual": OKABE_ITO["orange"],
    "circuits": OKABE_ITO["reddish_purple"],
}
LOCALITY_COLORS = {"global": OKABE_ITO["bluish_green"], "local": "#8FD3BF"}
NEUTRAL = "#7F7F7F"  # thresholds, reference lines, "other"

SEQUENTIAL = "Viridis"
DIVERGING = "RdBu_r"  # reversed so positive is red


def detector_color(detector: str) -> str:
    """The detector's colour; unknown detectors (added later) get a neutral grey until they are given one."""
    return DETECTOR_COLORS.get(detector, NEUTRAL)


def _template() -> go.layout.Template:
    base = pio.templates["simple_white"]
    template = go.layout.Template(base)
    template.layout.update(
        font=dict(family=FONT_FAMILY, size=FONT_SIZE, color="#000000"),
        title=dict(font=dict(size=FONT_SIZE + 1), x=0, xanchor="left", y=0.98, yanchor="top"),
        colorway=CATEGORICAL,
        colorscale=dict(sequential=SEQUENTIAL, diverging=DIVERGING),
        margin=dict(l=44, r=10, t=28, b=36),
        legend=dict(font=dict(size=FONT_SIZE - 1), bgcolor="rgba(255,255,255,0.8)", borderwidth=0),
        paper_bgcolor="white",
        plot_bgcolor="white",
    )
    template.layout.xaxis.update(ticks="outside", ticklen=3, title=dict(standoff=4), automargin=True)
    template.layout.yaxis.update(ticks="outside", ticklen=3, title=dict(standoff=4), automargin=True)
    return template


pio.templates["lens"] = _template()


def styled(fig: go.Figure, *, width: str | float = "single", height_in: float | None = None) -> go.Figure:
    """Apply the lens template and a print size: ``width`` is "single", "double" or inches."""
    width_in = WIDTHS_IN[width] if isinstance(width, str) else float(width)
    height_in = height_in if height_in is not None else width_in * 0.62
    fig.update_layout(template="lens", width=round(width_in * PX_PER_IN), height=round(height_in * PX_PER_IN))
    return fig


def width_in(fig: go.Figure) -> float:
    """The figure's print width in inches (single column when it has none)."""
    return (fig.layout.width or SINGLE_COLUMN_IN * PX_PER_IN) / PX_PER_IN
