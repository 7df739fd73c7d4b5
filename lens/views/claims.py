"""The results table: every claim of one or more runs as Markdown, a table per detector and a column
per run (one run per model, typically), each cell the estimate, its 95% interval, n and p.

``lens report --markdown PAGE --run RUN1,RUN2`` writes it; the README's results link to the page it
makes, so no number in the docs is copied by hand.
"""

from __future__ import annotations

import math

import pandas as pd


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


def claims_markdown(store, run_ids: list[str]) -> str:
    """One Markdown table per detector: claims as rows, runs (labelled by model) as columns."""
    runs = store.runs()
    models = {run: str(runs.loc[runs["run_id"] == run, "model"].iloc[0]) for run in run_ids}
    frames = [store.read("summary", run_id=run).assign(column=f"{models[run]} ({run})") for run in run_ids]
    claims = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if claims.empty:
        return "No claims in these runs.\n"
    claims["cell"] = [claim_cell(row) for row in claims.itertuples()]
    sections = []
    for detector, rows in claims.groupby("detector", sort=True):
        table = rows.pivot_table(index="claim", columns="column", values="cell", aggfunc="first", sort=False).fillna("")
        details = rows.drop_duplicates("claim").set_index("claim")["detail"].str.replace("|", "\\|", regex=False)  # Markdown cells
        table.insert(0, "what it means", details.reindex(table.index).fillna(""))
        sections.append(f"## {detector}\n\n{table.reset_index().to_markdown(index=False)}\n")
    return "\n".join(sections)
