"""Binned attention against direct pooling of a full pattern, and at token resolution the pattern itself."""

from __future__ import annotations

import torch

from metrics.binned import add_block, bin_sizes, token_bins


def test_bins_are_consecutive_and_near_equal():
    bins = token_bins(10, 4)
    assert bins.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    assert token_bins(5, 64).tolist() == [0, 1, 2, 3, 4]  # fewer tokens than bins: one token a bin


def test_blocks_pool_to_the_direct_mean_of_bin_masses():
    generator = torch.Generator().manual_seed(0)
    n, n_heads, max_bins = 23, 3, 5
    scores = torch.randn(n_heads, n, n, generator=generator).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    attention = torch.softmax(scores, dim=-1)
    bins = token_bins(n, max_bins)
    pooled = torch.zeros(n_heads, max_bins, max_bins)
    for start in range(0, n, 7):  # blocks of rows, each with only the keys its rows can see
        stop = min(n, start + 7)
        add_block(pooled, attention[:, start:stop, :stop], bins[start:stop], bins[:stop])
    pooled /= bin_sizes(bins, max_bins)[:, None]
    one_hot = torch.nn.functional.one_hot(bins, max_bins).float()
    direct = (one_hot.T @ attention @ one_hot) / one_hot.sum(0)[:, None]
    torch.testing.assert_close(pooled, direct)
    torch.testing.assert_close(pooled.sum(-1), torch.ones(n_heads, max_bins))
