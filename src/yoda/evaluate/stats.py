"""Paired statistics between methods: Wilcoxon tests, mean +- std, ICC(3,1), Bland-Altman.

NaN values mark subjects for which a metric is undefined; they are left out (pairwise for the
paired statistics). Infinite values (e.g. the Hausdorff distance of a method that found no
lesion) are kept: the rank test counts such a pair as the largest difference, with its sign;
:func:`mean_std` shows them; the agreement statistics (ICC, Bland-Altman) need finite pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as sps

from yoda.errors import ConfigError, InputError

__all__ = [
    "wilcoxon_paired",
    "mean_std",
    "format_mean_std",
    "icc_3_1",
    "icc_3_1_ci",
    "bland_altman",
]

LOA_Z = 1.96
"""Bland-Altman limits of agreement: mean difference +- 1.96 std of the differences."""


def _vector(x: object, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise InputError(f"{name}: expected a 1-D sequence of values, got shape {arr.shape}")
    return arr


def _paired(a: object, b: object, *, finite: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The pairs of ``a`` and ``b`` without a NaN member (and, if ``finite``, no infinite one)."""
    x = _vector(a, "a")
    y = _vector(b, "b")
    if x.shape != y.shape:
        raise InputError(f"paired samples differ in length: {x.size} vs {y.size}")
    keep = np.isfinite(x) & np.isfinite(y) if finite else ~(np.isnan(x) | np.isnan(y))
    return x[keep], y[keep]


