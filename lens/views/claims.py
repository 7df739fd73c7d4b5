"""The results table: every claim of one or more runs as Markdown, a table per detector and a column
per model, each cell the estimate, its 95% interval, n and p; where a seed paper makes the claim, a
"paper" column with the paper's value and a verdict per model: reproduced, not reproduced or
inconclusive (``verdict``; the rule is in docs/figures.md).

``lens report --markdown PAGE --run RUN1,RUN2`` writes it; the README's results link to the page it
makes, so no number in the docs is copied by hand.
"""

from __future__ import annotations

import fnmatch
import math
import re
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from probes import PaperClaim

ALPHA = 0.05  # the level at which a claim's p-value rejects its null
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"


def claim_cell(row) -> str:
    """``0.63 [0.57, 0.69] n=12 probes, p=0.004``; a tally is its count alone."""
    if row.method == "count":
        return f"{row.estimate:.0f}"
    text = f"{row.estimate:.3g}"
    if not (math.isnan(row.ci_low) or math.isnan(row.ci_high)):
        text += f" [{row.ci_low:.3g}, {row.ci_high:.3g}]"
    text += f" n={row.n} {row.unit}".rstrip()
    if not math.isnan(row.p_value):
        text += f", p={row.p_value:.2g}"
    return text


def paper_claim(detector: str, claim: str) -> PaperClaim | None:
    """The paper claim a registered detector declares for ``claim`` (exact name first, then a key with
    ``*`` standing for any text), or None."""
    import probes

    if detector not in probes.available():
        return None
    # Detectors without paper claims need not declare the attribute.
    declared: dict[str, PaperClaim] = getattr(probes.get(detector), "paper_claims", {})
    if claim in declared:
        return declared[claim]
    for key, paper in declared.items():
        if "*" in key and re.fullmatch(".*".join(map(re.escape, key.split("*"))), claim):
            return paper
    return None


def verdict(row, paper: PaperClaim, alpha: float = ALPHA) -> str:
    """Whether a claim's row (estimate, ci_low, ci_high, p_value) reproduces the paper's claim:

    - the null is excluded when the 95% interval lies wholly on one side of ``paper.null`` and the
      claim's p-value, if it has one, is below ``alpha`` (the p-value carries the family correction
      the interval does not); with no ``paper.null``, the claim's own p-value is the test, read as
      one-sided in the paper's direction;
    - reproduced: the null is excluded on the paper's side; or, where there is no null to test, the
      interval contains the paper's value;
    - not reproduced: the null is excluded on the other side; or the interval excludes the paper's
      value while the null is not excluded (or there is none to test);
    - inconclusive: the null is not excluded and the interval contains the paper's value (it spans
      both), or the paper gives only a direction; and any claim with no interval.
    """
    low, high, p_value = row.ci_low, row.ci_high, row.p_value
    if math.isnan(low) or math.isnan(high):
        return INCONCLUSIVE
    contains_value = paper.value is not None and low <= paper.value <= high
    side = _null_excluded(low, high, p_value, paper, alpha)
    if side == "untested":
        return REPRODUCED if contains_value else NOT_REPRODUCED
    if side is None:
        return INCONCLUSIVE if contains_value or paper.value is None else NOT_REPRODUCED
    return REPRODUCED if side == paper.side else NOT_REPRODUCED


def _null_excluded(low: float, high: float, p_value: float, paper: PaperClaim, alpha: float) -> str | None:
    """"above" or "below": the side of the null the interval excludes it on; None: the null is not
    excluded; "untested": there is no null to test."""
    significant = math.isnan(p_value) or p_value < alpha
    if paper.null is not None:
        if significant and low > paper.null:
            return "above"
        if significant and high < paper.null:
            return "below"
        return None
    if not math.isnan(p_value) and paper.side is not None:
        return paper.side if significant else None
    return "untested"


def paper_cell(paper: PaperClaim) -> str:
    """``0.0322, below 0.05: Wu et al. 2024 (...)``: the paper's value, its claim against the null, the source."""
    parts = [f"{paper.value:.3g}"] if paper.value is not None else []
    if paper.side is not None:
        parts.append(f"{paper.side} {paper.null:g}" if paper.null is not None else f"{paper.side} chance")
    text = ", ".join(parts) + f": {paper.source}"
    return text + (f"; {paper.note}" if paper.note else "")


def model_columns(claims: pd.DataFrame) -> pd.Series:
    """The column of each row: its model, or "model (run)" where two runs of one model make the same claim."""
    repeated = claims.duplicated(["model", "detector", "claim"], keep=False).groupby(claims["model"]).transform("any")
    return claims["model"].where(~repeated, claims["model"] + " (" + claims["run_id"] + ")")


