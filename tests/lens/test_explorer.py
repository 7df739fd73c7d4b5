"""The attention explorer on the real model: equal to eager attention at token resolution, runs on a
4,000-token text with a streaming capture, and renders in headless Chromium."""

from __future__ import annotations

import shutil
import subprocess
from pydoc_data.topics import topics

import pytest
import torch

import lens


def test_token_resolution_equals_output_attentions(smollm2, eager_reference):
    text = "The cat sat on the mat because the mat was warm."
    figure = lens.attention_explorer(smollm2, text, layer=5, bos="never")
    tokens = smollm2.tokenize(text)
    with torch.no_grad():
        expected = eager_reference(smollm2)(tokens[None], output_attentions=True).attentions[5][0]
    assert len(figure.data) == smollm2.info.n_heads
    for head, trace in enumerate(figure.data):
        torch.testing.assert_close(torch.tensor(trace.z), expected[head], atol=1e-5, rtol=0)
    assert figure.data[0].x[1] == f"1:{smollm2.token_strings(tokens[1:2])[0]!r}"
    assert [button.label for button in figure.layout.updatemenus[0].buttons][:2] == ["L5.H0", "L5.H1"]


def test_bad_layer_or_head_is_one_clear_error(smollm2):
    with pytest.raises(ValueError, match="layer 30 is out of range"):
        lens.attention_explorer(smollm2, "hello", layer=30)
    with pytest.raises(ValueError, match="head -1 is out of range"):
        lens.attention_explorer(smollm2, "hello", layer=0, head=-1)


def long_text(n_tokens: int, model) -> str:
    prose = "\n\n".join(topics[key] for key in sorted(topics))
    ids = model.tokenize(prose)[:n_tokens]
    return model.tokenizer.decode(ids)


@pytest.mark.slow
def test_four_thousand_tokens_in_a_browser(smollm2, tmp_path):
    text = long_text(4000, smollm2)
    figure = lens.attention_explorer(smollm2, text, layer=3)
    n_bins = len(figure.data[0].x)
    assert len(figure.data) == 9 and n_bins < 4000
    for trace in figure.data:  # pooled rows are still distributions over keys
        torch.testing.assert_close(torch.tensor(trace.z).double().sum(-1), torch.ones(n_bins, dtype=torch.float64), atol=1e-4, rtol=0)
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (scripts/setup.sh installs it)")
    page = tmp_path / "explorer.html"
    figure.write_html(page, include_plotlyjs=True)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=8000"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180).stdout
    # Plotly drew the heatmap and the head picker in the page.
    assert 'class="main-svg"' in dom and "heatmaplayer" in dom
    assert "updatemenu-container" in dom
