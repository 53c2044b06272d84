from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats as sps

from yoda.errors import InputError
from yoda.evaluate.stats import (
    bland_altman,
    format_mean_std,
    icc_3_1,
    icc_3_1_ci,
    mean_std,
    wilcoxon_paired,
)

# Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges; published ICC(3,1) = .71
SHROUT_FLEISS = np.array(
    [
        [9, 2, 5, 8],
        [6, 1, 3, 2],
        [8, 4, 6, 8],
        [7, 1, 2, 6],
        [10, 5, 6, 9],
        [6, 2, 4, 7],
    ],
    dtype=float,
)


def test_wilcoxon_identical_samples_give_p_one_without_warnings():
    a = [0.91, 0.93, 0.95, 0.90]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert wilcoxon_paired(a, list(a)) == 1.0


def test_wilcoxon_exact_p_value_of_all_positive_differences():
    # n = 6 distinct positive differences: only 1 of 2^6 sign patterns is as extreme per side
    a = np.array([1.1, 2.2, 3.3, 4.4, 5.5, 6.6])
    b = np.zeros(6)
    assert wilcoxon_paired(a, b) == pytest.approx(2 / 2**6)
    assert wilcoxon_paired(b, a) == pytest.approx(2 / 2**6)


def test_wilcoxon_drops_nan_pairs_and_equal_infinities():
    rng = np.random.default_rng(0)
    a = rng.normal(size=20)
    b = a + rng.normal(0.3, 1.0, 20)
    p = wilcoxon_paired(a, b)
    a2 = np.append(a, [np.nan, 1.0, np.inf])
    b2 = np.append(b, [0.0, np.nan, np.inf])
    assert wilcoxon_paired(a2, b2) == pytest.approx(p)
    assert 0.0 < p < 1.0


def test_wilcoxon_ranks_a_failure_above_every_finite_difference():
    # a method that finds no lesion on 6 of 12 subjects (infinite distance) and is slightly
    # better on the other 6 is not better: its failures count as the largest differences
    ref = np.arange(1.0, 13.0)
    method = ref.copy()
    method[:6] -= 0.1 * np.arange(1, 7)
    method[6:] = np.inf
    p = wilcoxon_paired(method, ref)
    d = np.concatenate([-0.1 * np.arange(1, 7), np.full(6, 100.0)])  # failures tie at the top
    assert p == pytest.approx(sps.wilcoxon(d).pvalue)
    assert p > 0.1
    # dropping the failures instead would have called the method significantly better
    assert sps.wilcoxon(method[:6], ref[:6]).pvalue < 0.05
    # the sign counts: failures of the reference favour the method
    assert wilcoxon_paired(ref, method) == pytest.approx(p)
    assert math.isnan(wilcoxon_paired([np.nan], [1.0]))
    with pytest.raises(InputError, match="length"):
        wilcoxon_paired([1, 2], [1, 2, 3])


def test_mean_std_and_format():
    assert mean_std([1, 2, 3, 4]) == pytest.approx((2.5, math.sqrt(5 / 3)))
    assert mean_std([1, 2, np.nan, 3, 4]) == pytest.approx((2.5, math.sqrt(5 / 3)))
    m, s = mean_std([7.0])
    assert m == 7.0 and math.isnan(s)
    assert all(math.isnan(v) for v in mean_std([]))
    assert format_mean_std([0.9731, 0.9640, 0.9822], digits=2, scale=100) == "97.31 ± 0.91"
    assert format_mean_std([3.0]) == "3.00"
    assert format_mean_std([]) == "n/a"


def test_icc_3_1_matches_shrout_fleiss_published_value():
    t = SHROUT_FLEISS
    assert icc_3_1(*t.T) == pytest.approx(0.715, abs=0.001)


def test_icc_3_1_two_raters_matches_explicit_anova_sums():
    x = [4.0, 7.0, 2.0, 9.0, 5.0, 6.0, 3.0]
    y = [5.0, 6.0, 3.0, 10.0, 4.0, 8.0, 3.5]
    n, k = len(x), 2
    rows = [(xi, yi) for xi, yi in zip(x, y, strict=True)]
    grand = sum(xi + yi for xi, yi in rows) / (n * k)
    ss_subjects = sum(k * ((xi + yi) / 2 - grand) ** 2 for xi, yi in rows)
    mean_x, mean_y = sum(x) / n, sum(y) / n
    ss_raters = n * ((mean_x - grand) ** 2 + (mean_y - grand) ** 2)
    ss_total = sum((v - grand) ** 2 for r in rows for v in r)
    ss_error = ss_total - ss_subjects - ss_raters
    bms = ss_subjects / (n - 1)
    ems = ss_error / ((n - 1) * (k - 1))
    expected = (bms - ems) / (bms + (k - 1) * ems)
    assert icc_3_1(x, y) == pytest.approx(expected, rel=1e-12)


def test_icc_3_1_ignores_a_constant_offset_between_raters():
    x = np.random.default_rng(1).normal(size=30)
    assert icc_3_1(x, x + 5.0) == pytest.approx(1.0)
    assert icc_3_1(x, -x) == pytest.approx(-1.0)


def test_icc_3_1_confidence_interval_covers_the_true_value():
    # x = t + e1, y = t + e2 with var(t) = var(e) = 1: population ICC(3,1) = 0.5
    rng = np.random.default_rng(2)
    n_rep, n = 400, 30
    hits = 0
    for _ in range(n_rep):
        t = rng.normal(size=n)
        icc, lo, hi = icc_3_1_ci(t + rng.normal(size=n), t + rng.normal(size=n))
        assert lo <= icc <= hi
        hits += lo <= 0.5 <= hi
    assert 0.91 <= hits / n_rep <= 0.98


def test_bland_altman_closed_form():
    x = np.array([10.0, 12.0, 14.0, 16.0, 18.0])
    y = x - np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    ba = bland_altman(x, y)
    sd = math.sqrt(2.5)
    assert ba["mean_diff"] == pytest.approx(3.0)
    assert ba["sd_diff"] == pytest.approx(sd)
    assert ba["loa_low"] == pytest.approx(3.0 - 1.96 * sd)
    assert ba["loa_high"] == pytest.approx(3.0 + 1.96 * sd)
    with pytest.raises(InputError):
        bland_altman([1.0], [2.0])
