"""The view registry: a view names the reports it reads and turns their frames into a figure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class View:
    name: str  # "<detector>.<what>", e.g. "sinks.heatmap"; the census overview uses "overview.<what>"
    title: str
    reports: tuple[str, ...]  # report types read from the store; the view needs all of them
    # frames[report_type] = rows of that report for the selected run (and model); returns a plotly Figure.
    make: Callable[[dict[str, pd.DataFrame]], object]
    # Report types used when the run has them (frames then lacks the others); the view needs min_optional of them.
    # A function returning them is asked each time (the overview: the reports of the detectors registered now).
    optional: tuple[str, ...] | Callable[[], tuple[str, ...]] = ()
    min_optional: int = 1

    @property
    def optional_reports(self) -> tuple[str, ...]:
        return tuple(self.optional()) if callable(self.optional) else self.optional

    @property
    def group(self) -> str:
        """The detector (or "overview") the view belongs to: its name up to the first dot."""
        return self.name.split(".", 1)[0]

    def applies_to(self, report_types) -> bool:
        present = set(report_types)
        optional = self.optional_reports
        return set(self.reports) <= present and (not optional or len(present & set(optional)) >= self.min_optional)


VIEWS: dict[str, View] = {}


def view(name: str, *, title: str, reports: tuple[str, ...] = (), optional: tuple[str, ...] | Callable[[], tuple[str, ...]] = (),
         min_optional: int = 1):
    """Register ``make(frames) -> plotly.graph_objects.Figure`` as a view."""

    def register(make):
        if name in VIEWS:
            raise ValueError(f"view {name!r} registered twice")
        VIEWS[name] = View(name, title, tuple(reports), make, optional if callable(optional) else tuple(optional), min_optional)
        return make

    return register


def available_views(report_types: list[str] | None = None) -> list[str]:
    """View names, optionally only those that can be drawn from the reports ``report_types``."""
    return sorted(n for n, v in VIEWS.items() if report_types is None or v.applies_to(report_types))


def run_report_types(store, run_id: str) -> list[str]:
    """The report types a finished run wrote, from its manifest."""
    runs = store.runs(run_id=run_id)
    return sorted({t for listed in runs["reports"] for t in listed.split(",") if t})


def read_frames(store, selected: View, *, run_id: str, model: str | None = None) -> dict[str, pd.DataFrame]:
    """The view's reports for one run: every required one, and the optional ones the run wrote."""
    filters = {"run_id": run_id, **({"model": model} if model else {})}
    optional = selected.optional_reports
    written = set(run_report_types(store, run_id)) if optional else set()
    wanted = list(selected.reports) + [r for r in optional if r in written and r not in selected.reports]
    return {report: store.read(report, **filters) for report in wanted}


def render(store, name: str, *, run_id: str | None = None, model: str | None = None):
    """Read the view's reports for one run (default: the newest) from ``store`` and make the figure."""
    if name not in VIEWS:
        raise KeyError(f"unknown view {name!r}; available: {', '.join(available_views())}")
    run_id = run_id or store.latest_run(model)
    if run_id is None:
        raise LookupError(f"no finished runs in {store.path}" + (f" for model {model!r}" if model else ""))
    return VIEWS[name].make(read_frames(store, VIEWS[name], run_id=run_id, model=model))
