"""Plot views: figures made only from the report store, never from a live model.

Each view module (one per detector, plus the census overview) registers its views with ``@view``.
Every public module of this package is imported here, so adding views is adding a module.

    from lens.views import render, available_views
    fig = render(store, "sinks.heatmap", run_id=...)
"""

from __future__ import annotations

import importlib
import pkgutil

import probes  # noqa: F401  (views read the detector registry: colours, overview labels, report types)
from lens.views._registry import VIEWS, View, available_views, render, view

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

from lens.views.report import run_views  # noqa: E402  (after the view modules registered)

__all__ = ["VIEWS", "View", "available_views", "render", "run_views", "view"]
