"""Retrieval-head statistics (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context Factuality").

A decoding step with generated token y gives head h credit 1 / len(needle) when the key its query row
attends to most (top-1) lies inside the needle span and holds the token y: the head is copying the
needle. A trial counts when the answer recalls the needle (ROUGE-1 recall > 0.5); a head's retrieval
score is its credit summed over a trial's steps, averaged over counted trials.

For the masking test: heads ranked by score with ties in a seeded random order, the top list (only
heads scoring above 0), and the two controls drawn outside it (uniform, and layer-matched).
"""

from __future__ import annotations

import random
import re
from collections import Counter

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

RECALL_THRESHOLD = 0.5
RETRIEVAL_THRESHOLD = 0.1


def top_key(probs: Float[Tensor, "*head row key"]) -> Int[Tensor, "*head row"]:
    """Index of the most-attended key of every query row (ties: the earliest key)."""
    return probs.argmax(dim=-1)


def copy_hits(
    top_keys: Int[Tensor, "*head row"],
    generated: Int[Tensor, " row"],
    context: Int[Tensor, " key"],
    needle: tuple[int, int],
) -> Bool[Tensor, "*head row"]:
    """Whether each row's top-1 key lies in the needle span ``[start, end)`` and holds the token that row generated."""
    start, end = needle
    in_needle = (top_keys >= start) & (top_keys < end)
    return in_needle & (context[top_keys] == generated)


def retrieval_credit(hits: Bool[Tensor, "*head row"], needle_length: int) -> Float[Tensor, "*head"]:
    """One trial's retrieval score per head: 1 / needle length for every step that copied from the needle."""
    return hits.sum(dim=-1).double() / needle_length


def retrieval_scores(credits: Float[Tensor, "trial *head"], counted: Bool[Tensor, " trial"]) -> Float[Tensor, "*head"]:
    """Mean credit over the counted trials (zeros when no trial counts)."""
    if not bool(counted.any()):
        return torch.zeros(credits.shape[1:], dtype=torch.float64)
    return credits[counted].double().mean(dim=0)


def words(text: str) -> list[str]:
    """ROUGE's default tokenization: lower case, every run of non-alphanumerics is a separator."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def unigram_recall(reference: str, candidate: str) -> float:
    """ROUGE-1 recall: the share of the reference's words (with multiplicity) that the candidate contains.

    No stemming (the reference code used the Porter stemmer; needles here are copied verbatim)."""
    wanted = Counter(words(reference))
    if not wanted:
        return 0.0
    found = Counter(words(candidate))
    return sum(min(n, found[w]) for w, n in wanted.items()) / sum(wanted.values())


def contains_verbatim(reference: str, candidate: str) -> bool:
    """Exact match: the reference's words appear in the candidate in order and contiguously (case and punctuation ignored)."""
    wanted, found = words(reference), words(candidate)
    return bool(wanted) and any(found[i : i + len(wanted)] == wanted for i in range(len(found) - len(wanted) + 1))


def fraction_above(scores: Float[Tensor, "*head"], threshold: float = RETRIEVAL_THRESHOLD) -> float:
    """Fraction of heads whose score exceeds ``threshold`` (the paper: under 5% of heads pass 0.1)."""
    return float((scores > threshold).double().mean())


def rank_heads(scores: Float[Tensor, "layer head"], seed: int) -> list[tuple[int, int]]:
    """Every head, highest score first; heads with equal scores in a seeded random order (not by
    index, which would favour early layers among the many heads tied at zero)."""
    n_layers, n_heads = scores.shape
    heads = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    random.Random(seed).shuffle(heads)
    return sorted(heads, key=lambda lh: -float(scores[lh]))  # stable: the shuffle orders the ties


def top_list(ranking: list[tuple[int, int]], scores: Float[Tensor, "layer head"], k: int) -> list[tuple[int, int]]:
    """The first ``k`` heads of ``ranking`` whose score is above zero (fewer when fewer qualify)."""
    return [lh for lh in ranking if float(scores[lh]) > 0][:k]


def random_control(
    top: list[tuple[int, int]], excluded: set[tuple[int, int]], shape: tuple[int, int], rng: random.Random
) -> list[tuple[int, int]]:
    """``len(top)`` heads drawn uniformly from the heads not in ``excluded``."""
    pool = [(layer, head) for layer in range(shape[0]) for head in range(shape[1]) if (layer, head) not in excluded]
    if len(top) > len(pool):
        raise ValueError(f"cannot draw {len(top)} heads from the {len(pool)} outside the top list")
    return sorted(rng.sample(pool, len(top)))


def layer_matched_control(
    top: list[tuple[int, int]], excluded: set[tuple[int, int]], shape: tuple[int, int], rng: random.Random
) -> list[tuple[int, int]]:
    """As many heads per layer as ``top`` has there, drawn uniformly from that layer's heads not in ``excluded``."""
    per_layer = Counter(layer for layer, _ in top)
    drawn = []
    for layer in sorted(per_layer):
        pool = [(layer, head) for head in range(shape[1]) if (layer, head) not in excluded]
        if per_layer[layer] > len(pool):
            raise ValueError(f"layer {layer} has {len(pool)} heads outside the top list, {per_layer[layer]} needed")
        drawn += rng.sample(pool, per_layer[layer])
    return sorted(drawn)
