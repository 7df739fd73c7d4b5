"""The paper figure style: one plotly template, two column widths, colour-blind-safe colours.

Every view builds its figure with the helpers in ``lens.views.charts`` and finishes it with
``styled(fig, width=...)``, so all figures share fonts, sizes and colours:

- widths: ``SINGLE_COLUMN_IN`` (3.3 in) and ``DOUBLE_COLUMN_IN`` (6.9 in); plotly lays out in CSS
  pixels (96 per inch), and ``lens.views.export`` scales PNGs to the requested dpi;
- categories: the Okabe-Ito palette (Okabe & Ito 2008, safe for the common colour-vision deficiencies);
- scores: the sequential scale ``SEQUENTIAL`` (viridis), and ``DIVERGING`` (RdBu, ColorBrewer's
  colour-blind-safe diverging scale) for signed values such as correlations;
- one colour per detector (``detector_color``: the colour the detector declares, ``Detector.color``), the
  same in every figure and in the HTML report.
"""

from __future__ import annotations

import plotly.graph_objects as go
import plotly.io as pio

import probes
from probes._overview import NEUTRAL, OKABE_ITO

PX_PER_IN = 96  # plotly's layout unit is the CSS pixel
SINGLE_COLUMN_IN = 3.3
DOUBLE_COLUMN_IN = 6.9
WIDTHS_IN = {"single": SINGLE_COLUMN_IN, "double": DOUBLE_COLUMN_IN}

FONT_FAMILY = "Helvetica, Arial, 'Liberation Sans', 'DejaVu Sans', sans-serif"
FONT_SIZE = 9  # pt-like size at print width; titles a little larger

CATEGORICAL = [OKABE_ITO[name] for name in ("blue", "orange", "bluish_green", "vermillion", "reddish_purple", "sky_blue", "black", "yellow")]

SEQUENTIAL = "Viridis"
DIVERGING = "RdBu_r"  # reversed so positive is red


def detector_color(detector: str) -> str:
    """The colour the detector declares (``Detector.color``); grey for one that is not registered."""
    return probes.REGISTRY.detectors[detector].color if detector in probes.REGISTRY.detectors else NEUTRAL


def detector_colors() -> dict[str, str]:
    """Every registered detector's colour, by name."""
    return {name: detector_color(name) for name in probes.available()}


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


# -- the paper style (``lens report --style paper``) ---------------------------------------------
# Journal column widths, a serif face at 8-9 pt and the same colour-blind-safe colours. Sizes are
# stated in points and converted to plotly's CSS pixels: an exported page is 96 px per inch and
# 72 pt per inch, so a 10.67 px font prints at 8 pt.

PT_PER_IN = 72
PAPER_WIDTHS_IN = {"single": 3.25, "double": 6.75}
# Times New Roman where an author has it; Liberation Serif has its metrics and ships with most Linux
# systems (and with the project's CI image), so the PDF looks the same there.
PAPER_FONT_FAMILY = "'Times New Roman', 'Liberation Serif', Times, 'DejaVu Serif', serif"
PAPER_FONT_PT = 8  # tick labels, axis titles, legends, annotations, colour bars
PAPER_TITLE_PT = 9  # the figure's title


def pt_to_px(points: float) -> float:
    """A print size in points as plotly's layout unit (CSS pixels)."""
    return points * PX_PER_IN / PT_PER_IN


def _paper_template() -> go.layout.Template:
    template = go.layout.Template(pio.templates["lens"])
    template.layout.update(
        font=dict(family=PAPER_FONT_FAMILY, size=pt_to_px(PAPER_FONT_PT)),
        title=dict(font=dict(size=pt_to_px(PAPER_TITLE_PT))),
        legend=dict(font=dict(size=pt_to_px(PAPER_FONT_PT))),
    )
    return template


pio.templates["lens_paper"] = _paper_template()


def paper_column(fig: go.Figure) -> str:
    """"single" or "double": the paper column a view's figure was laid out for (the nearer width)."""
    return "double" if width_in(fig) > (SINGLE_COLUMN_IN + DOUBLE_COLUMN_IN) / 2 else "single"


def paper_styled(fig: go.Figure, *, width: str | None = None) -> go.Figure:
    """A copy of a view's figure for a paper: ``width`` "single" (3.25 in) or "double" (6.75 in), by
    default the column the view chose; the height keeps the view's aspect ratio; every text in the
    serif face, the title at ``PAPER_TITLE_PT`` and all else at ``PAPER_FONT_PT`` (sizes a view set for
    the screen, such as 6 px tick labels, are replaced so nothing prints below 8 pt)."""
    column = width or paper_column(fig)
    if column not in PAPER_WIDTHS_IN:
        raise ValueError(f"paper width {column!r}: expected one of {', '.join(PAPER_WIDTHS_IN)}")
    layout_width = fig.layout.width or SINGLE_COLUMN_IN * PX_PER_IN
    layout_height = fig.layout.height or layout_width * 0.62
    new_width = PAPER_WIDTHS_IN[column] * PX_PER_IN
    paper = go.Figure(fig)
    spec = fig.to_dict()
    spec["layout"].pop("template", None)
    for path in _font_paths(spec, ()):
        font = paper
        for key in path:
            font = font[key]
        font.update(family=PAPER_FONT_FAMILY, size=pt_to_px(PAPER_FONT_PT))
    if paper.layout.title.font.size is not None:
        paper.layout.title.font.size = pt_to_px(PAPER_TITLE_PT)
    paper.update_layout(template="lens_paper", width=round(new_width), height=round(layout_height * new_width / layout_width))
    return paper


def _font_paths(node, path: tuple) -> list[tuple]:
    """Where a figure's dict spells out a font (``font``, ``tickfont``, ``textfont``...), as keys from the top."""
    found = []
    if isinstance(node, list):
        for index, item in enumerate(node):
            found += _font_paths(item, (*path, index))
    elif isinstance(node, dict):
        for key, value in node.items():
            if key.endswith("font") and isinstance(value, dict):
                found.append((*path, key))
            else:
                found += _font_paths(value, (*path, key))
    return found
