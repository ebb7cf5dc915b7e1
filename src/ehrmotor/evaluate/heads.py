"""Downstream heads for `ehrmotor.evaluate`: one model per task, fitted on a feature matrix.

Each `fit_*` returns a `Head`: `risk(x)` (n,) is higher for an event sooner or a positive label
(binary heads: its probability); `survival(x, days)` is S(days | x) (n, len(days)), None if binary.

- `fit_cox`: Cox model, elastic net that is mostly ridge (`CoxnetSurvivalAnalysis`, l1_ratio
  COX_L1_RATIO) on a path of COX_N_ALPHAS alphas from the strongest that leaves one feature in,
  alpha by the best mean Harrell's C of inner grouped folds
  (`ehrmotor.evaluate.penalties`); survival by a Breslow baseline.
  A path that diverges (scikit-survival's "weights are too large") is refitted with a stronger
  penalty: its smallest alpha ×COX_FALLBACK_FACTOR (as a share of the largest, up to
  COX_MAX_ALPHA_MIN_RATIO); the head records this in `fallback`, and only when every penalty
  fails is it a `HeadError`.
- `fit_logistic`: elastic-net logistic regression (l1_ratio LOGISTIC_L1_RATIO, minimised by
  `penalties.elastic_net`), the penalty on a path from the strongest that leaves one feature in,
  by the best mean held-out log-likelihood of the recalibrated log-odds
  (`_logistic_scores`).

Every fit takes `unpenalised`: its last columns (the demographic baseline's score the protocol
appends to MOTOR and count features) are left out of the penalty, and the path's strongest end is
the model of those columns alone rather than a constant. A draw with too few events for inner
folds (`penalties.inner_folds`) keeps that strongest end.
- Elsewhere: `fit_piecewise_exponential` (the MOTOR head, `ehrmotor.evaluate.piecewise`);
  LightGBM heads boosted from these linear fits (`ehrmotor.evaluate.boosted`).

Linear heads mean-impute NaN features and standardise them on the training rows alone. Times are
days, floored at MIN_TIME_DAYS (an event on the prediction day still needs time at risk). A fit the
data cannot support (under 2 events, or 2 of a class) raises `HeadError`. `groups`
(the rows' subject ids) keeps a subject's rows in one inner fold. Fits are single-threaded and
deterministic given `seed`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sksurv.linear_model import CoxnetSurvivalAnalysis
from sksurv.util import Surv
from threadpoolctl import threadpool_limits

from ehrmotor.evaluate.metrics import concordance
from ehrmotor.evaluate.penalties import (
    best_choice,
    elastic_net,
    fold_scores,
    inner_folds,
    path_from,
    penalty_factors,
    standardiser,
    unpenalised_start,
)

COX_L1_RATIO = 0.1
COX_N_ALPHAS = 30  # from the first alpha with a non-zero coefficient (one feature)
COX_ALPHA_MIN_RATIO = 0.01  # the path's smallest alpha, as a share of its largest
COX_FALLBACK_FACTOR = 10.0  # a diverging path is refitted with its smallest alpha this much larger
COX_MAX_ALPHA_MIN_RATIO = 0.5  # ... up to this share (1 would leave only all-zero coefficients)
LOGISTIC_L1_RATIO = 0.5
LOGISTIC_N_PENALTIES = 20
LOGISTIC_PATH_START = 0.95  # the strongest penalty, as a share of the one with all weights 0
LOGISTIC_PENALTY_SPAN = 1000.0  # the weakest penalty, as a share of the strongest
UNPENALISED_C = 1e6  # recalibrating log-odds (intercept and scale)
MIN_TIME_DAYS = 0.5
MAX_LOG_HAZARD = 50.0  # exp() overflow guard


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


def _cox_pipeline(**path: Any) -> Pipeline:
    """Standardised features into a Coxnet path (`path`: alphas, or n_alphas and
    alpha_min_ratio)."""
    return _pipeline(CoxnetSurvivalAnalysis(l1_ratio=COX_L1_RATIO, **path))


def survival_targets(x: np.ndarray, time: np.ndarray,
                      event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    time = np.maximum(np.asarray(time, dtype=np.float64), MIN_TIME_DAYS)
    event = np.asarray(event, dtype=bool)
    if not len(x) == len(time) == len(event) or np.isnan(time).any():
        raise ValueError(f"x {len(x)}, time {len(time)}, event {len(event)} rows, or nan times")
    if event.sum() < 2:
        raise HeadError(f"fewer than 2 events ({int(event.sum())})")
    return time, event


def binary_targets(x: np.ndarray, label: np.ndarray) -> np.ndarray:
    label = np.asarray(label, dtype=bool)
    if len(x) != len(label):
        raise ValueError(f"x has {len(x)} rows, label {len(label)}")
    if min(positives := int(label.sum()), len(label) - positives) < 2:
        raise HeadError(f"fewer than 2 of a class ({positives} of {len(label)} positive)")
    return label


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


def _cox_path(x: np.ndarray, target: np.ndarray,
              factors: np.ndarray | None) -> tuple[Pipeline, str | None]:
    """The fitted Cox path with the first penalty that does not diverge, and how the penalty was
    raised (None at the default); HeadError naming the last error when every one diverges."""
    errors: list[str] = []
    for ratio in cox_ratios():
        path = _cox_pipeline(n_alphas=COX_N_ALPHAS, alpha_min_ratio=ratio,
                             penalty_factor=factors)
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
            groups: np.ndarray | None = None, unpenalised: int = 0) -> CoxHead:
    """Fit the Cox head on features x (n, f), times (days) and event flags (n,), the last
    `unpenalised` columns (demographics) without penalty: alpha on the path by the
    best mean Harrell's C of inner grouped folds."""
    time, event = survival_targets(x, time, event)
    factors = penalty_factors(np.shape(x)[1], unpenalised) if unpenalised else None
    with single_threaded():
        path, fallback = _cox_path(x, Surv.from_arrays(event, time), factors)
        # The path starts at the smallest alpha with every penalised coefficient zero: a
        # constant score, unless some columns are unpenalised (the demographic model).
        alphas = [float(a) for a in path[-1].alphas_[0 if unpenalised else 1:]] \
            or [float(path[-1].alphas_[0])]

        def held_out_c(train: np.ndarray, val: np.ndarray) -> np.ndarray | None:
            fold = _cox_pipeline(alphas=alphas, penalty_factor=factors)
            try:
                fold.fit(x[train], Surv.from_arrays(event[train], time[train]))
            except ArithmeticError:  # tiny folds
                return None
            risks = np.stack([fold.predict(x[val], alpha=a) for a in alphas])
            # A constant (every coefficient 0: the fold's path starts later) ranks nothing.
            return np.where(np.ptp(risks, axis=1) > 0, concordance(time[val], event[val], risks),
                            np.nan)

        scores = fold_scores(inner_folds(event, seed, groups), len(alphas), held_out_c)
        best = best_choice(scores, default=0)
    days, hazard = _breslow(path.predict(x, alpha=alphas[best]), time, event)
    if fallback is not None:
        fallback += f", alpha {alphas[best]:.3g} chosen"
    return CoxHead(path, alphas[best], days, hazard, fallback)