def claims_markdown(store, run_ids: list[str], paper_claims_only: bool = False, patterns: list[str] | None = None,
                    heading_level: int = 2) -> str:
    """One Markdown table per detector: claims as rows, models as columns, then the paper's claim
    and each model's verdict where the detector declares one. ``paper_claims_only``: only the claims
    a seed paper makes (the README's results); ``patterns``: only claims matching one of these shell
    patterns (``circuits.*.circuit_size``); ``heading_level``: of each detector's heading."""
    runs = store.runs()
    models = {run: str(runs.loc[runs["run_id"] == run, "model"].iloc[0]) for run in run_ids}
    frames = [store.read("summary", run_id=run).assign(model=models[run], run_id=run) for run in run_ids]
    claims = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if not claims.empty and paper_claims_only:
        claims = claims[[paper_claim(row.detector, row.claim) is not None for row in claims.itertuples()]]
    if not claims.empty and patterns:
        claims = claims[[any(fnmatch.fnmatchcase(claim, pattern) for pattern in patterns) for claim in claims["claim"]]]
    if claims.empty:
        return "No claims in these runs.\n"
    claims["column"] = model_columns(claims)
    claims["cell"] = [claim_cell(row) for row in claims.itertuples()]
    runs_by_model = {model: [f"{run}, {run_duration(runs, run)}" for run in run_ids if models[run] == model] for model in dict.fromkeys(models.values())}
    sections = ["Runs (census time): " + "; ".join(f"{model} ({'; '.join(ids)})" for model, ids in runs_by_model.items()) + ".\n"]
    for detector, rows in claims.groupby("detector", sort=True):
        columns = list(dict.fromkeys(rows["column"]))
        table = rows.pivot_table(index="claim", columns="column", values="cell", aggfunc="first", sort=False).fillna("")[columns]
        table.columns.name = None
        table.insert(0, "what it means", [claim_detail(rows[rows["claim"] == claim]) for claim in table.index])
        papers = {claim: paper for claim in table.index if (paper := paper_claim(detector, claim)) is not None}
        if papers:
            table["paper"] = [paper_cell(papers[claim]) if claim in papers else "" for claim in table.index]
            table["verdict"] = [_verdicts(rows[rows["claim"] == claim], papers[claim], len(columns)) if claim in papers else "" for claim in table.index]
        table = table.map(lambda text: str(text).replace("|", "\\|"))  # Markdown cells
        sections.append(f"{'#' * heading_level} {detector}\n\n{table.reset_index().to_markdown(index=False)}\n")
    return "\n".join(sections)


def claim_detail(rows: pd.DataFrame) -> str:
    """What a claim means: its detail, or each column's where runs word it differently (a detail can
    hold a run's own numbers, such as the heads two circuits share)."""
    details = dict(zip(rows["column"], rows["detail"].fillna("")))
    if len(set(details.values())) <= 1:
        return next(iter(details.values()), "")
    return "; ".join(f"{column}: {detail}" for column, detail in details.items())


def run_duration(runs: pd.DataFrame, run_id: str) -> str:
    """A run's census time over the detectors it computed, and for the detectors it reused, the run
    that computed them with that run's census time: ``9 min 15 s computing (17 min 2 s CPU)`` or
    ``...; sinks reused from run R (...)``. The time is the detectors' recorded unit costs summed
    (over resumes and workers, model loading excluded); runs made before costs were recorded give
    the span from the first start to the last finish instead, which counts any pause."""
    rows = runs[runs["run_id"] == run_id]
    reused = rows["reused_from"].fillna("") if "reused_from" in rows else pd.Series("", index=rows.index)
    parts = [_census_time(rows[reused == ""])] if (reused == "").any() else []
    for source, group in rows[reused != ""].groupby(reused[reused != ""], sort=True):
        parts.append(f"{', '.join(sorted(group['detector']))} reused from run {source} ({_census_time(runs[runs['run_id'] == source])})")
    return "; ".join(parts)


def _census_time(rows: pd.DataFrame) -> str:
    if rows.empty:
        return "census time unknown"
    if "compute_s" in rows and rows["compute_s"].notna().all():
        return f"{_duration(rows['compute_s'].sum())} computing ({_duration(rows['cpu_s'].sum())} CPU)"
    return _duration((pd.to_datetime(rows["finished_at"]).max() - pd.to_datetime(rows["started_at"]).min()).total_seconds()) + " start to finish"


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (f"{hours} h " if hours else "") + (f"{minutes} min " if hours or minutes else "") + f"{seconds} s"


def _verdicts(rows: pd.DataFrame, paper: PaperClaim, n_columns: int) -> str:
    """The verdict of each column that makes the claim (just the verdict when there is one column)."""
    found = [(row.column, verdict(row, paper)) for row in rows.itertuples()]
    if n_columns == 1:
        return found[0][1]
    return "; ".join(f"{column}: {result}" for column, result in found)
