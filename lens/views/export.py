"""Static figure export (PDF, SVG, PNG) through plotly's image export.

plotly >= 6 exports with kaleido 1.x, which drives a Chromium-based browser in headless mode:
Debian's ``chromium`` (installed by ``scripts/setup.sh``), Google Chrome, Edge or Brave found on
``PATH``, a browser named by the ``BROWSER_PATH`` environment variable, or one downloaded with
kaleido's ``kaleido_get_chrome`` command. Without one, export raises ``ExportError`` saying so.

Sizes follow the figure's print width (``lens.views.style``): a PDF or SVG page is exactly that
many inches wide (plotly's 96 px per inch), and a PNG is rendered at ``dpi`` (default 300) with
the resolution recorded in the file's pHYs chunk.

A ``.csv`` path gets the figure's data instead (``figure_table``): every point of every trace, so an
author can redraw the figure in their own plotting tool. It needs no browser.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from lens.views.style import PX_PER_IN

IMAGE_FORMATS = ("pdf", "svg", "png")
FORMATS = (*IMAGE_FORMATS, "csv")
TABLE_COLUMNS = ("trace", "name", "type", "panel", "x", "y", "z", "base", "y_low", "y_high", "x_low", "x_high", "text")
DEFAULT_DPI = 300


class ExportError(RuntimeError):
    """Static export is impossible here (no browser) or was asked for an unknown format."""


def find_browser() -> str | None:
    """The Chromium-based browser kaleido would use, or None."""
    from choreographer.browsers.chromium import Chromium

    path = Chromium.find_browser(skip_local=False)
    return str(path) if path else None


def require_browser() -> str:
    path = find_browser()
    if path is None:
        raise ExportError(
            "static figure export (PDF/SVG/PNG) needs a Chromium-based browser and none was found: "
            "on Debian/Ubuntu run `apt-get install chromium`, elsewhere install Google Chrome or run "
            "`kaleido_get_chrome`, or point BROWSER_PATH at one (HTML reports need no browser)"
        )
    return path


def export(figures: go.Figure | Sequence[go.Figure], paths: str | Path | Sequence[str | Path], *, dpi: int = DEFAULT_DPI) -> list[Path]:
    """Write each figure to its path; the format is the path's suffix (.pdf, .svg, .png, or .csv for
    the figure's data).

    All images go through one browser session, which matters: starting Chromium costs seconds.
    """
    if isinstance(figures, go.Figure):
        figures, paths = [figures], [paths]
    paths = [Path(p) for p in paths]
    if len(paths) != len(figures):
        raise ValueError(f"{len(figures)} figures but {len(paths)} paths")
    formats = [p.suffix.lstrip(".").lower() for p in paths]
    unknown = sorted({f for f in formats if f not in FORMATS})
    if unknown:
        raise ExportError(f"cannot export to {', '.join(unknown)}; formats: {', '.join(FORMATS)}")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    for fig, path, fmt in zip(figures, paths, formats):
        if fmt == "csv":
            figure_table(fig).to_csv(path, index=False)
    images = [(fig, path, fmt) for fig, path, fmt in zip(figures, paths, formats) if fmt in IMAGE_FORMATS]
    if images:
        require_browser()
        pio.write_images(
            [fig for fig, _, _ in images],
            [path for _, path, _ in images],
            format=[fmt for _, _, fmt in images],
            width=[fig.layout.width for fig, _, _ in images],
            height=[fig.layout.height for fig, _, _ in images],
            # Vector pages keep the print size (96 px = 1 in); PNG pixels are scaled to the dpi.
            scale=[dpi / PX_PER_IN if fmt == "png" else 1 for _, _, fmt in images],
        )
    for _, path, fmt in images:
        if fmt == "png":
            set_png_dpi(path, dpi)
    return paths


def figure_table(fig: go.Figure) -> pd.DataFrame:
    """The data a figure draws, one row per point (a heatmap: one per cell), in ``TABLE_COLUMNS``:
    ``trace`` (its index) and ``name``, its plotly ``type``, the ``panel`` (axes) it is drawn in, the
    coordinates ``x``, ``y`` and ``z``, a bar's ``base`` where it does not start at 0, error bars as absolute ends (``y_low``/``y_high``,
    ``x_low``/``x_high``) and the point's ``text``. A filled band is the outline it draws (its upper
    edge, then the lower edge backwards). Legend-only entries (no points) have no rows; reference lines
    across a panel (a threshold) are rows of type ``hline`` (``y``) or ``vline`` (``x``)."""
    frames = [_trace_table(index, trace) for index, trace in enumerate(fig.data)] + [_reference_lines(fig)]
    frames = [frame for frame in frames if len(frame)]
    if not frames:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    return pd.concat(frames, ignore_index=True).reindex(columns=TABLE_COLUMNS)


def _trace_table(index: int, trace) -> pd.DataFrame:
    columns: dict[str, object] = {}
    z = getattr(trace, "z", None)
    if z is not None:  # a heatmap: one row per cell, x and y from the cell's column and row
        grid = np.asarray(z, dtype=float)
        if grid.ndim == 1:  # cells given as (x, y, z) columns
            columns = {"x": list(trace.x), "y": list(trace.y), "z": grid}
        else:
            rows, cols = grid.shape
            x = np.asarray(trace.x) if trace.x is not None else np.arange(cols)
            y = np.asarray(trace.y) if trace.y is not None else np.arange(rows)
            columns = {"x": np.tile(x, rows), "y": np.repeat(y, cols), "z": grid.ravel()}
        if trace.text is not None and np.size(trace.text) == len(columns["z"]):
            columns["text"] = np.asarray(trace.text, dtype=object).ravel()
    else:
        x, y = getattr(trace, "x", None), getattr(trace, "y", None)
        if x is None and y is None:
            return pd.DataFrame()
        n = len(x if x is not None else y)
        columns = {"x": _values(x, n), "y": _values(y, n)}
        for axis in ("x", "y"):
            error = getattr(trace, f"error_{axis}", None)
            if error is not None and error.array is not None:
                plus = np.asarray(error.array, dtype=float)
                minus = np.asarray(error.arrayminus, dtype=float) if error.arrayminus is not None and not error.symmetric else plus
                centre = np.asarray(columns[axis], dtype=float)
                columns[f"{axis}_low"], columns[f"{axis}_high"] = centre - minus, centre + plus
        base = getattr(trace, "base", None)
        if base is not None:  # a bar from base to base + length (a span, such as layers)
            columns["base"] = list(base) if np.ndim(base) else [base] * n
        text = getattr(trace, "text", None)
        if text is not None and not isinstance(text, str):
            columns["text"] = list(text)
    frame = pd.DataFrame(columns)
    frame = frame.dropna(how="all", subset=[c for c in ("x", "y", "z") if c in frame])
    xaxis, yaxis = getattr(trace, "xaxis", None) or "x", getattr(trace, "yaxis", None) or "y"
    return frame.assign(trace=index, name=trace.name or "", type=trace.type, panel=f"{xaxis}/{yaxis}")


def _reference_lines(fig: go.Figure) -> pd.DataFrame:
    """Lines drawn across a whole panel (``add_hline``/``add_vline``): the thresholds a figure shows."""
    rows = []
    for shape in fig.layout.shapes:
        if shape.type != "line":
            continue
        panel = f"{(shape.xref or 'x').split(' ')[0]}/{(shape.yref or 'y').split(' ')[0]}"
        if shape.y0 == shape.y1 and str(shape.xref).endswith("domain"):
            rows.append({"trace": None, "name": shape.name or "", "type": "hline", "panel": panel, "y": shape.y0})
        elif shape.x0 == shape.x1 and str(shape.yref).endswith("domain"):
            rows.append({"trace": None, "name": shape.name or "", "type": "vline", "panel": panel, "x": shape.x0})
    return pd.DataFrame(rows)


def _values(values, n: int) -> list:
    return [None] * n if values is None else list(values)


def set_png_dpi(path: Path, dpi: int) -> None:
    """Record ``dpi`` in the PNG's pHYs chunk (replacing any), so layout programs print it at size."""
    data = Path(path).read_bytes()
    signature, chunks, offset = data[:8], [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        chunks.append((kind, data[offset : offset + 12 + length]))
        offset += 12 + length
    per_metre = round(dpi / 0.0254)
    body = b"pHYs" + struct.pack(">IIB", per_metre, per_metre, 1)
    phys = struct.pack(">I", 9) + body + struct.pack(">I", zlib.crc32(body))
    kept = [raw for kind, raw in chunks if kind != b"pHYs"]
    Path(path).write_bytes(signature + kept[0] + phys + b"".join(kept[1:]))  # pHYs must precede IDAT; IHDR is first


def png_dpi(path: Path) -> float | None:
    """The dpi recorded in a PNG's pHYs chunk, or None."""
    data = Path(path).read_bytes()
    at = data.find(b"pHYs")
    if at < 0:
        return None
    x_per_unit, _, unit = struct.unpack(">IIB", data[at + 4 : at + 13])
    return x_per_unit * 0.0254 if unit == 1 else None
