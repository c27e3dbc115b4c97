"""eval.stats on data with a known answer: the clustered bootstrap's coverage (and the naive one's
undercoverage), interval/p-value agreement, degenerate cases, the minimum detectable difference
against closed forms and a power simulation, Holm against hand-computed values, McNemar."""

import math
import time

import numpy as np
import pytest
from scipy.stats import norm

from eval.stats import (
    cluster_bootstrap_ci,
    clustered_standard_error,
    holm,
    mcnemar,
    min_detectable_difference,
    paired_cluster_bootstrap,
    symmetric_t_interval,
)

Z_SUM = norm.ppf(0.975) + norm.ppf(0.8)  # 2.8016: two-sided alpha 0.05, power 0.8


def clustered_diffs(rng: np.random.Generator, n_docs: int, delta: float, doc_sd: float, question_sd: float,
                    sizes: tuple[int, int] = (2, 15)) -> tuple[np.ndarray, list[str]]:
    """Paired differences delta + u_doc + e_question, documents of random size in [lo, hi)."""
    per_doc = rng.integers(*sizes, size=n_docs)
    doc = np.repeat(np.arange(n_docs), per_doc)
    d = delta + np.repeat(rng.normal(0, doc_sd, n_docs), per_doc) + rng.normal(0, question_sd, len(doc))
    return d, [f"doc{g}" for g in doc]


def test_questions_of_a_document_form_one_cluster_and_unlabelled_questions_their_own():
    r = paired_cluster_bootstrap([1, 2, 3, 4, 5], [0, 0, 0, 0, 1], ["x", "x", None, None, "y"], 99, 0)
    assert (r.n, r.n_clusters) == (5, 4)
    assert r.diff == pytest.approx((1 + 2 + 3 + 4 + 4) / 5)


def test_copying_every_question_within_its_document_leaves_the_clustered_interval_unchanged():
    # The clustered bootstrap must not gain precision from correlated copies; the naive one does.
    rng = np.random.default_rng(4)
    d, docs = clustered_diffs(rng, 40, 0.05, 0.1, 0.1)
    zeros = np.zeros(2 * len(d))
    once = paired_cluster_bootstrap(d, zeros[: len(d)], docs, 499, 7)
    twice = paired_cluster_bootstrap(np.repeat(d, 2), zeros, list(np.repeat(docs, 2)), 499, 7)
    assert twice.ci == pytest.approx(once.ci, rel=1e-9) and twice.p_value == once.p_value
    naive_once = paired_cluster_bootstrap(d, zeros[: len(d)], [None] * len(d), 499, 7)
    naive_twice = paired_cluster_bootstrap(np.repeat(d, 2), zeros, [None] * len(zeros), 499, 7)
    shrink = (naive_twice.ci[1] - naive_twice.ci[0]) / (naive_once.ci[1] - naive_once.ci[0])
    assert shrink == pytest.approx(1 / math.sqrt(2), abs=0.08)


def test_clustered_interval_covers_at_the_nominal_rate_and_the_naive_one_undercovers():
    # 50 documents of 2-14 questions, ICC 0.5 (design effect ~4.5), true difference 0.1.
    rng = np.random.default_rng(3)
    sims, delta = 400, 0.1
    clustered = naive = 0
    for i in range(sims):
        d, docs = clustered_diffs(rng, 50, delta, 0.15, 0.15)
        lo, hi = paired_cluster_bootstrap(d, np.zeros(len(d)), docs, 199, i).ci
        clustered += lo <= delta <= hi
        lo, hi = paired_cluster_bootstrap(d, np.zeros(len(d)), [None] * len(d), 199, i).ci
        naive += lo <= delta <= hi
    mc_se = math.sqrt(0.95 * 0.05 / sims)  # 0.011
    assert abs(clustered / sims - 0.95) <= 3 * mc_se, clustered / sims
    assert naive / sims < 0.85, naive / sims  # about 0.62: questions treated as independent


