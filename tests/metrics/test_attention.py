"""Shared attention reductions on synthetic tensors with planted answers."""

import torch

from metrics.attention import key_importance, prefix_mass, queries_seeing, received_attention
from metrics.sinks import sink_rate


def _causal_uniform(n: int) -> torch.Tensor:
    return torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]


def test_planted_first_token_sink_has_importance_one():
    n = 6
    probs = torch.zeros(2, n, n)
    probs[0, :, 0] = 1.0  # head 0: every query on the first token
    probs[1] = _causal_uniform(n)  # head 1: uniform over the prefix
    importance = key_importance(received_attention(probs))
    assert torch.allclose(importance[0], torch.tensor([1.0, 0, 0, 0, 0, 0]))
    expected_uniform_first = (1.0 / torch.arange(1, n + 1)).mean()
    assert torch.isclose(importance[1, 0], expected_uniform_first)
    # direct definition: mean over t >= k of A[t, k]
    for k in range(n):
        assert torch.isclose(importance[1, k], probs[1, k:, k].mean())


def test_queries_seeing_counts_causal_rows():
    assert queries_seeing(4).tolist() == [4.0, 3.0, 2.0, 1.0]


def test_prefix_mass_is_mean_over_rows_of_first_keys():
    probs = _causal_uniform(8)[None]
    direct = probs[0, :, :4].sum(-1).mean()
    assert torch.isclose(prefix_mass(received_attention(probs), 4)[0], direct)


def test_sink_rate_counts_heads_over_eps():
    scores = torch.tensor([[[0.9, 0.1, 0.31], [0.3, 0.5, 0.0]]])  # one prompt, 2 layers x 3 heads
    assert sink_rate(scores, 0.3) == 50.0
