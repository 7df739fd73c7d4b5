"""The sinks detector on the real embedded model against transformers' own output_attentions."""

from __future__ import annotations

import json

import pytest
import torch

import lens

PROBES = [
    "The lighthouse keeper counted ships every evening and wrote their names in a ledger.",
    "<|im_start|>user\nName three colours of the rainbow.<|im_end|>\n<|im_start|>assistant\nRed, orange and yellow.<|im_end|>\n",
]


def test_sinks_census_equals_output_attentions(smollm2, eager_reference, tmp_path):
    probe_file = tmp_path / "probes.jsonl"
    probe_file.write_text("\n".join(json.dumps({"text": text}) for text in PROBES) + "\n")
    result = lens.census(smollm2, ["sinks"], tmp_path / "store", probes_file=probe_file)
    frame = lens.ReportStore(tmp_path / "store").read("sinks", run_id=result.run_id).sort_values(["layer", "head"])
    assert len(frame) == smollm2.info.n_layers * smollm2.info.n_heads == 270

    reference = eager_reference(smollm2)
    first_token, first4 = torch.zeros(30, 9), torch.zeros(30, 9)
    for text in PROBES:
        tokens = smollm2.tokenize(text)
        with torch.no_grad():
            attentions = reference(tokens[None], output_attentions=True).attentions
        stacked = torch.stack([a[0] for a in attentions])  # layer head query key
        first_token += stacked[..., :, 0].mean(-1) / len(PROBES)
        first4 += stacked[..., :, :4].sum(-1).mean(-1) / len(PROBES)
    got = torch.tensor(frame["sink_score"].to_numpy(), dtype=torch.float32).view(30, 9)
    torch.testing.assert_close(got, first_token, atol=1e-4, rtol=0)
    got4 = torch.tensor(frame["sink_mass_first4"].to_numpy(), dtype=torch.float32).view(30, 9)
    torch.testing.assert_close(got4, first4, atol=1e-4, rtol=0)
    assert (frame["is_sink"] == (frame["sink_score"] > 0.3)).all()
    assert set(frame["n_prompts"]) == {2}

    summary = lens.ReportStore(tmp_path / "store").read("summary", run_id=result.run_id)
    rate = summary.set_index("metric").loc["sink_rate_eps0.3", "value"]
    assert rate == pytest.approx(100.0 * (first_token > 0.3).double().mean().item(), abs=1e-6)

    runs = lens.ReportStore(tmp_path / "store").runs(run_id=result.run_id)
    assert runs.loc[0, "model_fingerprint"] == smollm2.info.fingerprint
    assert json.loads(runs.loc[0, "params"]) == {"eps": 0.3, "n_prefix": 4}
    assert "torch" in json.loads(runs.loc[0, "versions"])


def test_builtin_sinks_probes_run_on_tiny_model(tiny_llama, store):
    result = lens.census(tiny_llama, ["sinks"], store, limit=2)
    frame = store.read("sinks", run_id=result.run_id)
    assert len(frame) == 2 * 4 and frame["sink_score"].between(0, 1).all()
