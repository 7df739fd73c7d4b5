"""How a detector appears in the census overview and the HTML report: its colour, the labels it gives
heads and its per-head scores. A detector declares them on its class (``color``, ``overview_labels``,
``overview_scores``); ``lens.views.overview`` and ``lens.views.style`` read them from the registry, so a
new detector shows up there with no edit to the views.

The types are declarative (report, column, rule) so detectors stay below the views: they never
import plotting code.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

# Okabe & Ito (2008): distinguishable under the common colour-vision deficiencies.
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
NEUTRAL = "#7F7F7F"  # thresholds, reference lines, "other", and a detector that declares no colour


@dataclass(frozen=True)
class Rows:
    """Which of a report's rows describe a head, where it has several kinds per head: those whose
    ``column`` equals ``value`` (used when the report has that column and value, else every row)."""

    column: str
    value: str

    def select(self, frame: pd.DataFrame) -> pd.DataFrame:
        if self.column in frame.columns and (frame[self.column] == self.value).any():
            return frame[frame[self.column] == self.value]
        return frame


@dataclass(frozen=True)
class OverviewLabel:
    """A label heads get in the overview: from ``report``, the heads whose ``column`` is true (a
    boolean column), equals ``equals``, or (``top``) ranks among the first ``top`` (ranks may start at
    0 or 1). Drawn as a ``symbol`` (plotly marker) at ``offset`` within the head's cell, in ``color``
    (default: the detector's)."""

    name: str
    report: str
    column: str
    symbol: str
    offset: tuple[float, float]
    equals: str | None = None
    top: int | None = None
    color: str | None = None
    rows: Rows | None = None

    def selects(self, frame: pd.DataFrame) -> pd.Series:
        if self.equals is not None:
            return frame[self.column].astype(str) == self.equals
        if self.top is not None:
            return frame[self.column] - frame[self.column].min() < self.top
        return frame[self.column].astype(bool)


@dataclass(frozen=True)
class OverviewScore:
    """A per-head score in the overview's head table (``name``): the mean of ``report``'s ``column``
    per head, or, with ``largest_over``, its mean per (that column, head) and then the largest
    magnitude over it (a head's importance in the task where it matters most)."""

    name: str
    report: str
    column: str
    largest_over: str | None = None
    rows: Rows | None = None

    def per_head(self, frame: pd.DataFrame) -> pd.Series:
        if self.largest_over is None:
            return frame.groupby(["layer", "head"])[self.column].mean().rename(self.name)
        per_group = frame.groupby([self.largest_over, "layer", "head"])[self.column].mean().abs()
        return per_group.groupby(["layer", "head"]).max().rename(self.name)
