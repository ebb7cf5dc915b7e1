"""Tests of `ehrmotor.evaluate.metrics` against scikit-survival / scikit-learn and hand-computed
values, the "too few" rule, and the subject-level bootstrap."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score
from sksurv.metrics import (
    concordance_index_censored,
    concordance_index_ipcw,
    integrated_brier_score,
)
from sksurv.util import Surv

from ehrmotor.evaluate.metrics import (
    MAX_SKIPPED_SHARE,
    _concordance,
    auprc,
    auroc,
    brier_grid,
    comparable_pairs,
    concordance,
    harrell_c,
    integrated_brier,
    interval,
    paired_difference,
    subject_resamples,
    too_few,
    uno_c,
)


def survival_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer days (many ties), ~half censored, and a risk with ties and signal."""
    rng = np.random.default_rng(seed)
    risk = rng.integers(0, 6, n).astype(float)
    time = rng.integers(1, 60, n).astype(float) - 3 * risk
    return np.maximum(time, 1.0), rng.random(n) < 0.5, risk


def test_harrell_c_matches_sksurv_with_tied_times_and_risks() -> None:
    for seed in range(5):
        time, event, risk = survival_data(80, seed)
        expected = concordance_index_censored(event, time, risk)[0]
        assert harrell_c(time, event, risk) == pytest.approx(expected, abs=1e-12)


def pairwise_concordance(time: np.ndarray, event: np.ndarray, risk: np.ndarray,
                         weight: np.ndarray, event_weight: np.ndarray) -> float:
    """The definition, pair by pair: event i before j (or tied with censored j), weighted."""
    comparable = event[:, None] & ((time[None, :] > time[:, None])
                                   | ((time[None, :] == time[:, None]) & ~event[None, :]))
    pair = comparable * (weight * event_weight)[:, None] * weight[None, :]
    score = np.where(risk[:, None] == risk[None, :], 0.5, risk[:, None] > risk[None, :])
    return float((pair * score).sum() / pair.sum()) if pair.sum() else float("nan")


def test_concordance_matches_the_pairwise_definition_with_weights() -> None:
    rng = np.random.default_rng(11)
    for n in (1, 2, 37, 300, 1025):
        time = rng.integers(0, 40, n).astype(float)
        event = rng.random(n) < 0.4
        risk = rng.integers(0, 15, n) / 7  # exact ties
        weight = rng.integers(0, 4, n).astype(float)
        event_weight = rng.uniform(0.5, 3, n)
        got = _concordance(time, event, risk, weight, event_weight)[0]
        expected = pairwise_concordance(time, event, risk, weight, event_weight)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)  # nan (no pair) alike
        assert comparable_pairs(time, event) == (
            event[:, None] & ((time[None, :] > time[:, None])
                              | ((time[None, :] == time[:, None]) & ~event[None, :]))).sum()
    several = rng.normal(size=(3, 50))
    time, event = rng.integers(0, 9, 50).astype(float), rng.random(50) < 0.5
    np.testing.assert_allclose(concordance(time, event, several),
                               [harrell_c(time, event, row) for row in several])


def test_harrell_c_hand_computed() -> None:
    # Comparable pairs: (t=1 event) with t=2, 3, 4: risk 4 beats 3, 1, 2; (t=3 event) with t=4:
    # risk 1 < 2, discordant. (t=4 event, t=4 censored) is comparable too: tied risks count 1/2.
    time = np.array([1.0, 2.0, 3.0, 4.0, 4.0])
    event = np.array([True, False, True, True, False])
    risk = np.array([4.0, 3.0, 1.0, 2.0, 2.0])
    # i=0: 4 pairs, all concordant; i=2: 2 pairs (4.0 twice), both discordant; i=3: 0.5 of 1
    assert harrell_c(time, event, risk) == pytest.approx((4 + 0 + 0.5) / 7)
    assert np.isnan(harrell_c(time, np.zeros(5, dtype=bool), risk))


