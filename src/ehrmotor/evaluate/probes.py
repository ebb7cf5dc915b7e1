"""Linear probes for `ehrmotor.evaluate`: one per task, fitted on a feature matrix.

Each probe is a Pipeline (mean imputation, StandardScaler, model):

- time to event: Cox model with an elastic-net penalty that is mostly ridge
  (`CoxnetSurvivalAnalysis`, l1_ratio COX_L1_RATIO), its alpha chosen on the path by inner CV;
- binary: L2 `LogisticRegression`, C chosen from LOGISTIC_C by inner CV (AUROC).

A `ProbeTask` holds a task's label rows (into the feature matrices) and targets, and scores risks
with the task's metric (`ehrmotor.evaluate.metrics`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl
from sklearn.exceptions import ConvergenceWarning
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sksurv.linear_model import CoxnetSurvivalAnalysis
from sksurv.util import Surv

from ehrmotor.evaluate.metrics import auroc, comparable_pairs, concordance

COX_L1_RATIO = 0.1
COX_N_ALPHAS = 8
COX_ALPHA_MIN_RATIO = 0.01
LOGISTIC_C = (0.001, 0.01, 0.1, 1.0)
INNER_FOLDS = 3


@dataclass(frozen=True)
class ProbeTask:
    """One task: its label rows (indices into the feature matrices) and targets.

    `time` (days) is set for `c_index` tasks; `event` is the event flag or the binary label.
    """

    outcome: str
    metric: str  # "c_index" or "auroc"
    rows: np.ndarray
    in_pool: np.ndarray
    time: np.ndarray | None
    event: np.ndarray

    def score(self, where: np.ndarray, risk: np.ndarray,
              weights: np.ndarray | None = None) -> np.ndarray:
        """Metric of each row of `risk` (R, len(where)) on the task's entries `where`."""
        if self.time is not None:
            return concordance(self.time[where], self.event[where], risk, weights)
        return auroc(self.event[where], risk, weights)

    def usable(self, where: np.ndarray) -> bool:
        """Enough signal to fit: two events (and, for binary tasks, two negatives)."""
        events = int(self.event[where].sum())
        return events >= 2 and (self.time is not None or len(where) - events >= 2)


def probe_tasks(tasks: pl.DataFrame, points: pl.DataFrame, in_pool: np.ndarray) -> list[ProbeTask]:
    """The time-to-event and binary ProbeTasks of each outcome of the task table."""
    indexed = tasks.join(points.with_row_index("row"), on=["subject_id", "prediction_time"])
    result = []
    for outcome in tasks["outcome"].unique(maintain_order=True).to_list():
        frame = indexed.filter(pl.col("outcome") == outcome)
        if frame["event"].is_not_null().all() and frame.height:
            rows = frame["row"].to_numpy().astype(np.int64)
            result.append(ProbeTask(outcome, "c_index", rows, in_pool[rows],
                                    frame["time_to_event_days"].to_numpy(),
                                    frame["event"].to_numpy()))
        binary = frame.filter(pl.col("boolean_value").is_not_null())
        rows = binary["row"].to_numpy().astype(np.int64)
        result.append(ProbeTask(outcome, "auroc", rows, in_pool[rows], None,
                                binary["boolean_value"].to_numpy()))
    return result


def _pipeline(model: object) -> Pipeline:
    return Pipeline([("impute", SimpleImputer(keep_empty_features=True)),
                     ("scale", StandardScaler()), ("model", model)])


def _inner_folds(event: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified inner folds (at most INNER_FOLDS; none when a class has under two members)."""
    splits = min(INNER_FOLDS, int(event.sum()), int((~event).sum()))
    if splits < 2:
        return []
    folds = StratifiedKFold(splits, shuffle=True, random_state=seed)
    return list(folds.split(np.zeros(len(event)), event))


def fit_cox(x: np.ndarray, time: np.ndarray, event: np.ndarray,
            seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """Fit the Cox probe (alpha by inner CV on C); return its risk-score function."""
    path = _pipeline(CoxnetSurvivalAnalysis(
        l1_ratio=COX_L1_RATIO, n_alphas=COX_N_ALPHAS, alpha_min_ratio=COX_ALPHA_MIN_RATIO))
    path.fit(x, Surv.from_arrays(event, time))
    # The path starts at the smallest alpha with all coefficients zero: a constant score.
    alphas = [float(a) for a in path[-1].alphas_]
    alphas = alphas[1:] if len(alphas) > 1 else alphas
    numerator, denominator = np.zeros(len(alphas)), 0.0
    for train, val in _inner_folds(event, seed):
        fold = _pipeline(CoxnetSurvivalAnalysis(l1_ratio=COX_L1_RATIO, alphas=alphas))
        try:
            fold.fit(x[train], Surv.from_arrays(event[train], time[train]))
        except ArithmeticError:  # coxnet's "weights too large" on tiny folds
            continue
        # Folds are pooled by their number of comparable pairs.
        if pairs := comparable_pairs(time[val], event[val]):
            risks = np.stack([fold.predict(x[val], alpha=a) for a in alphas])
            numerator += concordance(time[val], event[val], risks) * pairs
            denominator += pairs
    best = int(np.argmax(numerator)) if denominator else len(alphas) // 2
    return lambda features: np.asarray(path.predict(features, alpha=alphas[best]))


def fit_logistic(x: np.ndarray, label: np.ndarray,
                 seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """Fit the L2 logistic probe (C by inner CV on AUROC); return its decision function."""
    folds = _inner_folds(label, seed)
    chosen = LOGISTIC_C[len(LOGISTIC_C) // 2]
    if folds:
        scores = []
        for c in LOGISTIC_C:
            fold_scores = []
            for train, val in folds:
                model = _pipeline(LogisticRegression(C=c, max_iter=1000))
                model.fit(x[train], label[train])
                fold_scores.append(roc_auc_score(label[val], model.decision_function(x[val])))
            scores.append(float(np.mean(fold_scores)))
        chosen = LOGISTIC_C[int(np.argmax(scores))]  # ties: the smaller C
    model = _pipeline(LogisticRegression(C=chosen, max_iter=1000)).fit(x, label)
    return lambda features: np.asarray(model.decision_function(features))


def fit_probe(task: ProbeTask, x: np.ndarray, where: np.ndarray,
              seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """Fit the task's probe on feature rows `x` of task entries `where`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", "all coefficients are zero", UserWarning)
        if task.time is not None:
            return fit_cox(x, task.time[where], task.event[where], seed)
        return fit_logistic(x, task.event[where], seed)
