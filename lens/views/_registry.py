"""The view registry: a view names the reports it reads and turns their frames into a figure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class View:
    name: str  # "<detector>.<what>", e.g. "sinks.heatmap"
    title: str
    reports: tuple[str, ...]  # report types read from the store
    # frames[report_type] = rows of that report for the selected run (and model); returns a plotly Figure.
    make: Callable[[dict[str, pd.DataFrame]], object]


VIEWS: dict[str, View] = {}


def view(name: str, *, title: str, reports: tuple[str, ...]):
    """Register ``make(frames) -> plotly.graph_objects.Figure`` as a view."""

    def register(make):
        if name in VIEWS:
            raise ValueError(f"view {name!r} registered twice")
        VIEWS[name] = View(name, title, reports, make)
        return make

    return register


def available_views(report_types: list[str] | None = None) -> list[str]:
    """View names, optionally only those whose reports are all among ``report_types``."""
    return sorted(n for n, v in VIEWS.items() if report_types is None or set(v.reports) <= set(report_types))


def render(store, name: str, *, run_id: str | None = None, model: str | None = None):
    """Read the view's reports for one run (default: the newest) from ``store`` and make the figure."""
    if name not in VIEWS:
        raise KeyError(f"unknown view {name!r}; available: {', '.join(available_views())}")
    selected = VIEWS[name]
    run_id = run_id or store.latest_run(model)
    filters = {"run_id": run_id, **({"model": model} if model else {})}
    frames = {report: store.read(report, **filters) for report in selected.reports}
    return selected.make(frames)
