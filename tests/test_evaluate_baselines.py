"""The evaluation's baselines and the rules that keep small test sets honest: the demographic
baseline (age, and sex where the data has it), "MOTOR − best baseline", a diverging Cox fit
falling back to a stronger penalty, and tau for Uno's C and the integrated Brier score."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from meds_builders import rows_table, write_table

from ehrmotor.evaluate import heads
from ehrmotor.evaluate.demographics import demographic_features
from ehrmotor.evaluate.metrics import at_risk_tau, subject_resamples, uno_c
from ehrmotor.evaluate.protocol import (
    Draw,
    Fit,
    Targets,
    TaskData,
    fit_task,
    methods_for,
)
from ehrmotor.evaluate.report import Report, markdown
from ehrmotor.evaluate.run import task_data
from ehrmotor.evaluate.scoring import (
    DIFFERENCE,
    RESULT_SCHEMA,
    metrics_for,
    score_difference,
    score_method,
    task_scoring,
)
from ehrmotor.evaluate.tasks import Task

AT = datetime(2020, 1, 1)
TTE = "time_to_event"


def brute_force_c(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C over every pair, one at a time: i an event, j later (or censored at i's time)."""
    concordant = pairs = 0.0
    for i in range(len(time)):
        for j in range(len(time)):
            if event[i] and (time[j] > time[i] or (time[j] == time[i] and not event[j])):
                pairs += 1
                concordant += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return concordant / pairs


def demographic_meds(root: Path, ages: np.ndarray, sexes: list[str | None]) -> Path:
    """One shard: subject i born `ages[i]` years before AT (by MEDS_BIRTH, with an earlier
    event for odd subjects: birth is MEDS_BIRTH, not the first event), static sex codes."""
    rows: list[dict[str, Any]] = []
    for sid, (age, sex) in enumerate(zip(ages, sexes, strict=True)):
        birth = AT - timedelta(days=float(age) * 365.25)
        if sid % 2:
            rows.append({"subject_id": sid, "time": birth - timedelta(days=3000),
                         "code": "Visit/OP"})
        rows += [{"subject_id": sid, "time": None, "code": "Race/x"},
                 {"subject_id": sid, "time": birth, "code": "MEDS_BIRTH"},
                 {"subject_id": sid, "time": AT, "code": "Visit/OP"}]
        if sex is not None:
            rows.append({"subject_id": sid, "time": None, "code": sex})
    rows.sort(key=lambda r: (r["subject_id"], r["time"] is not None, r["time"] or AT))
    write_table(root / "data/0.parquet", rows_table(rows))
    return root