def refit_cox(head: CoxHead, x: np.ndarray, time: np.ndarray, event: np.ndarray) -> CoxHead:
    """`head`'s Cox model refitted at its chosen alpha on other rows (an inner fold's training
    part), without choosing again; a diverging fit raises ArithmeticError."""
    time, event = survival_targets(x, time, event)
    path = [float(a) for a in head.model[-1].alphas_ if a >= head.alpha]
    with single_threaded():
        model = _cox_pipeline(alphas=path, penalty_factor=head.model[-1].penalty_factor)
        model.fit(x, Surv.from_arrays(event, time))
    days, hazard = _breslow(model.predict(x, alpha=head.alpha), time, event)
    return CoxHead(model, head.alpha, days, hazard)


@dataclass(frozen=True)
class LogisticModel:
    """Elastic-net logistic regression on standardised features: log-odds = z · coef +
    intercept, z = `scaling`(x); fitted at `penalty` (per row) with penalty `factors` (f,)."""

    scaling: Pipeline
    coef: np.ndarray  # (f,)
    intercept: float
    penalty: float
    factors: np.ndarray  # (f,) 0 where unpenalised

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        z = self.scaling.transform(np.asarray(x, dtype=np.float64))
        return np.asarray(z @ self.coef + self.intercept, dtype=np.float64)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        positive = 1 / (1 + np.exp(-self.decision_function(x)))
        return np.column_stack([1 - positive, positive])


@dataclass(frozen=True)
class ClassifierHead:
    """A binary head: risk is the predicted probability of a positive label."""

    model: Any  # a fitted classifier with predict_proba

    def risk(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_proba(x)[:, 1], dtype=np.float64)

    def survival(self, x: np.ndarray, days: np.ndarray) -> None:
        return None


