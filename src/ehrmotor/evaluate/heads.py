"""Downstream heads for `ehrmotor.evaluate`: one model per task, fitted on a feature matrix.

Each `fit_*` returns a `Head`: `risk(x)` (n,) is higher for an event sooner or a positive label
(binary heads: its probability); `survival(x, days)` is S(days | x) (n, len(days)), None if binary.

- `fit_cox`: Cox model, elastic net that is mostly ridge (`CoxnetSurvivalAnalysis`, l1_ratio
  COX_L1_RATIO), alpha on the path by inner CV on Harrell's C; survival by a Breslow baseline.
  A path that diverges (scikit-survival's "weights are too large") is refitted with a stronger
  penalty: its smallest alpha ×COX_FALLBACK_FACTOR (as a share of the largest, up to
  COX_MAX_ALPHA_MIN_RATIO); the head records this in `fallback`, and only when every penalty
  fails is it a `HeadError`.
- `fit_piecewise_exponential`, `fit_lightgbm_survival`: piecewise-exponential heads, in
  `ehrmotor.evaluate.piecewise`.
- `fit_logistic`: L2 logistic regression, C by inner CV on AUROC.
- `fit_lightgbm_binary`: LightGBM, small fixed settings (BOOSTING).

Linear heads mean-impute NaN features and standardise; LightGBM takes NaN as missing. Times are
days, floored at MIN_TIME_DAYS (an event on the prediction day still needs time at risk). A fit the
data cannot support (under 2 events, or 2 of a class) raises `HeadError`. `groups`
(the rows' subject ids) keeps a subject's rows in one inner fold. Fits are single-threaded and
deterministic given `seed`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from lightgbm import LGBMClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sksurv.linear_model import CoxnetSurvivalAnalysis
from sksurv.util import Surv
from threadpoolctl import threadpool_limits

from ehrmotor.evaluate.metrics import auroc, comparable_pairs, concordance

COX_L1_RATIO = 0.1
COX_N_ALPHAS = 8
COX_ALPHA_MIN_RATIO = 0.01  # the path's smallest alpha, as a share of its largest
COX_FALLBACK_FACTOR = 10.0  # a diverging path is refitted with its smallest alpha this much larger
COX_MAX_ALPHA_MIN_RATIO = 0.5  # ... up to this share (1 would leave only all-zero coefficients)
LOGISTIC_C = (0.001, 0.01, 0.1, 1.0)
INNER_FOLDS = 3
MIN_TIME_DAYS = 0.5
MAX_LOG_HAZARD = 50.0  # exp() overflow guard
BOOSTING: dict[str, Any] = {
    "n_estimators": 150, "learning_rate": 0.05, "num_leaves": 15, "min_child_samples": 5,
    "colsample_bytree": 0.8, "reg_lambda": 1.0, "deterministic": True, "force_row_wise": True,
    "n_jobs": 1, "verbose": -1}


class HeadError(ValueError):
    """The training data cannot support this head (too few events, one class)."""


class Head(Protocol):
    def risk(self, x: np.ndarray) -> np.ndarray: ...

    def survival(self, x: np.ndarray, days: np.ndarray) -> np.ndarray | None: ...


@contextmanager
def single_threaded() -> Iterator[None]:
    """One BLAS thread (many threads on 2 busy cores run 10-30x slower) and no solver chatter."""
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", "all coefficients are zero", UserWarning)
        yield


def _pipeline(model: object) -> Pipeline:
    return Pipeline([("impute", SimpleImputer(keep_empty_features=True)),
                     ("scale", StandardScaler()), ("model", model)])


def survival_targets(x: np.ndarray, time: np.ndarray,
                      event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    time = np.maximum(np.asarray(time, dtype=np.float64), MIN_TIME_DAYS)
    event = np.asarray(event, dtype=bool)
    if not len(x) == len(time) == len(event) or np.isnan(time).any():
        raise ValueError(f"x {len(x)}, time {len(time)}, event {len(event)} rows, or nan times")
    if event.sum() < 2:
        raise HeadError(f"fewer than 2 events ({int(event.sum())})")
    return time, event


def _binary_targets(x: np.ndarray, label: np.ndarray) -> np.ndarray:
    label = np.asarray(label, dtype=bool)
    if len(x) != len(label):
        raise ValueError(f"x has {len(x)} rows, label {len(label)}")
    if min(positives := int(label.sum()), len(label) - positives) < 2:
        raise HeadError(f"fewer than 2 of a class ({positives} of {len(label)} positive)")
    return label


def inner_folds(strata: np.ndarray, seed: int,
                 groups: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified inner folds, by subject when `groups` is given; none when too small.

    With groups, the folds are bounded by the subjects on each side of `strata` (a subject with
    many label rows counts once), and folds whose training or validation part lacks either side
    are left out: when a draw's events belong to two subjects, a fold would otherwise train
    without any event."""
    if groups is None:
        splits = min(INNER_FOLDS, int(strata.sum()), int((~strata).sum()))
    else:
        splits = min(INNER_FOLDS, len(np.unique(groups[strata])), len(np.unique(groups[~strata])))
    if splits < 2:
        return []
    kind = StratifiedKFold if groups is None else StratifiedGroupKFold
    folds = kind(splits, shuffle=True, random_state=seed).split(np.zeros(len(strata)), strata,
                                                                groups)
    return [(train, val) for train, val in folds
            if all(0 < strata[part].sum() < len(part) for part in (train, val))]


