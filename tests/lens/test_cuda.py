"""The CUDA path: capture and a census on the GPU equal the same on the CPU (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

import lens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

TEXT = " ".join(f"Item {i} is stored in box {i * 7 % 13}." for i in range(40))


@pytest.fixture(scope="module")
def smollm2_cuda():
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 on both devices
    return lens.load("smollm2-135m", device="cuda")


def _received(model, tokens, positions=None):
    """Attention received by every key, per layer and head, from all rows or from ``positions``."""
    received = torch.zeros(model.info.n_layers, model.info.n_heads, len(tokens), dtype=torch.float64)

    def consume(block: lens.AttentionBlock) -> None:
        assert block.probs.device.type == model.device.type
        received[block.layer, :, : block.n_keys] += block.probs[0].sum(-2).double().cpu()

    logits = []
    lens.capture(model, tokens, [lens.AttentionRows(consume, positions=positions), lens.Logits(logits.append, positions=[-1])])
    return received, logits[0].cpu()


@pytest.mark.parametrize("positions", [None, [0, 17, -1]])
def test_capture_on_cuda_equals_cpu(smollm2, smollm2_cuda, positions):
    tokens = smollm2.tokenize(TEXT)
    assert len(tokens) > 2 * 64  # several blocks
    on_cpu, logits_cpu = _received(smollm2, tokens, positions)
    on_cuda, logits_cuda = _received(smollm2_cuda, tokens, positions)
    assert on_cpu.abs().sum() > 0
    torch.testing.assert_close(on_cuda, on_cpu, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits_cuda, logits_cpu, atol=1e-3, rtol=0)


def test_sinks_census_on_cuda_equals_cpu(smollm2, smollm2_cuda, tmp_path):
    probes = [{"text": TEXT}]
    scores = []
    for model in (smollm2, smollm2_cuda):
        result = lens.census(model, ["sinks"], tmp_path / "store", probes={"sinks": probes}, params={"sinks": {"calibrate": "false"}})
        frame = lens.ReportStore(tmp_path / "store").read("sinks", run_id=result.run_id)
        scores.append(torch.tensor(frame.sort_values(["layer", "head"])["sink_score"].to_numpy()))
    torch.testing.assert_close(scores[1], scores[0], atol=1e-4, rtol=0)


def test_generation_and_interventions_on_cuda(smollm2_cuda):
    info = smollm2_cuda.info
    tokens = smollm2_cuda.tokenize("The capital of France is")
    plain = lens.generate(smollm2_cuda, tokens, max_new_tokens=5)
    with lens.session(smollm2_cuda, (), [lens.ZeroQuery(layer, range(info.n_heads)) for layer in range(info.n_layers)]):
        ablated = lens.generate(smollm2_cuda, tokens, max_new_tokens=5)
    assert plain.text.strip()
    assert ablated.text != plain.text  # every head's query zeroed changes the answer