def _logistic_loss(params: np.ndarray, z: np.ndarray,
                   label: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean binary log loss and its gradient in params = (coef (f,), intercept)."""
    eta = z @ params[:-1] + params[-1]
    loss = float(np.mean(np.logaddexp(0.0, eta) - label * eta))
    residual = (1 / (1 + np.exp(-eta)) - label) / len(z)
    return loss, np.r_[z.T @ residual, residual.sum()]


def _fit_logistic_at(z: np.ndarray, label: np.ndarray, penalty: float, factors: np.ndarray,
                     start: np.ndarray | None = None) -> np.ndarray:
    """(coef (f,), intercept) at `penalty`, from `start` or from 0 and the base rate's log-odds."""
    if start is None:
        rate = float(np.clip(label.mean(), 1e-6, 1 - 1e-6))
        start = np.r_[np.zeros(z.shape[1]), np.log(rate / (1 - rate))]
    return elastic_net(lambda params: _logistic_loss(params, z, label), start,
                       np.r_[factors, 0.0], penalty, LOGISTIC_L1_RATIO)


def logistic_path(z: np.ndarray, label: np.ndarray,
                  factors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(LOGISTIC_N_PENALTIES penalties strongest first, the fit with every penalised coefficient
    0) on standardised z (n, f): from just below the penalty at which every penalised coefficient
    is 0 down by LOGISTIC_PENALTY_SPAN (`penalties.path_from`)."""
    free = factors == 0
    null = _fit_logistic_at(z[:, free], label, 0.0, factors[free])
    start = unpenalised_start(factors, null)
    _, gradient = _logistic_loss(start, z, label.astype(np.float64))
    return path_from(gradient[:-1][~free], LOGISTIC_L1_RATIO, LOGISTIC_PATH_START,
                     LOGISTIC_PENALTY_SPAN, LOGISTIC_N_PENALTIES,
                     adjusted=bool(free.any())), start


def _logistic_scores(z: np.ndarray, label: np.ndarray, penalties: np.ndarray,
                     factors: np.ndarray, train: np.ndarray, val: np.ndarray) -> np.ndarray:
    """Held-out log-likelihood per row of each penalty, fitted along the path (warm starts) on
    the training rows, its log-odds recalibrated there (intercept and scale, unpenalised: a
    strong penalty shrinks them, which says nothing of how well it ranks); less noisy than AUROC
    on the few labels of an inner fold. A constant fit (no coefficient) scores nan."""
    params, scores = None, []
    for penalty in penalties:
        params = _fit_logistic_at(z[train], label[train], float(penalty), factors, params)
        if not params[:-1].any():
            scores.append(np.nan)
            continue
        train_odds, val_odds = z[train] @ params[:-1], z[val] @ params[:-1]
        platt = LogisticRegression(C=UNPENALISED_C).fit(train_odds[:, None], label[train])
        probability = np.clip(platt.predict_proba(val_odds[:, None])[:, 1], 1e-12, 1 - 1e-12)
        scores.append(float(np.mean(np.where(label[val], np.log(probability),
                                             np.log(1 - probability)))))
    return np.array(scores)


def fit_logistic(x: np.ndarray, label: np.ndarray, *, seed: int,
                 groups: np.ndarray | None = None, unpenalised: int = 0) -> ClassifierHead:
    """Fit the elastic-net logistic head on features x (n, f) and boolean labels (n,), the last
    `unpenalised` columns (demographics) without penalty: the penalty on its path
    (`logistic_path`) by the best mean score on inner grouped folds."""
    label = binary_targets(x, label)
    with single_threaded():
        scaling = standardiser(x)
        z = scaling.transform(np.asarray(x, dtype=np.float64))
        factors = penalty_factors(z.shape[1], unpenalised)
        y = label.astype(np.float64)
        penalties, params = logistic_path(z, y, factors)
        scores = fold_scores(inner_folds(label, seed, groups), len(penalties),
                             lambda train, val: _logistic_scores(z, y, penalties, factors,
                                                                 train, val))
        best = best_choice(scores, default=0)
        for penalty in penalties[:best + 1]:  # warm starts along the path, as in the folds
            params = _fit_logistic_at(z, y, float(penalty), factors, params)
    return ClassifierHead(LogisticModel(scaling, params[:-1], float(params[-1]),
                                        float(penalties[best]), factors))


def refit_logistic(model: LogisticModel, x: np.ndarray, label: np.ndarray) -> LogisticModel:
    """`model` refitted at its penalty on other rows (an inner fold's training part), its
    standardisation fitted again on them, without choosing again."""
    scaling = standardiser(x)
    z = scaling.transform(np.asarray(x, dtype=np.float64))
    with single_threaded():
        params = _fit_logistic_at(z, np.asarray(label, dtype=np.float64), model.penalty,
                                  model.factors)
    return LogisticModel(scaling, params[:-1], float(params[-1]), model.penalty, model.factors)