def test_age_baseline_harrell_c_is_the_pairwise_count_of_age(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    n = 60
    ages = np.round(rng.uniform(20, 90, n), 1)
    points = pl.DataFrame({"subject_id": np.arange(n), "prediction_time": [AT] * n})
    meds = demographic_meds(tmp_path / "age", ages, [None] * n)
    matrix, names = demographic_features(meds, points)
    assert names == ["age_years"]  # Race/x is static with one value, not a sex family
    assert matrix[:, 0] == pytest.approx(ages, abs=1 / 365)  # from MEDS_BIRTH, in years

    time = rng.exponential(2000 / np.exp((ages - 55) / 15))  # older: sooner
    event = rng.random(n) < 0.8
    data = TaskData(np.arange(n), np.arange(n), Targets(time, event), np.arange(30),
                    np.arange(30, 60))
    (method,) = [m for m in methods_for(TTE) if m.family == "demographics"]
    assert (method.name, method.title) == ("age_sex_cox", "age (+sex) Cox")
    fits = fit_task(data, [method], {"demographics": matrix}, [Draw(None, 0, np.arange(30, 60))],
                    seed=0, bin_edges_days=[0.0], horizon_days=365)
    scoring = task_scoring("t", TTE, data, subject_resamples(np.arange(30), 5, 0))
    row = score_method(scoring, method, metrics_for(TTE, 365)[0], None, fits[method.name])
    assert row is not None
    expected = brute_force_c(time[:30], event[:30], ages[:30])
    assert row["mean"] == pytest.approx(expected, abs=1e-9)


def test_sex_is_a_one_hot_of_the_static_family_with_two_values(tmp_path: Path) -> None:
    sexes: list[str | None] = ["GENDER//F", "GENDER//M", None, "GENDER//F"]
    points = pl.DataFrame({"subject_id": [0, 1, 2, 3, 3], "prediction_time": [AT] * 5})
    meds = demographic_meds(tmp_path / "sex", np.array([30.0, 40.0, 50.0, 60.0]), sexes)
    matrix, names = demographic_features(meds, points)
    assert names == ["age_years", "sex/GENDER//F", "sex/GENDER//M"]
    assert matrix[:, 1:].tolist() == [[1, 0], [0, 1], [0, 0], [1, 0], [1, 0]]


def test_difference_takes_the_best_baseline_over_counts_and_demographics() -> None:
    rng = np.random.default_rng(2)
    n = 80
    age = rng.uniform(20, 90, n)
    time = rng.exponential(500 / np.exp((age - 55) / 10))  # only age matters
    event = rng.random(n) < 0.7
    data = TaskData(np.arange(n), np.arange(n), Targets(time, event), np.arange(40),
                    np.arange(40, 80), days=np.array([20.0, 40.0]))
    scoring = task_scoring("only_age", TTE, data, subject_resamples(np.arange(40), 30, 0))
    methods = methods_for(TTE)
    assert {m.name for m in methods if m.family == "demographics"} == {"age_sex_cox"}
    assert {m.name for m in methods_for("binary") if m.family == "demographics"} == {
        "age_sex_logistic"}
    draw = Draw(None, 0, np.arange(40, 80))
    risk = {m.name: rng.normal(size=40) for m in methods}  # noise for MOTOR and counts
    risk["age_sex_cox"] = age[:40]
    fits = {name: [Fit(draw, risk=r, survival=np.full((40, 2), 0.5))] for name, r in risk.items()}
    harrell = metrics_for(TTE, 365)[0]
    cells = {m.name: score_method(scoring, m, harrell, None, fits[m.name]) for m in methods}
    row = score_difference(scoring, harrell, None, cells, methods, fits)
    assert row is not None and row["method"] == DIFFERENCE == "motor_minus_best_baseline"
    motor = max(("motor_cox", "motor_head"), key=lambda name: cells[name]["mean"])
    assert row["note"] == f"{motor} - age_sex_cox"
    assert row["mean"] == pytest.approx(cells[motor]["mean"] - cells["age_sex_cox"]["mean"])
    assert row["mean"] < 0
    results = pl.DataFrame([*cells.values(), row], schema=RESULT_SCHEMA)
    labels = pl.DataFrame({"subject_id": np.arange(n), "prediction_time": [AT] * n,
                           "time_days": time, "event": event})
    text = markdown(Report(results, [Task("only_age", TTE, labels, False)], [], [], 365))
    assert "| counts LightGBM | age (+sex) Cox | MOTOR − best baseline |" in text


class Diverging(heads.CoxnetSurvivalAnalysis):  # type: ignore[misc]
    """Coxnet that diverges on a path reaching below `floor` of its largest alpha."""

    floor = 0.1

    def fit(self, x: np.ndarray, y: np.ndarray) -> Any:
        if self.alphas is None and self.alpha_min_ratio < Diverging.floor:
            raise ArithmeticError("Numerical error, because weights are too large. Consider "
                                  "increasing alpha.")
        return super().fit(x, y)


def cox_task() -> tuple[TaskData, np.ndarray]:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(60, 3))
    time = rng.exponential(100 / np.exp(x[:, 0]))
    event = rng.random(60) < 0.8
    return (TaskData(np.arange(60), np.arange(60), Targets(time, event), np.arange(20),
                     np.arange(20, 60), days=np.array([5.0, 10.0])), x)


def test_diverging_cox_fit_falls_back_to_a_stronger_penalty(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heads, "CoxnetSurvivalAnalysis", Diverging)
    data, x = cox_task()
    (method,) = [m for m in methods_for(TTE) if m.name == "counts_cox"]
    draw = Draw(None, 0, np.arange(20, 60))
    features = {"counts": x, "demographics": x[:, :1]}
    (fit,) = fit_task(data, [method], features, [draw], seed=0, bin_edges_days=[0.0],
                      horizon_days=365)["counts_cox"]
    assert fit.skipped is None and fit.risk is not None
    assert fit.fallback is not None
    assert fit.fallback.startswith("Cox fit diverged at alpha_min_ratio 0.01 (Numerical error, "
                                   "because weights are too large.")
    assert "refitted at 0.1, alpha " in fit.fallback and fit.fallback.endswith(" chosen")
    scoring = task_scoring("t", TTE, data, subject_resamples(np.arange(20), 5, 0))
    row = score_method(scoring, method, metrics_for(TTE, 365)[0], None, [fit])
    assert row is not None and np.isfinite(row["mean"])
    assert row["note"].startswith("penalty raised in 1 of 1 draws: Cox fit diverged")

    Diverging.floor = 2.0  # every penalty diverges: the draw is skipped, with the reason
    try:
        (fit,) = fit_task(data, [method], features, [draw], seed=0, bin_edges_days=[0.0],
                          horizon_days=365)["counts_cox"]
    finally:
        Diverging.floor = 0.1
    assert fit.skipped == ("Cox fit failed at every alpha_min_ratio up to 0.5: Numerical error, "
                           "because weights are too large. Consider increasing alpha.")
    row = score_method(scoring, method, metrics_for(TTE, 365)[0], None, [fit])
    assert row is not None and np.isnan(row["mean"])
    assert row["note"] == f"no draw could be fitted (1 skipped); fit failed: {fit.skipped}"