def test_uno_c_matches_sksurv() -> None:
    for seed in range(4):
        train_time, train_event, _ = survival_data(120, seed)
        time, event, risk = survival_data(60, seed + 100)
        keep = time < train_time.max()  # sksurv needs test times inside the training follow-up
        time, event, risk = time[keep], event[keep], risk[keep]
        for horizon in (20.0, 45.0):
            expected = concordance_index_ipcw(Surv.from_arrays(train_event, train_time),
                                              Surv.from_arrays(event, time), risk, tau=horizon)[0]
            got = uno_c(train_time, train_event, time, event, risk, horizon)
            assert got == pytest.approx(expected, abs=1e-12)


def test_uno_c_hand_checked() -> None:
    # Censoring KM from training: G = 1 until day 2, then 1 - 1/4 = 0.75, then 0.375 from day 4.
    train_time = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    train_event = np.array([True, False, True, False, True])
    time = np.array([1.5, 2.5, 3.5, 4.5])
    event = np.array([True, True, False, True])
    risk = np.array([3.0, 1.0, 2.0, 0.0])
    # Events before tau = 4: day 1.5 (weight 1/1²) beats its 3 later subjects; day 2.5 (weight
    # 1/0.75²) beats day 4.5 but not day 3.5. The day-4.5 event is past tau.
    weight = 1 / 0.75**2
    expected = (3 + weight) / (3 + 2 * weight)
    assert uno_c(train_time, train_event, time, event, risk, 4.0) == pytest.approx(expected)
    assert harrell_c(time, event, risk) == pytest.approx(4 / 5)  # the unweighted C differs
    reference = concordance_index_ipcw(Surv.from_arrays(train_event, train_time),
                                       Surv.from_arrays(event, time), risk, tau=4.0)[0]
    assert reference == pytest.approx(expected)


def test_uno_c_is_nan_where_undefined() -> None:
    train_time, train_event = np.array([1.0, 2.0, 3.0]), np.array([True, False, False])
    risk = np.array([1.0, 0.0])
    # an event after the last training time, where G is unknown (training censoring left G > 0)
    assert np.isnan(uno_c(train_time, train_event, np.array([3.5, 5.0]),
                          np.array([True, False]), risk, 10.0))
    # no event before the horizon
    assert np.isnan(uno_c(train_time, train_event, np.array([1.0, 2.0]),
                          np.array([False, True]), risk, 1.5))


def decreasing_survival(n: int, days: np.ndarray, seed: int) -> np.ndarray:
    rates = np.random.default_rng(seed).uniform(0.005, 0.05, n)
    return np.exp(-rates[:, None] * days[None, :])


def test_integrated_brier_matches_sksurv() -> None:
    for seed in range(4):
        train_time, train_event, _ = survival_data(150, seed)
        time, event, _ = survival_data(70, seed + 50)
        keep = time < train_time.max()
        time, event = time[keep], event[keep]
        days = brier_grid(time, event, horizon_days=40.0)
        assert len(days) == 20 and days[0] >= time.min() and days[-1] < time.max()
        survival = decreasing_survival(len(time), days, seed)
        expected = integrated_brier_score(Surv.from_arrays(train_event, train_time),
                                          Surv.from_arrays(event, time), survival, days)
        got = integrated_brier(train_time, train_event, time, event, survival, days)
        assert got == pytest.approx(expected, abs=1e-12)


def test_integrated_brier_without_censoring_is_the_mean_squared_error() -> None:
    time = np.array([2.0, 4.0, 6.0, 8.0, 10.0])
    event = np.ones(5, dtype=bool)
    days = np.array([3.0, 5.0, 7.0])
    survival = decreasing_survival(5, days, 0)
    alive = (time[:, None] > days[None, :]).astype(float)
    per_day = ((alive - survival) ** 2).mean(axis=0)
    expected = ((per_day[0] + per_day[1]) / 2 * 2 + (per_day[1] + per_day[2]) / 2 * 2) / 4
    assert integrated_brier(time, event, time, event, survival, days) == pytest.approx(expected)


def test_brier_grid_stays_inside_follow_up_and_horizon() -> None:
    time = np.arange(1.0, 101.0)
    event = np.ones(100, dtype=bool)
    grid = brier_grid(time, event, horizon_days=30.0, points=5)
    np.testing.assert_allclose(grid, np.linspace(1.0, 30.0, 5))
    assert brier_grid(time, event, horizon_days=1000.0)[-1] <= np.percentile(time, 95)
    assert len(brier_grid(np.array([5.0, 5.0]), np.array([True, False]), 30.0)) == 0


