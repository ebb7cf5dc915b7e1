"""Downstream heads for `ehrmotor.evaluate`: one model per task, fitted on a feature matrix.

Each `fit_*` returns a `Head`: `risk(x)` (n,) is higher for an event sooner or a positive label
(binary heads: its probability); `survival(x, days)` is S(days | x) (n, len(days)), None if binary.

- `fit_cox`: Cox model, elastic net that is mostly ridge (`CoxnetSurvivalAnalysis`, l1_ratio
  COX_L1_RATIO) on a path of COX_N_ALPHAS alphas from the strongest that leaves one feature in,
  alpha by the one-standard-error rule on Harrell's C of inner grouped folds
  (`ehrmotor.evaluate.penalties`); survival by a Breslow baseline.
  A path that diverges (scikit-survival's "weights are too large") is refitted with a stronger
  penalty: its smallest alpha ×COX_FALLBACK_FACTOR (as a share of the largest, up to
  COX_MAX_ALPHA_MIN_RATIO); the head records this in `fallback`, and only when every penalty
  fails is it a `HeadError`.
- `fit_logistic`: elastic-net logistic regression (l1_ratio LOGISTIC_L1_RATIO), C on a path
  from the strongest that leaves one feature in, by the one-standard-error rule on held-out
  log-likelihood of the recalibrated log-odds (`_logistic_scores`).
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
from ehrmotor.evaluate.penalties import fold_scores, inner_folds, one_se_choice, standardiser

COX_L1_RATIO = 0.1
COX_N_ALPHAS = 30  # from the first alpha with a non-zero coefficient (one feature)
COX_ALPHA_MIN_RATIO = 0.01  # the path's smallest alpha, as a share of its largest
COX_FALLBACK_FACTOR = 10.0  # a diverging path is refitted with its smallest alpha this much larger
COX_MAX_ALPHA_MIN_RATIO = 0.5  # ... up to this share (1 would leave only all-zero coefficients)
LOGISTIC_L1_RATIO = 0.5
LOGISTIC_N_C = 20
LOGISTIC_PATH_START = 1.05  # the strongest C, as a multiple of the one with all coefficients 0
LOGISTIC_C_SPAN = 1000.0  # the weakest C, as a multiple of the strongest
LOGISTIC_TOL = 1e-3
LOGISTIC_MAX_ITER = 500
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


def _cox_path(x: np.ndarray, target: np.ndarray) -> tuple[Pipeline, str | None]:
    """The fitted Cox path with the first penalty that does not diverge, and how the penalty was
    raised (None at the default); HeadError naming the last error when every one diverges."""
    errors: list[str] = []
    for ratio in cox_ratios():
        path = _cox_pipeline(n_alphas=COX_N_ALPHAS, alpha_min_ratio=ratio)
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
    """Fit the Cox head on features x (n, f), times (days) and event flags (n,): alpha on the
    path by the one-standard-error rule on Harrell's C of inner grouped folds."""
    time, event = survival_targets(x, time, event)
    with single_threaded():
        path, fallback = _cox_path(x, Surv.from_arrays(event, time))
        # The path starts at the smallest alpha with all coefficients zero: a constant score.
        alphas = [float(a) for a in path[-1].alphas_[1:]] or [float(path[-1].alphas_[0])]

        def held_out_c(train: np.ndarray, val: np.ndarray) -> np.ndarray | None:
            fold = _cox_pipeline(alphas=alphas)
            try:
                fold.fit(x[train], Surv.from_arrays(event[train], time[train]))
            except ArithmeticError:  # tiny folds
                return None
            risks = np.stack([fold.predict(x[val], alpha=a) for a in alphas])
            # A constant (every coefficient 0: the fold's path starts later) ranks nothing.
            return np.where(np.ptp(risks, axis=1) > 0, concordance(time[val], event[val], risks),
                            np.nan)

        scores = fold_scores(inner_folds(event, seed, groups), len(alphas), held_out_c)
        best = one_se_choice(scores, default=len(alphas) // 2)
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
        model = _cox_pipeline(alphas=path).fit(x, Surv.from_arrays(event, time))
    days, hazard = _breslow(model.predict(x, alpha=head.alpha), time, event)
    return CoxHead(model, head.alpha, days, hazard)


@dataclass(frozen=True)
class ClassifierHead:
    """A binary head: risk is the predicted probability of a positive label."""

    model: Any  # a fitted classifier with predict_proba

    def risk(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_proba(x)[:, 1], dtype=np.float64)

    def survival(self, x: np.ndarray, days: np.ndarray) -> None:
        return None


def logistic_path(z: np.ndarray, label: np.ndarray) -> np.ndarray:
    """The Cs of the logistic path on standardised z (n, f), strongest penalty first: from just
    above the C at which every coefficient is zero (LOGISTIC_L1_RATIO / max |z^T (label -
    mean)|), LOGISTIC_N_C of them over a factor LOGISTIC_C_SPAN."""
    gradient = float(np.abs(z.T @ (label - label.mean())).max()) if z.size else 0.0
    smallest = LOGISTIC_L1_RATIO / gradient if gradient > 0 else 1.0
    return smallest * np.geomspace(LOGISTIC_PATH_START, LOGISTIC_PATH_START * LOGISTIC_C_SPAN,
                                   LOGISTIC_N_C)


def _logistic(c: float, seed: int) -> LogisticRegression:
    return LogisticRegression(C=c, l1_ratio=LOGISTIC_L1_RATIO, solver="saga", tol=LOGISTIC_TOL,
                              max_iter=LOGISTIC_MAX_ITER, random_state=seed, warm_start=True)


def _logistic_scores(z: np.ndarray, label: np.ndarray, cs: np.ndarray, seed: int,
                     train: np.ndarray, val: np.ndarray) -> np.ndarray:
    """Held-out log-likelihood per row of each C, fitted along the path (warm starts) on the
    training rows, its log-odds recalibrated there (intercept and scale, unpenalised: a strong
    penalty shrinks them, which says nothing of how well it ranks); less noisy than AUROC on the
    few labels of an inner fold.

    C multiplies the summed loss: it is scaled by len(z) / len(train) so that each fold fits
    the penalty per row of the whole draw. A fit with every coefficient 0 scores nan."""
    model, scores = _logistic(float(cs[0]), seed), []
    for c in cs * (len(z) / len(train)):
        model.set_params(C=float(c)).fit(z[train], label[train])
        if not model.coef_.any():
            scores.append(np.nan)
            continue
        train_odds, val_odds = z[train] @ model.coef_[0], z[val] @ model.coef_[0]
        platt = LogisticRegression(C=UNPENALISED_C).fit(train_odds[:, None], label[train])
        probability = np.clip(platt.predict_proba(val_odds[:, None])[:, 1], 1e-12, 1 - 1e-12)
        scores.append(float(np.mean(np.where(label[val], np.log(probability),
                                             np.log(1 - probability)))))
    return np.array(scores)


def fit_logistic(x: np.ndarray, label: np.ndarray, *, seed: int,
                 groups: np.ndarray | None = None) -> ClassifierHead:
    """Fit the elastic-net logistic head on features x (n, f) and boolean labels (n,): C on the
    path (`logistic_path`) by the one-standard-error rule on inner grouped folds."""
    label = binary_targets(x, label)
    with single_threaded():
        scaling = standardiser(x)
        z = scaling.transform(np.asarray(x, dtype=np.float64))
        cs = logistic_path(z, label)
        scores = fold_scores(inner_folds(label, seed, groups), len(cs),
                             lambda train, val: _logistic_scores(z, label, cs, seed, train, val))
        best = one_se_choice(scores, default=len(cs) // 2)
        model = _logistic(float(cs[0]), seed)
        for index, c in enumerate(cs):  # warm starts along the path, as in the folds
            model.set_params(C=float(c)).fit(z, label)
            # Past the choice only while every coefficient is 0 (the solver's tolerance near
            # the first C): a constant would rank nothing.
            if index >= best and model.coef_.any():
                break
    return ClassifierHead(Pipeline([("standardise", scaling), ("model", model)]))
