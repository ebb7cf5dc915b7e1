"""Choosing a head's penalty: inner subject-grouped cross-validation and the one-standard-error
rule, on features standardised by the training draw alone.

- `inner_folds`: stratified inner folds of a draw's training rows; with `groups` (each row's
  subject id) a subject's rows are all on one side, so that its labels never inform both the fit
  and the score of a fold.
- `fold_scores`: a (folds, options) matrix of held-out scores (higher is better), nan where a
  fold could not score an option.
- `one_se_choice`: the index of the strongest penalty whose mean score is within one standard
  error of the best mean (options ordered strongest first; the standard error is that of the best
  option's mean over folds). Small draws have noisy inner scores: the rule then keeps a fit close
  to the strongest penalty (a few features, or one) instead of the one that won by chance.
- `standardiser`: mean imputation of NaN and scaling to unit variance, fitted on the rows given
  (the training draw), applied unchanged to held-out rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from sklearn.impute import SimpleImputer
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

INNER_FOLDS = 3

Fold = tuple[np.ndarray, np.ndarray]  # (training rows, validation rows)


def inner_folds(strata: np.ndarray, seed: int, groups: np.ndarray | None) -> list[Fold]:
    """Stratified inner folds, by subject when `groups` is given; none when too small.

    With groups, the folds are bounded by the subjects on each side of `strata` (a subject with
    many label rows counts once), and folds whose training or validation part lacks either side
    are left out: when a draw's events belong to two subjects, a fold would otherwise train
    without any event."""
    strata = np.asarray(strata, dtype=bool)
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


def one_se_choice(scores: np.ndarray, default: int) -> int:
    """The one-standard-error rule on `scores` (folds, options), options strongest first: the
    first option whose mean over folds (nan skipped) is at least the best mean minus the
    standard error of the best option's mean. `default` when no option has a score."""
    scores = np.asarray(scores, dtype=np.float64)
    counts = np.sum(~np.isnan(scores), axis=0)
    if scores.size == 0 or not counts.any():
        return default
    means = np.where(counts > 0, np.nansum(scores, axis=0) / np.maximum(counts, 1), -np.inf)
    best = int(np.argmax(means))
    column = scores[~np.isnan(scores[:, best]), best]
    error = float(np.std(column, ddof=1) / np.sqrt(len(column))) if len(column) > 1 else 0.0
    return int(np.flatnonzero(means >= means[best] - error)[0])


def standardiser(x: np.ndarray) -> Pipeline:
    """Mean imputation and unit-variance scaling fitted on `x` (n, f) (constant or never observed
    features become 0)."""
    steps = [("impute", SimpleImputer(keep_empty_features=True)), ("scale", StandardScaler())]
    return Pipeline(steps).fit(np.asarray(x, dtype=np.float64))