def test_auroc_and_auprc_match_sklearn_with_ties() -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        label = rng.random(60) < 0.3
        score = rng.integers(0, 8, 60) + label * rng.integers(0, 3, 60)
        assert auroc(label, score) == pytest.approx(roc_auc_score(label, score), abs=1e-12)
        assert auprc(label, score) == pytest.approx(average_precision_score(label, score),
                                                    abs=1e-12)
    one_class = np.zeros(5, dtype=bool)
    assert np.isnan(auroc(one_class, np.arange(5))) and np.isnan(auprc(one_class, np.arange(5)))


def test_too_few_events_positives_and_negatives() -> None:
    assert too_few(np.r_[np.ones(9), np.zeros(50)], "time_to_event") == "too few events (9 < 10)"
    assert too_few(np.r_[np.ones(10), np.zeros(50)], "time_to_event") is None
    assert too_few(np.r_[1, np.zeros(50)], "binary") == "too few positives (1 < 2)"
    assert too_few(np.r_[np.ones(40), 0], "binary") == "too few negatives (1 < 2)"
    assert too_few(np.r_[1, 1, 0, 0], "binary") is None
    with pytest.raises(ValueError, match="kind"):
        too_few(np.ones(3), "regression")


def test_subject_resamples_draw_whole_subjects_deterministically() -> None:
    subject_ids = np.repeat([7, 3, 11, 5, 2], [1, 3, 2, 4, 1])[::-1].copy()  # rows unsorted
    rows_of = Counter(subject_ids.tolist())
    resamples = subject_resamples(subject_ids, 50, seed=4)
    assert len(resamples) == 50 and resamples.rows == len(subject_ids)
    for rows in resamples:
        drawn = Counter(subject_ids[rows].tolist())
        times_drawn = {sid: count // rows_of[sid] for sid, count in drawn.items()}
        assert all(count % rows_of[sid] == 0 for sid, count in drawn.items())
        assert sum(times_drawn.values()) == len(rows_of)  # as many subjects as there are
        per_row = Counter(rows.tolist())  # every row of a drawn subject, as often as it was drawn
        assert all(per_row[row] == times_drawn[subject_ids[row]] for row in per_row)
    again = subject_resamples(subject_ids, 50, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(resamples, again, strict=True))
    other = subject_resamples(subject_ids, 50, seed=5)
    assert not all(np.array_equal(a, b) for a, b in zip(resamples, other, strict=True))


def test_paired_difference_of_a_clear_gain_and_of_identical_scorers() -> None:
    rng = np.random.default_rng(0)
    subject_ids = np.repeat(np.arange(150), 2)
    label = np.repeat(rng.random(150) < 0.4, 2)
    good = label + rng.normal(0, 0.7, len(label))
    noise = rng.normal(0, 1, len(label))
    resamples = subject_resamples(subject_ids, 200, seed=1)

    def better(rows: np.ndarray) -> float:
        return auroc(label[rows], good[rows])

    def worse(rows: np.ndarray) -> float:
        return auroc(label[rows], noise[rows])

    full, low, high = paired_difference(better, worse, resamples)
    assert full == pytest.approx(better(np.arange(len(label))) - worse(np.arange(len(label))))
    assert 0 < low < full < high
    assert paired_difference(better, better, resamples) == (0.0, 0.0, 0.0)
    single_low, single_high = interval(better, resamples)
    assert single_low < better(np.arange(len(label))) < single_high


def test_interval_is_nan_when_many_resamples_are_skipped() -> None:
    subject_ids = np.arange(20)
    resamples = subject_resamples(subject_ids, 100, seed=0)

    def needs_subject_zero(rows: np.ndarray) -> float:  # nan in about (19/20)^20 = 36 %
        return 1.0 if 0 in rows else float("nan")

    assert np.isnan(interval(needs_subject_zero, resamples)).all()
    skipped = sum(0 not in rows for rows in resamples) / len(resamples)
    assert skipped > MAX_SKIPPED_SHARE
