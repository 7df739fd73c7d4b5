"""Intervals, paired contrasts and multiple-test corrections for every claim the workbench makes.

One mechanism for all detectors: a claim is a statistic over sampling units (probes, trials, prompt
pairs), so its interval is a bootstrap over those units (``scipy.stats.bootstrap``, seeded), and a
contrast between two conditions measured on the same units (masked against control, with a focus
direction against without) is a paired difference with a sign-flip permutation p-value
(``scipy.stats.permutation_test``). Families of tests are corrected with Holm or Benjamini-Hochberg
(``statsmodels``). Pure functions on arrays: no model code, no I/O.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from jaxtyping import Float, Real
from scipy import stats

CONFIDENCE = 0.95
N_RESAMPLES = 4999
N_PERMUTATIONS = 9999


@dataclass(frozen=True)
class Interval:
    """A point estimate with its ``confidence`` interval over ``n`` sampling units."""

    estimate: float
    low: float
    high: float
    n: int
    method: str

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high


@dataclass(frozen=True)
class Contrast(Interval):
    """A paired difference (treated minus control) with its interval and a two-sided p-value."""

    p_value: float = math.nan


# Per-unit values as the interval functions take them: a real array of any dtype (counts too), or a
# plain sequence (possibly empty); they convert to float64 themselves.
UnitValues = Real[np.ndarray, " unit"] | Sequence[float]


def _as_units(values) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    return array[~np.isnan(array)]


def mean_interval(
    values: UnitValues,
    *,
    seed: int = 0,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
) -> Interval:
    """Mean over sampling units with a bias-corrected accelerated (BCa) bootstrap interval.

    NaN units are dropped (a trial that did not count). With fewer than two units there is no
    interval (NaN bounds); when every unit has the same value the interval is that value, since no
    resample can differ (scipy would return NaN there)."""
    units = _as_units(values)
    n = len(units)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "no units")
    estimate = float(units.mean())
    if n < 2:
        return Interval(estimate, math.nan, math.nan, n, "one unit: no interval")
    if np.all(units == units[0]):
        return Interval(estimate, estimate, estimate, n, "every unit equal: interval is the value")
    low, high, method = _bootstrap((units,), _mean, seed, confidence, n_resamples)
    return Interval(estimate, low, high, n, method)


def paired_difference(
    treated: UnitValues,
    control: UnitValues,
    *,
    seed: int = 0,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    n_permutations: int = N_PERMUTATIONS,
) -> Contrast:
    """Mean of ``treated - control`` over units measured under both conditions, its bootstrap
    interval, and a two-sided sign-flip permutation p-value (exact when 2**n is small).

    Units with NaN in either condition are dropped from both."""
    treated = np.asarray(treated, dtype=np.float64).reshape(-1)
    control = np.asarray(control, dtype=np.float64).reshape(-1)
    if treated.shape != control.shape:
        raise ValueError(f"paired conditions need the same units: {treated.shape} vs {control.shape}")
    keep = ~(np.isnan(treated) | np.isnan(control))
    differences = treated[keep] - control[keep]
    # The estimate and its interval are those of the mean difference; pairing adds the p-value.
    interval = mean_interval(differences, seed=seed, confidence=confidence, n_resamples=n_resamples)
    n = interval.n
    if n < 2:
        return Contrast(interval.estimate, interval.low, interval.high, n, f"paired difference; {interval.method}; no p-value")
    if np.all(differences == differences[0]):
        # Every sign flip of a constant gives the same |mean| unless it is zero.
        p_value = 1.0 if differences[0] == 0 else float(2.0 ** (1 - n)) if n <= 30 else 0.0
        method = "exact sign-flip p-value"
    else:
        permutation = stats.permutation_test(
            (differences,),
            _mean,
            permutation_type="samples",
            n_resamples=n_permutations,
            alternative="two-sided",
            rng=np.random.default_rng(seed),
        )
        p_value, method = float(permutation.pvalue), "sign-flip permutation p-value"
    return Contrast(interval.estimate, interval.low, interval.high, n, f"paired difference; {interval.method}; {method}", p_value)


def cluster_interval(
    statistic,
    *per_unit: UnitValues,
    seed: int = 0,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
) -> Interval:
    """A statistic of several per-unit columns, resampled together by unit (a cluster bootstrap).

    For pooled statistics such as a ratio of sums over every token of every probe, where the probe,
    not the token, is the independent unit: ``statistic(*columns, axis=-1)`` must reduce along
    ``axis`` (it is called on resampled columns of shape [..., unit]). Percentile interval (BCa's
    jackknife is unreliable for ratios with empty clusters)."""
    columns = [np.asarray(column, dtype=np.float64).reshape(-1) for column in per_unit]
    n = len(columns[0])
    if any(len(column) != n for column in columns):
        raise ValueError("every per-unit column needs one value per unit")
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "no units")
    with np.errstate(divide="ignore", invalid="ignore"):
        estimate = float(statistic(*columns, axis=-1))
    if n < 2:
        return Interval(estimate, math.nan, math.nan, n, "one unit: no interval")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_resamples, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        resampled = np.asarray(statistic(*(column[draws] for column in columns), axis=-1), dtype=np.float64)
    resampled = resampled[np.isfinite(resampled)]
    if len(resampled) < n_resamples // 2:
        return Interval(estimate, math.nan, math.nan, n, "cluster bootstrap undefined in most resamples")
    tail = (1 - confidence) / 2
    low, high = np.quantile(resampled, [tail, 1 - tail])
    return Interval(estimate, float(low), float(high), n,
                    f"cluster (by unit) percentile bootstrap {confidence:.0%} interval, {n_resamples} resamples, seed {seed}")


def column_mean_intervals(
    values: Float[np.ndarray, "unit column"],
    *,
    seed: int = 0,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Per column, a percentile bootstrap interval of the mean over units (rows): (low, high, method).

    For head tables (a score per probe and head): one resample of the probes serves every head, as
    a multinomial count per probe, so 270 heads cost one matrix product. Fewer than two units: NaN."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    if n < 2:
        nan = np.full(values.shape[1:], np.nan)
        return nan, nan.copy(), "fewer than two units: no interval"
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_resamples)
    means = np.tensordot(counts, values, axes=(1, 0)) / n
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail], axis=0)
    return low, high, f"percentile bootstrap {confidence:.0%} interval over units, {n_resamples} resamples, seed {seed}"


def proportion_interval(successes: int, n: int, *, confidence: float = CONFIDENCE) -> Interval:
    """A fraction of n independent units (for example heads above a threshold) with its Wilson
    score interval, which behaves at 0 and 1 where a bootstrap collapses."""
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "no units")
    result = stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return Interval(successes / n, float(result.low), float(result.high), n, f"Wilson score {confidence:.0%} interval")


def adjust_p_values(p_values, method: str = "holm") -> np.ndarray:
    """Family-wise (``holm``) or false-discovery-rate (``fdr_bh``, Benjamini-Hochberg) adjusted
    p-values; NaN entries stay NaN and are not counted in the family."""
    from statsmodels.stats.multitest import multipletests

    p_values = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full_like(p_values, np.nan)
    present = ~np.isnan(p_values)
    if present.any():
        adjusted[present] = multipletests(p_values[present], method=method)[1]
    return adjusted


def _mean(sample, axis=-1):
    return np.mean(sample, axis=axis)


# Below this many units the percentile interval is used instead of BCa. BCa's bias correction counts
# the resampled statistics below the estimate; with few units many resamples are the same units in
# another order, whose statistic equals the estimate up to rounding, so the interval jumps with noise
# at the 1e-7 level (a batched forward pass against one at a time). The percentile interval moves
# continuously with the data.
MIN_BCA_UNITS = 10


def _bootstrap(data, statistic, seed: int, confidence: float, n_resamples: int) -> tuple[float, float, str]:
    """BCa bootstrap bounds (from ``MIN_BCA_UNITS`` units on); percentile with fewer units or when BCa
    is undefined (for example a single outlier unit)."""
    methods = ("BCa", "percentile") if len(data[0]) >= MIN_BCA_UNITS else ("percentile",)
    for method in methods:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = stats.bootstrap(
                data,
                statistic,
                n_resamples=n_resamples,
                confidence_level=confidence,
                method=method,
                vectorized=True,
                rng=np.random.default_rng(seed),
            )
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        if not (math.isnan(low) or math.isnan(high)):
            return low, high, f"{method} bootstrap {confidence:.0%} interval, {n_resamples} resamples, seed {seed}"
    return math.nan, math.nan, "bootstrap undefined"


def pool_seeds(
    estimates: Float[np.ndarray, " seed"], lows: Float[np.ndarray, " seed"], highs: Float[np.ndarray, " seed"], p_values: Float[np.ndarray, " seed"]
) -> tuple[float, float, float, float]:
    """One claim measured under several seeds (random controls, probe sampling, training) as one:
    the mean estimate; the union of the per-seed 95% intervals, so the pooled interval covers every
    seed's (conservative: it widens with the spread between seeds); and the largest p-value, so the
    pooled claim rejects its null only if every seed does. NaN bounds or p-values stay NaN."""
    estimate = float(np.nanmean(estimates)) if np.isfinite(estimates).any() else math.nan
    low = float(np.min(lows)) if np.isfinite(lows).all() else math.nan
    high = float(np.max(highs)) if np.isfinite(highs).all() else math.nan
    p_value = float(np.max(p_values)) if np.isfinite(p_values).all() else math.nan
    return estimate, low, high, p_value