def test_tau_is_the_last_day_with_enough_test_labels_at_risk() -> None:
    assert at_risk_tau(np.arange(1.0, 51.0), 365) == 41.0  # 10 labels at risk (10% is 5)
    assert at_risk_tau(np.arange(1.0, 201.0), 365) == 181.0  # 20 = 10% at risk
    assert at_risk_tau(np.arange(1.0, 201.0), 100) == 100.0  # capped at the horizon
    assert np.isnan(at_risk_tau(np.arange(1.0, 10.0), 365))  # fewer than 10 labels


def tau_task(late_events: bool) -> tuple[TaskData, Any]:
    """100 test and 100 pool labels at days 1..100; test events every 5 days (20 of them) or,
    when `late_events`, 4 before day 91 (tau) and 10 after it."""
    time = np.tile(np.arange(1.0, 101.0), 2)
    event = time % 5 == 0
    if late_events:
        event[:100] = np.isin(time[:100], [10, 30, 50, 70, *range(91, 101)])
    subjects = np.arange(200)
    labels = pl.DataFrame({"subject_id": subjects, "prediction_time": [AT] * 200,
                           "time_days": time, "event": event})
    points = labels.select("subject_id", "prediction_time")
    data = task_data(Task("tau", TTE, labels, False), points, subjects[:100], 365)
    return data, subject_resamples(subjects[:100], 20, 0)


def test_uno_and_brier_read_up_to_tau_and_report_it() -> None:
    data, resamples = tau_task(late_events=False)
    assert data.days[-1] <= 91.0  # the Brier grid ends at tau
    scoring = task_scoring("tau", TTE, data, resamples, 365)
    assert (scoring.tau, scoring.tau_events) == (91.0, 18)
    rng = np.random.default_rng(0)
    risk = -data.targets.days[:100] + rng.normal(0, 30, 100)
    fit = Fit(Draw(None, 0, np.arange(100, 200)), risk=risk,
              survival=np.full((100, len(data.days)), 0.5))
    (method,) = [m for m in methods_for(TTE) if m.name == "motor_cox"]
    uno, brier = metrics_for(TTE, 365)[1:]
    row = score_method(scoring, method, uno, None, [fit])
    assert row is not None and (row["tau_days"], row["events_before_tau"]) == (91.0, 18)
    pool_time, pool_event = data.targets.days[100:], data.targets.event[100:]
    assert row["mean"] == pytest.approx(uno_c(pool_time, pool_event, data.targets.days[:100],
                                              data.targets.event[:100], risk, 91.0))
    assert row["mean"] != pytest.approx(uno_c(pool_time, pool_event, data.targets.days[:100],
                                              data.targets.event[:100], risk, 365.0))
    brier_row = score_method(scoring, method, brier, None, [fit])
    assert brier_row is not None and brier_row["tau_days"] == 91.0
    harrell = score_method(scoring, method, metrics_for(TTE, 365)[0], None, [fit])
    assert harrell is not None and harrell["tau_days"] is None


def test_too_few_events_before_tau_leave_the_cell_without_a_number() -> None:
    data, resamples = tau_task(late_events=True)
    scoring = task_scoring("tau", TTE, data, resamples, 365)
    assert scoring.too_few is None  # 14 test events in all
    risk = -data.targets.days[:100]
    fit = Fit(Draw(None, 0, np.arange(100, 200)), risk=risk,
              survival=np.full((100, len(data.days)), 0.5))
    methods = [m for m in methods_for(TTE) if m.name in ("motor_cox", "counts_cox")]
    why = ("too few events before tau = 91 days (4 < 10; tau: the last day with at least 10% "
           "and 10 of the test labels at risk)")
    for metric in metrics_for(TTE, 365):
        cells = {m.name: score_method(scoring, m, metric, None, [fit]) for m in methods}
        difference = score_difference(scoring, metric, None, cells, methods,
                                      {m.name: [fit] for m in methods})
        rows = [*cells.values(), difference]
        if metric.name == "harrell_c":
            assert all(np.isfinite(row["mean"]) for row in rows if row is not None)
            continue
        for row in rows:
            assert row is not None and np.isnan(row["mean"]) and row["note"] == why
            assert (row["tau_days"], row["events_before_tau"]) == (91.0, 4)