@pytest.mark.parametrize("level", [0.8, 0.9, 0.95, 0.99])
def test_interval_excludes_zero_exactly_when_p_is_below_one_minus_level(level):
    # 1 - level rounded to 12 decimals: 1 - 0.95 is 0.050000000000000044 in floating point.
    rng = np.random.default_rng(int(level * 100))
    significant = not_significant = 0
    for _ in range(150):
        n = int(rng.integers(2, 80))
        docs = [None if rng.random() < 0.2 else f"d{g}" for g in rng.integers(0, max(2, n // 3), n)]
        if rng.random() < 0.5:  # F1-like: many exact ties, many resampled differences exactly 0
            a, b = rng.choice([0, 0.5, 1], n), rng.choice([0, 0.5, 1], n, p=[0.5, 0.2, 0.3])
        else:
            a, b = rng.normal(rng.normal(0, 0.6), 1, n), rng.normal(0, 1, n)
        resamples = int(rng.integers(2 / round(1 - level, 12), 400))
        r = paired_cluster_bootstrap(a, b, docs, resamples, int(rng.integers(1e6)), level)
        assert math.isnan(r.p_value) == math.isnan(r.ci[0]) == math.isnan(r.ci[1])
        if math.isnan(r.p_value):
            continue
        excludes = r.ci[0] > 0 or r.ci[1] < 0
        assert (r.p_value < round(1 - level, 12)) == excludes, (r, resamples)
        significant += excludes
        not_significant += not excludes
    assert significant > 10 and not_significant > 10  # both sides were exercised


@pytest.mark.parametrize("resamples", [999, 1999, 500, 20])
def test_interval_and_p_agree_at_the_boundary(resamples):
    # With |t*| = 1..R and the observed t just below R - k + 1, exactly k resamples have |t*| >= |t|,
    # so p = (k + 1) / (R + 1). With R = 999 or 1999 the boundary p is exactly 0.05 (not below
    # 0.05) and the interval must then hold 0; one fewer, and it must exclude 0.
    t_star = np.arange(1.0, resamples + 1) * np.where(np.arange(resamples) % 2, 1, -1)  # signs don't matter
    boundary_seen = False
    for k in range(min(120, resamples)):
        for sign in (1, -1):
            t = sign * (resamples - k + 0.5)
            (lo, hi), p = symmetric_t_interval(t, t_star, 0.95)
            assert p == pytest.approx((k + 1) / (resamples + 1))
            assert (p < 0.05) == (lo > 0 or hi < 0), (k, p, lo, hi)
            if (k + 1) * 20 == resamples + 1:
                assert p == 0.05 and lo <= 0 <= hi
                boundary_seen = True
    assert boundary_seen == ((resamples + 1) % 20 == 0)
    # A tie: the observed |t| equal to a resampled one counts as "at least as extreme".
    (lo, hi), p = symmetric_t_interval(float(resamples - 8), t_star, 0.95)
    assert p == pytest.approx(10 / (resamples + 1)) and (p < 0.05) == (lo > 0)
    assert symmetric_t_interval(0.0, np.zeros(resamples), 0.95) == ((0.0, 0.0), 1.0)


def test_arms_that_mostly_agree_are_not_declared_different_too_often():
    # 60 questions, paired differences 0 with probability 0.9, else -1 or +1 (about 6 non-zero):
    # an equal-tailed bootstrap-t rejected 11-12% of such nulls; the symmetric one must not.
    rng = np.random.default_rng(12)
    sims = 400
    rejected = 0
    for i in range(sims):
        u = rng.random(60)
        d = np.where(u < 0.05, -1.0, np.where(u < 0.1, 1.0, 0.0))
        rejected += paired_cluster_bootstrap(d, np.zeros(60), [None] * 60, 199, i, bounds=(-1, 1)).p_value < 0.05
    assert rejected / sims <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / sims), rejected / sims


def test_bounds_keep_the_interval_finite_and_leave_p_alone():
    # 2 of 60 differences are +1, the rest 0: the 13% of resamples without a +1 have no spread,
    # so |t*| is infinite there and so is the interval; F1 differences lie in [-1, 1].
    d = np.zeros(60)
    d[[5, 40]] = 1
    free = paired_cluster_bootstrap(d, np.zeros(60), [None] * 60, 999, 0)
    bounded = paired_cluster_bootstrap(d, np.zeros(60), [None] * 60, 999, 0, bounds=(-1, 1))
    assert free.ci == (-math.inf, math.inf) and bounded.ci == (-1.0, 1.0) and bounded.p_value == free.p_value > 0.1
    assert cluster_bootstrap_ci([0.2, 0.9, 0.5], [None] * 3, 300, 0, bounds=(0, 1)) == (0.0, 1.0)  # 3 questions
    with pytest.raises(ValueError, match="hold 0"):
        paired_cluster_bootstrap(d, np.zeros(60), [None] * 60, 999, 0, bounds=(0.1, 1))


def test_degenerate_inputs():
    nan = paired_cluster_bootstrap([], [], [], 99, 0)
    assert math.isnan(nan.diff) and math.isnan(nan.p_value) and all(map(math.isnan, nan.ci)) and nan.n == 0
    with_nan = paired_cluster_bootstrap([0.5, float("nan"), 1], [0, 0, 0], ["a", "b", "c"], 99, 0)
    assert math.isnan(with_nan.diff) and math.isnan(with_nan.p_value)
    one_doc = paired_cluster_bootstrap([1, 1, 0.5], [0, 0, 0], ["a", "a", "a"], 99, 0)
    assert one_doc.diff == pytest.approx(2.5 / 3) and one_doc.n_clusters == 1
    assert math.isnan(one_doc.p_value) and all(map(math.isnan, one_doc.ci))
    tie = paired_cluster_bootstrap([0.2, 0.7, 1, 0], [0.2, 0.7, 1, 0], ["a", "a", "b", None], 99, 0)
    assert (tie.diff, tie.ci, tie.p_value) == (0.0, (0.0, 0.0), 1.0)
    constant = paired_cluster_bootstrap([0.6, 0.6, 0.6], [0.5, 0.5, 0.5], ["a", "b", "c"], 99, 0)
    assert constant.ci == pytest.approx((0.1, 0.1)) and constant.p_value == pytest.approx(1 / 100)
    with pytest.raises(ValueError, match="resamples"):
        paired_cluster_bootstrap([1, 2], [0, 0], ["a", "b"], 19, 0)  # 1 / 20 is not < 0.05
    with pytest.raises(ValueError, match="cluster labels"):
        paired_cluster_bootstrap([1, 2], [0, 0], ["a"], 99, 0)
    with pytest.raises(ValueError, match="level"):
        cluster_bootstrap_ci([1, 2], ["a", "b"], 99, 0, level=1.0)


def test_a_real_difference_is_found_and_a_fake_one_is_not():
    rng = np.random.default_rng(2)
    d, docs = clustered_diffs(rng, 60, 0.0, 0.1, 0.1)
    base = rng.uniform(0, 1, len(d))
    better = paired_cluster_bootstrap(base + 0.1 + d, base, docs, 999, 0)
    assert better.diff == pytest.approx(0.1 + d.mean()) and better.p_value < 0.01 and better.ci[0] > 0
    noise = paired_cluster_bootstrap(base + d, base, docs, 999, 0)
    assert noise.p_value > 0.05 and noise.ci[0] < 0 < noise.ci[1]
    assert paired_cluster_bootstrap(base + d, base, docs, 999, 0) == noise  # the seed fixes the resamples


def test_one_arm_interval_covers_its_mean():
    rng = np.random.default_rng(1)
    x, docs = clustered_diffs(rng, 60, 0.6, 0.05, 0.1)
    lo, hi = cluster_bootstrap_ci(x, docs, 999, 0)
    assert lo < x.mean() < hi and lo < 0.6 < hi and hi - lo < 0.1
    assert all(map(math.isnan, cluster_bootstrap_ci([0.5] * 5, ["a"] * 5, 99, 0)))


def test_2000_resamples_of_1200_questions_take_milliseconds():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(size=1200), rng.uniform(size=1200)
    for docs in ([f"d{i // 4}" for i in range(1200)], [None] * 1200):
        paired_cluster_bootstrap(a, b, docs, 2000, 0)  # warm caches
        start = time.perf_counter()
        paired_cluster_bootstrap(a, b, docs, 2000, 0)
        assert time.perf_counter() - start < 0.5  # ~10-40 ms on one core; generous for a shared CI box


def test_clustered_standard_error_closed_forms():
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1, 500)
    assert clustered_standard_error(x, [None] * 500) == pytest.approx(x.std(ddof=1) / math.sqrt(500), rel=1e-12)
    # Equal sizes: the SE of the mean of 50 cluster means.
    y, docs = rng.normal(0, 1, 400), [f"d{i // 8}" for i in range(400)]
    cluster_means = y.reshape(50, 8).mean(axis=1)
    assert clustered_standard_error(y, docs) == pytest.approx(cluster_means.std(ddof=1) / math.sqrt(50), rel=1e-12)
    assert math.isnan(clustered_standard_error([1.0, 2.0], ["a", "a"]))


def test_mdd_of_independent_questions_is_2_8_sd_over_root_n():
    rng = np.random.default_rng(6)
    d = rng.normal(0.0, 0.3, 400)
    mdd = min_detectable_difference(d, [None] * 400)
    assert mdd == pytest.approx(Z_SUM * d.std(ddof=1) / math.sqrt(400), rel=1e-12)
    assert mdd == pytest.approx(2.8 * 0.3 / 20, rel=0.1)  # the textbook 2.8 sd / sqrt(n)
    assert math.isnan(min_detectable_difference([0.1] * 10, ["one"] * 10))


def test_mdd_grows_with_the_design_effect_of_clustering():
    # 60 documents x 5 questions, ICC 0.5: Kish's deff = 1 + (5 - 1) 0.5 = 3, so the MDD is
    # about sqrt(3) times that of 300 independent questions with the same total variance.
    rng = np.random.default_rng(8)
    ratios = []
    for _ in range(50):
        d = np.repeat(rng.normal(0, 0.2, 60), 5) + rng.normal(0, 0.2, 300)
        docs = [f"d{i // 5}" for i in range(300)]
        ratios.append(min_detectable_difference(d, docs) / min_detectable_difference(d, [None] * 300))
    assert np.mean(ratios) == pytest.approx(math.sqrt(3), rel=0.08)


def test_a_true_difference_of_one_mdd_is_detected_80_percent_of_the_time():
    # Design: 60 documents x 5 questions, doc sd 0.15, question sd 0.2. True SE of the mean:
    # sqrt((0.15² + 0.2² / 5) / 60); a true difference of 2.8 SE should be found ~80% of the time.
    true_se = math.sqrt((0.15 ** 2 + 0.2 ** 2 / 5) / 60)
    delta, sims = Z_SUM * true_se, 300
    rng = np.random.default_rng(9)
    docs = [f"d{i // 5}" for i in range(300)]
    found, mdds = 0, []
    for i in range(sims):
        d = delta + np.repeat(rng.normal(0, 0.15, 60), 5) + rng.normal(0, 0.2, 300)
        found += paired_cluster_bootstrap(d, np.zeros(300), docs, 299, i).p_value < 0.05
        mdds.append(min_detectable_difference(d, docs))
    assert abs(found / sims - 0.8) <= 3 * math.sqrt(0.8 * 0.2 / sims), found / sims
    assert np.mean(mdds) == pytest.approx(delta, rel=0.05)


def test_holm_against_hand_computed_values():
    # Sorted: 0.005 x4 = 0.02, 0.01 x3 = 0.03, 0.03 x2 = 0.06, 0.04 x1 = 0.04 -> running max 0.06.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # capped
    assert holm([0.02, 0.02, 0.5]) == pytest.approx([0.06, 0.06, 0.5])  # ties
    assert holm([0.03]) == [0.03] and holm([]) == []
    nan_kept = holm([0.01, float("nan"), 0.04])  # m = 2, not 3
    assert nan_kept[0] == pytest.approx(0.02) and math.isnan(nan_kept[1]) and nan_kept[2] == pytest.approx(0.04)
    assert all(map(math.isnan, holm([float("nan")])))
    with pytest.raises(ValueError):
        holm([0.5, 1.2])


def test_holm_is_monotone_and_never_below_the_raw_p():
    rng = np.random.default_rng(10)
    for _ in range(200):
        p = rng.uniform(0, 1, int(rng.integers(1, 8))) ** 3
        adjusted = np.array(holm(p))
        order = np.argsort(p)
        assert np.all(np.diff(adjusted[order]) >= 0) and np.all(adjusted >= p) and np.all(adjusted <= 1)


def test_mcnemar_known_values():
    # 10 discordant pairs all favouring a: p = 2 * 0.5**10
    a = [True] * 10 + [True] * 20
    b = [False] * 10 + [True] * 20
    assert mcnemar(a, b) == pytest.approx(2 * 0.5 ** 10)
    assert mcnemar([True, False], [True, False]) == 1.0
    assert mcnemar([True, False], [False, True]) == pytest.approx(1.0)