def wilcoxon_paired(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test of paired samples ``a`` and ``b``.

    Pairs with a NaN member are dropped. A pair with one infinite member (a method's failure,
    e.g. no lesion found, so an infinite Hausdorff distance) ranks above every finite difference,
    with its sign; such pairs tie with one another. Two equal infinities are a zero difference.
    Zero differences are discarded (Wilcoxon's convention; ``scipy.stats.wilcoxon`` defaults:
    exact distribution for small samples without ties, normal approximation otherwise). Returns
    1.0 when all differences are zero (identical samples) and nan when no pair is left.
    """
    x, y = _paired(a, b, finite=False)
    if x.size == 0:
        return math.nan
    with np.errstate(invalid="ignore"):
        d = x - y
    d[np.isnan(d)] = 0.0  # inf - inf: both failed alike
    infinite = np.isinf(d)
    if infinite.any():
        top = float(np.max(np.abs(d[~infinite]), initial=0.0))
        d[infinite] = np.sign(d[infinite]) * (2.0 * top + 1.0)
    d = d[d != 0]
    if d.size == 0:
        return 1.0
    return float(sps.wilcoxon(d).pvalue)


def mean_std(values: Sequence[float], ddof: int = 1) -> tuple[float, float]:
    """Mean and standard deviation (sample std, ``ddof=1``) of the non-NaN values.

    Returns (nan, nan) for no values and std nan for a single value with ``ddof=1``.
    Infinite values propagate (mean and std become inf / nan).
    """
    v = _vector(values, "values")
    v = v[~np.isnan(v)]
    if v.size == 0:
        return math.nan, math.nan
    mean = float(np.mean(v))
    if v.size <= ddof:
        return mean, math.nan
    with np.errstate(invalid="ignore"):
        std = float(np.std(v, ddof=ddof))
    return mean, std


def format_mean_std(values: Sequence[float], digits: int = 2, scale: float = 1.0) -> str:
    """``"mean ± std"`` of ``values * scale`` with ``digits`` decimals (e.g. scale=100 for %).

    A single value prints without "± std"; no values print as "n/a".
    """
    if isinstance(digits, bool) or not isinstance(digits, int) or digits < 0:
        raise ConfigError(f"digits must be a non-negative integer, got {digits!r}")
    mean, std = mean_std(np.asarray(values, dtype=np.float64) * float(scale))
    if math.isnan(mean):
        return "n/a"
    if math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _icc_table(ratings: Sequence[Sequence[float]]) -> np.ndarray:
    cols = [_vector(r, f"ratings[{i}]") for i, r in enumerate(ratings)]
    n = cols[0].size
    if any(c.size != n for c in cols):
        raise InputError(
            f"ICC: raters rate different numbers of subjects: {[c.size for c in cols]}"
        )
    table = np.stack(cols, axis=1)
    table = table[np.all(np.isfinite(table), axis=1)]
    if table.shape[0] < 2:
        raise InputError(f"ICC needs at least 2 subjects with finite ratings, got {table.shape[0]}")
    return table


def _icc_anova(table: np.ndarray) -> tuple[float, float, int, int]:
    """Mean squares of subjects (rows) and residual error of a two-way ANOVA without replication."""
    n, k = table.shape
    grand = table.mean()
    ss_rows = k * float(np.sum((table.mean(axis=1) - grand) ** 2))
    ss_cols = n * float(np.sum((table.mean(axis=0) - grand) ** 2))
    ss_total = float(np.sum((table - grand) ** 2))
    ss_err = max(ss_total - ss_rows - ss_cols, 0.0)
    df_rows, df_err = n - 1, (n - 1) * (k - 1)
    return ss_rows / df_rows, ss_err / df_err, df_rows, df_err


def icc_3_1(x: Sequence[float], y: Sequence[float], *more: Sequence[float]) -> float:
    """ICC(3,1): two-way mixed effects, consistency, single measurement (Shrout & Fleiss 1979).

    ``x``, ``y`` (and further raters in ``more``) are the ratings of the same subjects.
    ICC(3,1) = (BMS - EMS) / (BMS + (k - 1) EMS), with BMS the between-subjects and EMS the
    residual mean square of a two-way ANOVA and k the number of raters. A constant offset
    between raters does not lower it. Subjects with a non-finite rating are dropped; returns nan
    when all ratings are equal (no variance).
    """
    table = _icc_table((x, y, *more))
    bms, ems, _, _ = _icc_anova(table)
    k = table.shape[1]
    den = bms + (k - 1) * ems
    if den == 0.0:
        return math.nan
    return (bms - ems) / den


def icc_3_1_ci(
    x: Sequence[float], y: Sequence[float], *more: Sequence[float], confidence: float = 0.95
) -> tuple[float, float, float]:
    """ICC(3,1) and its confidence interval from the F distribution: (icc, low, high).

    With F = BMS / EMS, df1 = n - 1, df2 = (n - 1)(k - 1):
    F_L = F / F_(1-a/2)(df1, df2), F_U = F * F_(1-a/2)(df2, df1), and the limits are
    (F_L - 1) / (F_L + k - 1) and (F_U - 1) / (F_U + k - 1) (Shrout & Fleiss 1979; McGraw & Wong
    1996, case 3).
    """
    c = float(confidence)
    if not (0.0 < c < 1.0):
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")
    table = _icc_table((x, y, *more))
    bms, ems, df1, df2 = _icc_anova(table)
    k = table.shape[1]
    icc = icc_3_1(x, y, *more)
    if ems == 0.0 or math.isnan(icc):
        return icc, math.nan, math.nan
    f = bms / ems
    q = 1.0 - (1.0 - c) / 2.0
    f_low = f / float(sps.f.ppf(q, df1, df2))
    f_up = f * float(sps.f.ppf(q, df2, df1))
    return icc, (f_low - 1.0) / (f_low + k - 1.0), (f_up - 1.0) / (f_up + k - 1.0)


def bland_altman(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Bland-Altman agreement of paired measurements; differences are ``x - y``.

    Returns ``mean_diff``, ``sd_diff`` (sample std, ddof=1) and the 95 % limits of agreement
    ``loa_low`` / ``loa_high`` = mean_diff -+ 1.96 sd_diff. Non-finite pairs are dropped;
    at least 2 pairs are needed.
    """
    a, b = _paired(x, y)
    if a.size < 2:
        raise InputError(f"Bland-Altman needs at least 2 finite pairs, got {a.size}")
    d = a - b
    mean_diff = float(np.mean(d))
    sd = float(np.std(d, ddof=1))
    return {
        "mean_diff": mean_diff,
        "sd_diff": sd,
        "loa_low": mean_diff - LOA_Z * sd,
        "loa_high": mean_diff + LOA_Z * sd,
    }