def cv_best(options: Sequence[Any], folds: list[tuple[np.ndarray, np.ndarray]],
             score: Callable[[Any, np.ndarray, np.ndarray], float]) -> int:
    """Index of the best mean `score(option, train, val)` over folds (skips nan; ties: first)."""
    means = [np.nanmean(scores) if not np.isnan(scores).all() else -np.inf for scores in
             (np.array([score(option, train, val) for train, val in folds]) for option in options)]
    return int(np.argmax(means))


@dataclass(frozen=True)
class CoxHead:
    """Cox model: risk = linear predictor; S(t|x) = exp(-H0(t) · exp(risk)) (Breslow H0)."""

    model: Pipeline
    alpha: float
    baseline_days: np.ndarray  # (m,) distinct training times
    baseline_cumulative_hazard: np.ndarray  # (m,) H0 at those days
    fallback: str | None = None  # how the penalty was raised after a diverging fit, if it was

    def risk(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict(x, alpha=self.alpha), dtype=np.float64)

    def survival(self, x: np.ndarray, days: np.ndarray) -> np.ndarray:
        at = np.searchsorted(self.baseline_days, np.asarray(days, np.float64), side="right")
        hazard = np.r_[0.0, self.baseline_cumulative_hazard][at]  # (d,) 0 before the first day
        relative = np.exp(np.minimum(self.risk(x), MAX_LOG_HAZARD))
        return np.exp(-relative[:, None] * hazard[None, :])


