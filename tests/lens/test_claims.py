"""The results table against the seed papers: each verdict on planted summary rows, and the Markdown
table with a column per model and the paper's column."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd
import pytest

import probes
from lens.views.claims import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, claims_markdown, paper_claim, paper_cell, verdict
from probes import PaperClaim

NAN = math.nan
SPARSE = PaperClaim("Wu et al. 2024", value=33 / 1024, null=0.05)  # a value and the bound the claim is stated against
HURTS = PaperClaim("Wu et al. 2024", null=0.0, direction="below")  # a direction only
OVERLAP = PaperClaim("Merullo et al. 2024", value=0.78, direction="above")  # a value; the claim's own p tests the null
POINT = PaperClaim("a paper", value=0.5)  # a value and nothing to test it against


def _row(low, high, p=NAN, estimate=None):
    return SimpleNamespace(estimate=(low + high) / 2 if estimate is None else estimate, ci_low=low, ci_high=high, p_value=p)


@pytest.mark.parametrize(
    "paper, row, expected",
    [
        # A value and a bound: the interval below 5% reproduces whether or not it holds 33/1024.
        (SPARSE, _row(0.0, 0.014), REPRODUCED),
        (SPARSE, _row(0.01, 0.04), REPRODUCED),
        (SPARSE, _row(0.031, 0.085), INCONCLUSIVE),  # spans the paper's value and the bound
        (SPARSE, _row(0.06, 0.15), NOT_REPRODUCED),  # wholly on the other side
        (SPARSE, _row(0.04, 0.09), NOT_REPRODUCED),  # excludes the paper's value, does not exclude the bound
        # A direction only: the null must be excluded on the paper's side, with the claim's p below 0.05.
        (HURTS, _row(-0.8, -0.7, p=0.01), REPRODUCED),
        (HURTS, _row(-0.8, -0.7, p=1.0), INCONCLUSIVE),  # a Holm-adjusted p the interval alone would miss
        (HURTS, _row(-0.2, 0.3), INCONCLUSIVE),
        (HURTS, _row(0.1, 0.3, p=0.01), NOT_REPRODUCED),
        # No null value: the claim's one-sided p is its test.
        (OVERLAP, _row(0.6, 0.9, p=0.001), REPRODUCED),
        (OVERLAP, _row(0.2, 0.4, p=0.001), REPRODUCED),  # above chance, short of 78%
        (OVERLAP, _row(0.5, 0.9, p=0.3), INCONCLUSIVE),  # spans 78% and chance
        (OVERLAP, _row(0.0, 0.4, p=0.3), NOT_REPRODUCED),
        # Nothing to test against: the interval holds the value or not.
        (POINT, _row(0.4, 0.6), REPRODUCED),
        (POINT, _row(0.6, 0.7), NOT_REPRODUCED),
        # No interval: nothing to judge.
        (SPARSE, _row(NAN, NAN, estimate=0.02), INCONCLUSIVE),
    ],
)
def test_verdict_on_planted_rows(paper, row, expected):
    assert verdict(row, paper) == expected


def test_a_paper_claim_needs_a_direction_it_can_state():
    with pytest.raises(ValueError, match="say the direction"):
        PaperClaim("no value, no direction", null=0.0)
    with pytest.raises(ValueError, match="not 'above' or 'below'"):
        PaperClaim("bad", value=1.0, direction="up")
    assert SPARSE.side == "below" and OVERLAP.side == "above" and POINT.side is None
    assert paper_cell(SPARSE) == "0.0322, below 0.05: Wu et al. 2024" and paper_cell(OVERLAP).startswith("0.78, above chance")


def test_every_declared_paper_claim_names_a_claim_its_detector_makes():
    """Keys name the detector's claims (or a pattern over them); the lookup finds them by name."""
    declared = {name: probes.get(name).paper_claims for name in probes.available() if getattr(probes.get(name), "paper_claims", None)}
    assert {"sinks", "retrieval", "contextual", "preplan_anchor", "circuits"} <= set(declared)
    for detector, claims in declared.items():
        for key, paper in claims.items():
            assert key.startswith(f"{detector}.") and paper.source and paper.side in ("above", "below")
    assert paper_claim("retrieval", "retrieval.masking_effect_k20_random") is declared["retrieval"]["retrieval.masking_effect_k*_random"]
    assert paper_claim("retrieval", "retrieval.masking_effect_k20_layer_matched") is None  # the paper's control was random heads
    assert paper_claim("preplan_anchor", "preplan_anchor.lift_within_2[no_sink]") is not None
    assert paper_claim("sinks", "sinks.sink_levels") is None and paper_claim("no_such_detector", "x") is None


class PlantedStore:
    """The two things the table reads from a store: the run manifest and each run's summary."""

    def __init__(self, summaries: dict[tuple[str, str], pd.DataFrame]):
        self.summaries = summaries

    def runs(self):
        # Each run's census spanned (its number) minutes: r1 1 min, r2 2 min, ...; r1 recorded its units' costs.
        return pd.DataFrame([{"run_id": run, "model": model, "started_at": "2026-12-03T10:00:00+00:00",
                              "finished_at": f"2026-12-03T10:0{run[1:]}:00+00:00",
                              "compute_s": 50.0 if run == "r1" else None, "cpu_s": 95.0 if run == "r1" else None} for run, model in self.summaries])

    def read(self, report_type, run_id):
        assert report_type == "summary"
        return next(frame for (run, _), frame in self.summaries.items() if run == run_id)


