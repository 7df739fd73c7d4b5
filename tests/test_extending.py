"""Adding a detector is one module: a toy detector, its report schema, its view, its overview label
and colour, all defined here, appear in ``lens detectors``, a census, the overview and the HTML report
with no edit anywhere else. The fixture registers them and removes them again, so no other test sees
the toy."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import pytest

import lens
import probes
from lens._cli import main
from lens._store.schema import REPORT_SCHEMAS, Column, ReportSchema
from lens.views import VIEWS, view
from lens.views.overview import head_labels, head_table
from lens.views.report import html_report
from probes import OKABE_ITO, Detector, ForwardPass, OverviewLabel, OverviewScore

TOY_HEADS = ReportSchema(
    "toy_heads",
    "One row per head: attention of the last token on the first (the toy detector).",
    (
        Column("layer", "int64", "layer index, from 0"),
        Column("head", "int64", "query-head index within the layer, from 0"),
        Column("toy_score", "float64", "attention of the last token on the first, mean over probes"),
        Column("is_toy", "bool", "toy_score above the median over heads"),
    ),
)


class Toy(Detector):
    name = "toy"
    description = "last token's attention on the first (a test of extending the workbench)"
    reports = (TOY_HEADS,)
    probe_fields = ("text",)
    prompt_field = "text"
    color = OKABE_ITO["sky_blue"]
    overview_labels = (OverviewLabel("toy", "toy_heads", "is_toy", "x", (0.0, 0.0)),)
    overview_scores = (OverviewScore("toy_score", "toy_heads", "toy_score"),)
    accumulates = ("rows",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows: list[tuple[int, int, float]] = []

    def builtin_probes(self) -> list[dict]:
        return [{"text": "The cat sat on the mat and looked at the door."}, {"text": "One, two, three, four, five."}]

    def passes(self, probe, index):
        def consume(block: lens.AttentionBlock) -> None:
            first = block.probs[0, :, -1, 0]
            self.rows += [(block.layer, head, float(value)) for head, value in enumerate(first.tolist())]

        yield ForwardPass(self.tokens(probe["text"]), [lens.AttentionRows(consume, positions=[-1])])

    def finish(self):
        frame = pd.DataFrame(self.rows, columns=["layer", "head", "toy_score"]).groupby(["layer", "head"], as_index=False).mean()
        frame["is_toy"] = frame["toy_score"] > frame["toy_score"].median()
        return [lens.Report("toy_heads", frame)]


def toy_scores(frames):
    heads = frames["toy_heads"]
    return go.Figure(go.Bar(x=[f"L{layer}.H{head}" for layer, head in zip(heads["layer"], heads["head"])], y=heads["toy_score"], marker_color=Toy.color))


@pytest.fixture
def toy_registered():
    probes.register(Toy)
    view("toy.scores", title="Toy scores per head", reports=("toy_heads",))(toy_scores)
    yield
    probes.REGISTRY.unregister("toy")
    del VIEWS["toy.scores"]


def test_a_detector_from_one_module_is_everywhere(toy_registered, tiny_llama, tmp_path, capsys):
    assert main(["detectors"]) == 0
    assert any(line.startswith("toy ") and "toy_heads" in line for line in capsys.readouterr().out.splitlines())

    store = lens.ReportStore(tmp_path / "store")
    result = lens.census(tiny_llama, ["sinks", "toy"], store, limit=1, progress=False)
    heads = store.read("toy_heads", run_id=result.run_id)
    assert len(heads) == tiny_llama.info.n_layers * tiny_llama.info.n_heads
    assert heads["toy_score"].between(0, 1).all() and heads["is_toy"].any()

    figure = result.show("overview.labels")
    toy_markers = [trace for trace in figure.data if isinstance(trace, go.Scatter) and trace.name.startswith("toy ")]
    assert len(toy_markers) == 1 and toy_markers[0].marker.color == Toy.color
    assert len(toy_markers[0].x) == int(heads["is_toy"].sum())
    frames = {"toy_heads": heads, "sinks": store.read("sinks", run_id=result.run_id)}
    assert set(head_labels(frames)["label"]) >= {"toy"}
    assert "toy_score" in head_table(frames).columns

    page = html_report(store, result.run_id)
    assert "<section id='toy'>" in page and f"background:{Toy.color}" in page
    assert "fig-toy-scores" in page and "Toy scores per head" in page


def test_the_toy_leaves_nothing_behind():
    # Runs after the test above in file order: its fixture has unregistered everything it added.
    assert "toy" not in probes.available() and "toy_heads" not in REPORT_SCHEMAS
    assert not any(name.startswith("toy.") for name in VIEWS)