def _breslow(risk: np.ndarray, time: np.ndarray,
             event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Breslow's cumulative baseline hazard: Σ_{t_k <= t} events_k / Σ_{time_i >= t_k} e^risk_i."""
    days, inverse = np.unique(time, return_inverse=True)
    relative = np.bincount(inverse, weights=np.exp(np.minimum(risk, MAX_LOG_HAZARD)))
    at_risk = np.cumsum(relative[::-1])[::-1]
    events = np.bincount(inverse, weights=event, minlength=len(days))
    return days, np.cumsum(events / at_risk)


def cox_ratios() -> list[float]:
    """The path's smallest-alpha shares tried in turn: COX_ALPHA_MIN_RATIO, ×COX_FALLBACK_FACTOR
    each retry, the last capped at COX_MAX_ALPHA_MIN_RATIO."""
    ratios = [COX_ALPHA_MIN_RATIO]
    while ratios[-1] < COX_MAX_ALPHA_MIN_RATIO:
        ratios.append(min(ratios[-1] * COX_FALLBACK_FACTOR, COX_MAX_ALPHA_MIN_RATIO))
    return ratios


def _cox_path(x: np.ndarray, target: np.ndarray) -> tuple[Pipeline, str | None]:
    """The fitted Cox path with the first penalty that does not diverge, and how the penalty was
    raised (None at the default); HeadError naming the last error when every one diverges."""
    errors: list[str] = []
    for ratio in cox_ratios():
        path = _pipeline(CoxnetSurvivalAnalysis(
            l1_ratio=COX_L1_RATIO, n_alphas=COX_N_ALPHAS, alpha_min_ratio=ratio))
        try:
            path.fit(x, target)
        except ArithmeticError as error:  # coxnet's "weights too large"
            errors.append(str(error))
            continue
        return path, None if not errors else (
            f"Cox fit diverged at alpha_min_ratio {COX_ALPHA_MIN_RATIO:g} ({errors[0]}); "
            f"refitted at {ratio:g}")
    raise HeadError(f"Cox fit failed at every alpha_min_ratio up to {COX_MAX_ALPHA_MIN_RATIO:g}: "
                    f"{errors[-1]}")


def fit_cox(x: np.ndarray, time: np.ndarray, event: np.ndarray, *, seed: int,
            groups: np.ndarray | None = None) -> CoxHead:
    """Fit the Cox head on features x (n, f), times (days) and event flags (n,)."""
    time, event = survival_targets(x, time, event)
    with single_threaded():
        path, fallback = _cox_path(x, Surv.from_arrays(event, time))
        # The path starts at the smallest alpha with all coefficients zero: a constant score.
        alphas = [float(a) for a in path[-1].alphas_[1:]] or [float(path[-1].alphas_[0])]
        numerator, denominator = np.zeros(len(alphas)), 0.0
        for train, val in inner_folds(event, seed, groups):
            fold = _pipeline(CoxnetSurvivalAnalysis(l1_ratio=COX_L1_RATIO, alphas=alphas))
            try:
                fold.fit(x[train], Surv.from_arrays(event[train], time[train]))
            except ArithmeticError:  # tiny folds
                continue
            # Folds are pooled by their number of comparable pairs.
            if pairs := comparable_pairs(time[val], event[val]):
                risks = np.stack([fold.predict(x[val], alpha=a) for a in alphas])
                numerator += concordance(time[val], event[val], risks) * pairs
                denominator += pairs
    best = int(np.argmax(numerator)) if denominator else len(alphas) // 2
    days, hazard = _breslow(path.predict(x, alpha=alphas[best]), time, event)
    if fallback is not None:
        fallback += f", alpha {alphas[best]:.3g} chosen"
    return CoxHead(path, alphas[best], days, hazard, fallback)


@dataclass(frozen=True)
class ClassifierHead:
    """A binary head: risk is the predicted probability of a positive label."""

    model: Any  # a fitted classifier with predict_proba

    def risk(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_proba(x)[:, 1], dtype=np.float64)

    def survival(self, x: np.ndarray, days: np.ndarray) -> None:
        return None


def fit_logistic(x: np.ndarray, label: np.ndarray, *, seed: int,
                 groups: np.ndarray | None = None) -> ClassifierHead:
    """Fit the L2 logistic head on features x (n, f) and boolean labels (n,)."""
    label = _binary_targets(x, label)

    def held_out_auroc(c: float, train: np.ndarray, val: np.ndarray) -> float:
        model = _pipeline(LogisticRegression(C=c, max_iter=1000)).fit(x[train], label[train])
        return auroc(label[val], model.decision_function(x[val]))

    with single_threaded():
        folds = inner_folds(label, seed, groups)  # ties: the smaller C
        best = cv_best(LOGISTIC_C, folds, held_out_auroc) if folds else len(LOGISTIC_C) // 2
        model = _pipeline(LogisticRegression(C=LOGISTIC_C[best], max_iter=1000)).fit(x, label)
    return ClassifierHead(model)


def fit_lightgbm_binary(x: np.ndarray, label: np.ndarray, *, seed: int) -> ClassifierHead:
    """Fit a LightGBM classifier (BOOSTING settings) on features x (n, f), NaN as missing."""
    label = _binary_targets(x, label)
    model = LGBMClassifier(**BOOSTING, random_state=seed)
    with single_threaded():
        return ClassifierHead(model.fit(np.asarray(x, dtype=np.float64), label))
