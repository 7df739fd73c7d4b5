"""Static figure export (PDF, SVG, PNG) through plotly's image export.

plotly >= 6 exports with kaleido 1.x, which drives a Chromium-based browser in headless mode:
Debian's ``chromium`` (installed by ``scripts/setup.sh``), Google Chrome, Edge or Brave found on
``PATH``, a browser named by the ``BROWSER_PATH`` environment variable, or one downloaded with
kaleido's ``kaleido_get_chrome`` command. Without one, export raises ``ExportError`` saying so.

Sizes follow the figure's print width (``lens.views.style``): a PDF or SVG page is exactly that
many inches wide (plotly's 96 px per inch), and a PNG is rendered at ``dpi`` (default 300) with
the resolution recorded in the file's pHYs chunk.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

from lens.views.style import PX_PER_IN

FORMATS = ("pdf", "svg", "png")
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
    """Write each figure to its path; the format is the path's suffix (.pdf, .svg or .png).

    All figures go through one browser session, which matters: starting Chromium costs seconds.
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
    if not figures:
        return []
    require_browser()
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    pio.write_images(
        list(figures),
        paths,
        format=formats,
        width=[fig.layout.width for fig in figures],
        height=[fig.layout.height for fig in figures],
        # Vector pages keep the print size (96 px = 1 in); PNG pixels are scaled to the dpi.
        scale=[dpi / PX_PER_IN if fmt == "png" else 1 for fmt in formats],
    )
    for path, fmt in zip(paths, formats):
        if fmt == "png":
            set_png_dpi(path, dpi)
    return paths


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
