"""Scoring the protocol's fits: one result row per task × k × method × metric.

Metrics (`ehrmotor.evaluate.metrics`): time to event: Harrell's C, Uno's C at the horizon and the
integrated Brier score (lower is better; only for heads that give a survival curve), the last two
read up to tau (`metrics.at_risk_tau`: the latest test time with enough test labels still at
risk, capped at the horizon; a cell with too few test events before tau has no number); binary:
AUROC and AUPRC. A cell's `mean` is the mean over the k's fitted replicates of the metric on the
whole test set; `ci_low`/`ci_high` the subject-bootstrap interval of that mean (the same
resamples of test subjects for every cell of a task). "MOTOR − best baseline" rows compare the
best MOTOR method with the best baseline (count and demographic methods; each chosen by its mean
on the whole test set at that task, k and metric) over the draws both could fit, with a paired
bootstrap interval. A cell whose Cox fits needed a stronger penalty says so in its note ("penalty
raised in 2 of 3 draws: ...", `heads.fit_cox`). When the
test set has too few events or positives (`metrics.too_few`) every cell of the task carries that
note and no number. Every other cell without a number, or without an interval, says why in its
note (`ehrmotor.evaluate.reasons`: no events in the test set, no comparable pairs, horizon
beyond follow-up; "fit failed: <the head's reason>"; "no interval: undefined in 40 of 200
bootstrap resamples ..."); a "MOTOR − best baseline" note names the two heads compared first.

Result table (RESULT_SCHEMA, written as results.csv):

    task, kind, k ("16" … "all"; empty for the oracle), method, metric,
    mean, ci_low, ci_high, replicates_fitted, replicates_skipped,
    test_subjects, test_rows, test_events, test_event_subjects (subjects with an event or a
    positive label in the test set), tau_days, events_before_tau (Uno's C and the integrated
    Brier score: tau and the test events before it; empty for other metrics), note
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from ehrmotor.evaluate.metrics import (
    MIN_AT_RISK,
    MIN_AT_RISK_SHARE,
    MIN_EVENTS_BEFORE_TAU,
    Resamples,
    at_risk_tau,
    auprc,
    auroc,
    events_before,
    harrell_c,
    integrated_brier,
    interval_with_reason,
    paired_difference_with_reason,
    too_few,
    uno_c,
)
from ehrmotor.evaluate.protocol import BASELINE_FAMILIES, Draw, Fit, Method, TaskData, k_label
from ehrmotor.evaluate.reasons import binary_reason, brier_reason, harrell_reason, uno_reason
from ehrmotor.evaluate.tasks import BINARY, TIME_TO_EVENT

DIFFERENCE = "motor_minus_best_baseline"
TAU_METRICS = ("uno_c", "integrated_brier")  # read up to tau, reported with it
ORACLE = "oracle"
RESULT_SCHEMA = pl.Schema({
    "task": pl.String(), "kind": pl.String(), "k": pl.String(), "method": pl.String(),
    "metric": pl.String(), "mean": pl.Float64(), "ci_low": pl.Float64(),
    "ci_high": pl.Float64(), "replicates_fitted": pl.Int64(),
    "replicates_skipped": pl.Int64(), "test_subjects": pl.Int64(), "test_rows": pl.Int64(),
    "test_events": pl.Int64(), "test_event_subjects": pl.Int64(), "tau_days": pl.Float64(),
    "events_before_tau": pl.Int64(), "note": pl.String(),
})


@dataclass(frozen=True)
class TaskScoring:
    """What every cell of one task shares: the test set's targets (and the training pool's,
    for the censoring distribution of Uno's C and the Brier score), the bootstrap resamples
    (positions into the test set) and the too-few note."""

    task: str
    kind: str
    data: TaskData
    test_time: np.ndarray  # (test rows,) days; empty for binary tasks
    test_event: np.ndarray  # (test rows,) event or label
    pool_time: np.ndarray
    pool_event: np.ndarray
    resamples: Resamples
    base: dict[str, Any]  # test_subjects, test_rows, test_events, test_event_subjects
    too_few: str | None
    tau: float = float("nan")  # days (`metrics.at_risk_tau`); nan for binary tasks
    tau_events: int = 0  # test events before tau


Score = Callable[[TaskScoring, Fit, np.ndarray], float]  # (task, fit, test positions) -> metric
Reason = Callable[[TaskScoring], str]  # why the metric is nan on the whole test set


@dataclass(frozen=True)
class Metric:
    name: str
    title: str
    higher_is_better: bool
    score: Score
    reason: Reason
    needs_survival: bool = False
    digits: int = 3  # shown in results.md


def _risk(fit: Fit) -> np.ndarray:
    if fit.risk is None:
        raise ValueError("a skipped fit has no predictions to score")
    return fit.risk


def _harrell(s: TaskScoring, fit: Fit, where: np.ndarray) -> float:
    return harrell_c(s.test_time[where], s.test_event[where], _risk(fit)[where])


def uno_at(horizon_days: float) -> Score:
    def score(s: TaskScoring, fit: Fit, where: np.ndarray) -> float:
        return uno_c(s.pool_time, s.pool_event, s.test_time[where], s.test_event[where],
                     _risk(fit)[where], min(horizon_days, s.tau))
    return score


def _brier(s: TaskScoring, fit: Fit, where: np.ndarray) -> float:
    if fit.survival is None:
        raise ValueError("a head without a survival curve has no Brier score")
    return integrated_brier(s.pool_time, s.pool_event, s.test_time[where], s.test_event[where],
                            fit.survival[where], s.data.days)


def _binary(metric: Callable[[np.ndarray, np.ndarray], float]) -> Score:
    def score(s: TaskScoring, fit: Fit, where: np.ndarray) -> float:
        return metric(s.test_event[where], _risk(fit)[where])
    return score


def metrics_for(kind: str, horizon_days: float) -> tuple[Metric, ...]:
    """The metrics of a task kind, in report order."""
    if kind == BINARY:
        def one_class(s: TaskScoring) -> str:
            return binary_reason(s.test_event)
        return (Metric("auroc", "AUROC", True, _binary(auroc), one_class),
                Metric("auprc", "AUPRC", True, _binary(auprc), one_class))

    def harrell_why(s: TaskScoring) -> str:
        return harrell_reason(s.test_time, s.test_event)

    def uno_why(s: TaskScoring) -> str:
        return uno_reason(s.pool_time, s.pool_event, s.test_time, s.test_event,
                          min(horizon_days, s.tau))

    def brier_why(s: TaskScoring) -> str:
        return brier_reason(s.pool_time, s.pool_event, s.test_time, s.test_event, s.data.days)
    return (Metric("harrell_c", "Harrell's C", True, _harrell, harrell_why),
            Metric("uno_c", f"Uno's C to tau (at most {horizon_days:g} days)", True,
                   uno_at(horizon_days), uno_why),
            Metric("integrated_brier", "integrated Brier score", False, _brier, brier_why,
                   needs_survival=True, digits=4))


def task_scoring(task: str, kind: str, data: TaskData, resamples: Resamples,
                 horizon_days: float = float("inf")) -> TaskScoring:
    """The shared part of a task's cells, with the too-few check of its test set and, for time
    to event, tau (capped at `horizon_days`) and the test events before it."""
    event = data.targets.event
    time = data.targets.time if data.targets.time is not None else np.zeros(len(event))
    pool = np.flatnonzero(np.isin(data.subjects, data.pool_subjects))
    test_event = event[data.test]
    test_subjects = data.subjects[data.test]
    base = {"test_subjects": len(np.unique(test_subjects)), "test_rows": len(data.test),
            "test_events": int(test_event.sum()),
            "test_event_subjects": len(np.unique(test_subjects[test_event]))}
    tau = (at_risk_tau(time[data.test], horizon_days) if kind == TIME_TO_EVENT
           else float("nan"))
    return TaskScoring(task, kind, data, time[data.test], test_event, time[pool], event[pool],
                       resamples, base,
                       too_few(test_event, "time_to_event" if kind == TIME_TO_EVENT else "binary"),
                       tau, events_before(time[data.test], test_event, tau))


def unscorable(scoring: TaskScoring, metric: str) -> str | None:
    """Why no cell of this task and metric has a number (too few test events, or too few
    before tau for the metrics read up to tau), or None."""
    if scoring.too_few is not None or metric not in TAU_METRICS:
        return scoring.too_few
    rule = (f"tau: the last day with at least {MIN_AT_RISK_SHARE:.0%} and {MIN_AT_RISK} of the "
            "test labels at risk")
    if not np.isfinite(scoring.tau):
        return f"no tau (fewer than {MIN_AT_RISK} test labels; {rule})"
    if scoring.tau_events < MIN_EVENTS_BEFORE_TAU:
        return (f"too few events before tau = {scoring.tau:g} days ({scoring.tau_events} < "
                f"{MIN_EVENTS_BEFORE_TAU}; {rule})")
    return None


# --------------------------------------------------------------------------- cells


def _mean_metric(metric: Metric, scoring: TaskScoring,
                 fits: Sequence[Fit]) -> Callable[[np.ndarray], float]:
    """Test positions -> the metric averaged over `fits`."""
    return lambda where: float(np.mean([metric.score(scoring, fit, where) for fit in fits]))


def _row(scoring: TaskScoring, k: str | None, method: str, metric: str, mean: float = np.nan,
         low: float = np.nan, high: float = np.nan, fitted: int = 0, skipped: int = 0,
         note: str | None = None) -> dict[str, Any]:
    return {"task": scoring.task, "kind": scoring.kind, "k": k, "method": method,
            "metric": metric, "mean": mean, "ci_low": low, "ci_high": high,
            "replicates_fitted": fitted, "replicates_skipped": skipped, **scoring.base,
            "tau_days": scoring.tau if metric in TAU_METRICS else None,
            "events_before_tau": scoring.tau_events if metric in TAU_METRICS else None,
            "note": note}


def score_method(scoring: TaskScoring, method: Method, metric: Metric, k: int | None,
                 fits: Sequence[Fit]) -> dict[str, Any] | None:
    """The result row of one cell; None when the method has no survival curve to score."""
    fitted = [fit for fit in fits if fit.skipped is None]
    if metric.needs_survival and fitted and any(fit.survival is None for fit in fitted):
        return None
    done, skipped = len(fitted), len(fits) - len(fitted)
    if (why := unscorable(scoring, metric.name)) is not None:
        return _row(scoring, k_label(k), method.name, metric.name, fitted=done, skipped=skipped,
                    note=why)
    if not fitted:
        failed = next((fit.skipped for fit in fits if fit.skipped), "no draw")
        return _row(scoring, k_label(k), method.name, metric.name, fitted=0, skipped=skipped,
                    note=f"no draw could be fitted ({skipped} skipped); fit failed: {failed}")
    value = _mean_metric(metric, scoring, fitted)
    mean = value(scoring.resamples.full)
    if not np.isfinite(mean):
        return _row(scoring, k_label(k), method.name, metric.name, fitted=done, skipped=skipped,
                    note=metric.reason(scoring))
    low, high, no_interval = interval_with_reason(value, scoring.resamples)
    raised = [fit.fallback for fit in fitted if fit.fallback]
    notes = [f"penalty raised in {len(raised)} of {done} draws: {raised[0]}"] if raised else []
    return _row(scoring, k_label(k), method.name, metric.name, mean, low, high, done, skipped,
                "; ".join([*notes, *([no_interval] if no_interval else [])]) or None)


def score_difference(scoring: TaskScoring, metric: Metric, k: int | None,
                     cells: dict[str, dict[str, Any]], methods: Sequence[Method],
                     fits: dict[str, list[Fit]]) -> dict[str, Any] | None:
    """The "MOTOR − best baseline" row of one task, k and metric: the best MOTOR method minus
    the best method of `BASELINE_FAMILIES` (None when a side is missing)."""
    sign = 1.0 if metric.higher_is_better else -1.0
    means = {name: sign * float(row["mean"]) for name, row in cells.items()}

    sides = {"motor": ("motor",), "baseline": BASELINE_FAMILIES}

    def best(side: str) -> Method | None:
        scored = [m for m in methods
                  if m.family in sides[side] and np.isfinite(means.get(m.name, np.nan))]
        return max(scored, key=lambda m: means[m.name], default=None)
    motor, counts = best("motor"), best("baseline")
    if (unscored := unscorable(scoring, metric.name)) is not None:
        return _row(scoring, k_label(k), DIFFERENCE, metric.name, note=unscored)
    if not all(any(m.family in families for m in methods if m.name in cells)
               for families in sides.values()):
        return None  # a metric one side does not have (no survival curve): no column cell
    if motor is None or counts is None:
        side = "motor" if motor is None else "baseline"
        why = [cells[m.name]["note"] for m in methods
               if m.family in sides[side] and m.name in cells and cells[m.name]["note"]]
        return _row(scoring, k_label(k), DIFFERENCE, metric.name, note=(
            f"no {'MOTOR' if side == 'motor' else 'baseline'} head has a number"
            + (f" ({why[0]})" if why else "")))
    # Paired by draw as well as by test subject: only draws both heads could fit.
    both = [(a, b) for a, b in zip(fits[motor.name], fits[counts.name], strict=True)
            if a.draw.k == k and a.skipped is None and b.skipped is None]
    pair = f"{motor.name} - {counts.name}"
    if not both:
        return _row(scoring, k_label(k), DIFFERENCE, metric.name,
                    note=f"{pair}: no draw that both heads could fit")
    diff, low, high, no_interval = paired_difference_with_reason(
        _mean_metric(metric, scoring, [a for a, _ in both]),
        _mean_metric(metric, scoring, [b for _, b in both]), scoring.resamples)
    draws = sum(1 for f in fits[motor.name] if f.draw.k == k)
    return _row(scoring, k_label(k), DIFFERENCE, metric.name, diff, low, high, len(both),
                draws - len(both), pair + (f"; {no_interval}" if no_interval else ""))


def score_oracle(scoring: TaskScoring, metric: Metric,
                 hazard: np.ndarray) -> dict[str, Any] | None:
    """The oracle's row: the true hazard at each test label as the risk score (its C-indices;
    it gives no survival curve). Test labels without a hazard are left out, and counted."""
    if metric.needs_survival:
        return None
    if (why := unscorable(scoring, metric.name)) is not None:
        return _row(scoring, None, ORACLE, metric.name, note=why)
    known = np.isfinite(hazard)
    fit = Fit(Draw(None, 0, np.zeros(0, dtype=np.int64)), risk=np.nan_to_num(hazard))
    where = np.flatnonzero(known)
    value = _mean_metric(metric, scoring, [fit])
    kept = [r[known[r]] for r in scoring.resamples]
    notes = [] if known.all() else [f"{int((~known).sum())} test labels without a true hazard"]
    mean = value(where)
    if not np.isfinite(mean):
        return _row(scoring, None, ORACLE, metric.name, note="; ".join(
            [metric.reason(scoring), *notes]))
    low, high, no_interval = interval_with_reason(value, kept)
    note = "; ".join([*notes, *([no_interval] if no_interval else [])]) or None
    return _row(scoring, None, ORACLE, metric.name, mean, low, high, 1, 0, note)