def _summary(detector, rows):
    return pd.DataFrame(
        [dict(detector=detector, claim=claim, estimate=(low + high) / 2, ci_low=low, ci_high=high, n=30, unit="trials", p_value=p,
              method="planted", detail=f"what {claim} means") for claim, low, high, p in rows]
    )


def test_markdown_has_a_column_per_model_and_the_papers_verdicts():
    small = _summary("retrieval", [("retrieval.fraction_of_heads", 0.031, 0.085, NAN), ("retrieval.masking_effect_k10_random", -0.8, -0.6, 0.001),
                                   ("retrieval.recall_rate", 0.8, 0.95, NAN)])
    large_a = _summary("retrieval", [("retrieval.fraction_of_heads", 0.0, 0.02, NAN)])  # two runs of one model, different claims
    large_b = _summary("retrieval", [("retrieval.masking_effect_k10_random", 0.05, 0.2, 0.01)])
    store = PlantedStore({("r1", "small"): small, ("r2", "large"): large_a, ("r3", "large"): large_b})
    text = claims_markdown(store, ["r1", "r2", "r3"])
    assert ("Runs (census time): small (r1, 50 s computing (1 min 35 s CPU)); "
            "large (r2, 2 min 0 s start to finish; r3, 3 min 0 s start to finish).") in text
    lines = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| retrieval.")}
    header = [cell.strip() for cell in next(line for line in text.splitlines() if line.startswith("| claim")).split("|")[1:-1]]
    assert header == ["claim", "what it means", "small", "large", "paper", "verdict"]
    fraction = dict(zip(header, lines["retrieval.fraction_of_heads"]))
    assert fraction["small"].startswith("0.058 [0.031, 0.085] n=30 trials") and fraction["large"].startswith("0.01 [0, 0.02]")
    assert fraction["paper"].startswith("0.0322, below 0.05: Wu et al. 2024")
    assert fraction["verdict"] == "small: inconclusive; large: reproduced"
    masking = dict(zip(header, lines["retrieval.masking_effect_k10_random"]))
    assert masking["verdict"] == "small: reproduced; large: not reproduced"
    recall = dict(zip(header, lines["retrieval.recall_rate"]))
    assert recall["paper"] == recall["verdict"] == "" and recall["large"] == ""


def test_markdown_of_one_run_gives_the_verdict_alone_and_no_paper_column_without_paper_claims():
    rows = _summary("sinks", [("sinks.sink_rate", 55.0, 70.0, NAN), ("sinks.sink_levels", 2.0, 2.0, NAN)])
    text = claims_markdown(PlantedStore({("r1", "small"): rows}), ["r1"])
    rate = next(line for line in text.splitlines() if line.startswith("| sinks.sink_rate "))
    assert rate.rstrip(" |").endswith("| reproduced")
    other = _summary("unknown_detector", [("unknown_detector.x", 0.0, 1.0, NAN)])
    text = claims_markdown(PlantedStore({("r1", "small"): other}), ["r1"])
    header = next(line for line in text.splitlines() if line.startswith("| claim"))
    assert header.split("|")[1:-1][-1].strip() == "small" and "verdict" not in text


def test_paper_claims_only_keeps_the_claims_a_seed_paper_makes():
    rows = _summary("retrieval", [("retrieval.fraction_of_heads", 0.031, 0.085, NAN), ("retrieval.recall_rate", 0.8, 0.95, NAN)])
    store = PlantedStore({("r1", "small"): rows})
    text = claims_markdown(store, ["r1"], paper_claims_only=True, heading_level=3)
    assert "### retrieval" in text and "retrieval.fraction_of_heads" in text and "retrieval.recall_rate" not in text
    assert "retrieval.recall_rate" in claims_markdown(store, ["r1"])


def test_claim_patterns_select_claims_by_shell_pattern():
    rows = _summary("circuits", [("circuits.ioi.circuit_size", 3, 3, NAN), ("circuits.ioi.faithfulness", 0.7, 0.9, NAN),
                                 ("circuits.ioi~capitals.path_patching.reuse", 0.1, 0.5, 0.02)])
    text = claims_markdown(PlantedStore({("r1", "small"): rows}), ["r1"], patterns=["circuits.*.circuit_size", "circuits.*~*.reuse"])
    assert "circuits.ioi.circuit_size" in text and "circuits.ioi~capitals.path_patching.reuse" in text
    assert "circuits.ioi.faithfulness" not in text


def test_a_claim_worded_differently_by_two_runs_shows_each_runs_wording():
    small = _summary("circuits", [("circuits.a~b.path_patching.reuse", 0.1, 0.5, 0.02)]).assign(detail="2 shared of 10 heads")
    large = _summary("circuits", [("circuits.a~b.path_patching.reuse", 0.2, 0.6, 0.03)]).assign(detail="1 shared of 4 heads")
    text = claims_markdown(PlantedStore({("r1", "small"): small, ("r2", "large"): large}), ["r1", "r2"])
    assert "small: 2 shared of 10 heads; large: 1 shared of 4 heads" in text
