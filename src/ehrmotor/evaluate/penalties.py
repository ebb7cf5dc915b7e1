"""Choosing a head's penalty: inner subject-grouped cross-validation and the best mean held-out
score, on features standardised by the training draw alone.

- `inner_folds`: stratified inner folds of a draw's training rows; with `groups` (each row's
  subject id) a subject's rows are all on one side, so that its labels never inform both the fit
  and the score of a fold. None when the draw has too few events (or of a class) for a held-out
  score to mean anything: every head then keeps the strongest penalty of its path (with the
  demographics unpenalised: the demographic model), LightGBM no rounds.
- `fold_scores`: a (folds, options) matrix of held-out scores (higher is better), nan where a
  fold could not score an option.
- `best_choice`: the index of the penalty with the best mean held-out score (options ordered
  strongest first; a tie goes to the stronger). The one-standard-error rule (the strongest within
  one standard error of the best) was measured too: it kept every head at the demographic model
  even with the whole pool (~1,900 subjects) on `bench_quality`, where the best mean gained up to
  +0.065 Harrell's C on counts without any head falling below the baseline. What protects small
  draws is the floor of `inner_folds` (no choice at all under 15 event subjects) and a path whose
  strongest end is the demographic model.
- `standardiser`: mean imputation of NaN and scaling to unit variance, fitted on the rows given
  (the training draw), applied unchanged to held-out rows.
- `penalty_factors`: which coefficients the penalty applies to. The demographic features that
  every head adjusts for (the last `unpenalised` columns) are never penalised: at the strongest
  penalty a head is the demographic model itself, never a constant, so that a draw too small to
  support more stays at the demographic baseline instead of falling below it.
- `elastic_net`: a smooth loss plus the elastic-net penalty on the coefficients whose factor is
  positive, minimised by L-BFGS-B (each such coefficient split into its positive and negative
  parts, so that the L1 term is linear), from a warm start.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.optimize import minimize
from sklearn.impute import SimpleImputer
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

INNER_FOLDS = 3
# Subjects (rows without groups) of the rarer side (events, or the rarer class) each inner
# validation fold needs: with fewer, held-out scores are noise and no penalty is chosen.
MIN_VALIDATION_SIDE = 5
MAX_ITER = 500  # L-BFGS-B iterations of one fit on the path (warm-started from the previous)

Fold = tuple[np.ndarray, np.ndarray]  # (training rows, validation rows)
Smooth = Callable[[np.ndarray], tuple[float, np.ndarray]]  # params -> (loss, gradient)


def inner_folds(strata: np.ndarray, seed: int, groups: np.ndarray | None) -> list[Fold]:
    """INNER_FOLDS stratified inner folds, by subject when `groups` is given; none when the rarer
    side of `strata` has fewer than INNER_FOLDS × MIN_VALIDATION_SIDE subjects (a subject with
    many label rows counts once; rows without groups): a fold scored on one or two events says
    nothing, so the caller keeps its strongest penalty. Folds whose training or validation part
    lacks either side are left out."""
    strata = np.asarray(strata, dtype=bool)
    if groups is None:
        rarer = min(int(strata.sum()), int((~strata).sum()))
    else:
        rarer = min(len(np.unique(groups[strata])), len(np.unique(groups[~strata])))
    if rarer < INNER_FOLDS * MIN_VALIDATION_SIDE:
        return []
    kind = StratifiedKFold if groups is None else StratifiedGroupKFold
    folds = kind(INNER_FOLDS, shuffle=True, random_state=seed).split(np.zeros(len(strata)),
                                                                     strata, groups)
    return [(train, val) for train, val in folds
            if all(0 < strata[part].sum() < len(part) for part in (train, val))]


def fold_scores(folds: Sequence[Fold], options: int,
                score: Callable[[np.ndarray, np.ndarray], np.ndarray | None]) -> np.ndarray:
    """(folds, options) held-out scores: row i is `score(train, val)` of fold i, an (options,)
    array (higher is better), or all nan when the fold returns None (a fit that failed)."""
    rows = []
    for train, val in folds:
        scores = score(train, val)
        rows.append(np.full(options, np.nan) if scores is None
                    else np.asarray(scores, dtype=np.float64).reshape(options))
    return np.array(rows).reshape(len(rows), options)


def best_choice(scores: np.ndarray, default: int) -> int:
    """The option with the best mean over folds (nan skipped) of `scores` (folds, options),
    options strongest first, the stronger on a tie; `default` when no option has a score."""
    scores = np.asarray(scores, dtype=np.float64)
    counts = np.sum(~np.isnan(scores), axis=0)
    if scores.size == 0 or not counts.any():
        return default
    means = np.where(counts > 0, np.nansum(scores, axis=0) / np.maximum(counts, 1), -np.inf)
    return int(np.argmax(means))


def standardiser(x: np.ndarray) -> Pipeline:
    """Mean imputation and unit-variance scaling fitted on `x` (n, f) (constant or never observed
    features become 0)."""
    steps = [("impute", SimpleImputer(keep_empty_features=True)), ("scale", StandardScaler())]
    return Pipeline(steps).fit(np.asarray(x, dtype=np.float64))


def penalty_factors(features: int, unpenalised: int) -> np.ndarray:
    """(features,) 1 for a penalised coefficient, 0 for the last `unpenalised` (demographics)."""
    if not 0 <= unpenalised <= features:
        raise ValueError(f"{unpenalised} unpenalised columns of {features} features")
    return np.r_[np.ones(features - unpenalised), np.zeros(unpenalised)]


def elastic_net(smooth: Smooth, start: np.ndarray, factors: np.ndarray, penalty: float,
                l1_ratio: float) -> np.ndarray:
    """argmin over params of smooth(params) + penalty · Σ_j factors_j · (l1_ratio · |p_j| +
    (1 - l1_ratio) / 2 · p_j²), from `start`; `factors` (len(params),) is 0 for parameters left
    free (intercepts, demographics)."""
    factors = np.asarray(factors, dtype=np.float64)
    size, held = len(factors), np.flatnonzero(factors > 0)
    l1, l2 = penalty * l1_ratio * factors[held], penalty * (1 - l1_ratio) * factors[held]

    def unpack(y: np.ndarray) -> np.ndarray:
        params = y[:size].copy()
        params[held] -= y[size:]
        return params

    def objective(y: np.ndarray) -> tuple[float, np.ndarray]:
        params = unpack(y)
        loss, gradient = smooth(params)
        coef = params[held]
        loss += float(l1 @ (y[held] + y[size:]) + 0.5 * l2 @ (coef * coef))
        penalised = gradient[held] + l2 * coef
        full = np.array(gradient, dtype=np.float64)
        full[held] = penalised + l1
        return loss, np.r_[full, -penalised + l1]

    start = np.asarray(start, dtype=np.float64)
    y0 = np.r_[start, np.zeros(len(held))]
    y0[held], y0[size:] = np.maximum(start[held], 0.0), np.maximum(-start[held], 0.0)
    bounds = [(0.0, None) if factor > 0 else (None, None) for factor in factors]
    result = minimize(objective, y0, jac=True, method="L-BFGS-B",
                      bounds=bounds + [(0.0, None)] * len(held), options={"maxiter": MAX_ITER})
    return unpack(np.asarray(result.x))


def unpenalised_start(factors: np.ndarray, free_fit: np.ndarray) -> np.ndarray:
    """The full parameters (coefficients (len(factors),), then the others: intercepts) of the
    fit in which every penalised coefficient is 0, from `free_fit`: the fit of the unpenalised
    columns alone (their coefficients, then the same others)."""
    free = np.flatnonzero(np.asarray(factors) == 0)
    start = np.zeros(len(factors) + len(free_fit) - len(free))
    start[free], start[len(factors):] = free_fit[:len(free)], free_fit[len(free):]
    return start


def path_from(gradient: np.ndarray, l1_ratio: float, start: float, span: float,
              count: int, *, adjusted: bool = False) -> np.ndarray:
    """`count` penalties, strongest first, from `start` × the one at which every penalised
    coefficient is 0 (max |gradient| of the loss in them at the unpenalised fit, over
    `l1_ratio`) down by a factor `span`. `adjusted` (some columns unpenalised): that zero point
    itself comes first, so that the path's strongest end is the unpenalised columns' model."""
    gradient = np.abs(np.asarray(gradient, dtype=np.float64))
    strongest = float(gradient.max()) / l1_ratio if gradient.size and gradient.max() > 0 else 1.0
    path = strongest * np.geomspace(start, start / span, count)
    return np.r_[strongest, path] if adjusted else path
