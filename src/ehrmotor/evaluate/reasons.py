"""Why a metric of `ehrmotor.evaluate.metrics` has no number, in the words a results table shows.

Each function takes what its metric took and returns the reason its value is nan: "no events in
the test set", "no comparable pairs in the test set", "no events before the horizon (365 days)
in the test set", "horizon beyond follow-up: ...", "no positives in the test set"; a reason that
starts "undefined:" means the test set was fine and the predictions were not finite.
"""

from __future__ import annotations

import numpy as np

from ehrmotor.evaluate.metrics import censoring_survival, comparable_pairs


def harrell_reason(time: np.ndarray, event: np.ndarray) -> str:
    """Why Harrell's C of these test labels is undefined (when `harrell_c` is nan)."""
    event = np.asarray(event, dtype=bool)
    if not event.any():
        return "no events in the test set"
    if comparable_pairs(time, event) == 0:
        return "no comparable pairs in the test set"
    return "undefined: non-finite risk scores"


def _follow_up_reason(train_time: np.ndarray, train_event: np.ndarray,
                      days: np.ndarray) -> str | None:
    """"horizon beyond follow-up: ..." when G is unknown or 0 at some of `days`, else None."""
    if len(days) == 0:
        return None
    g = censoring_survival(train_time, train_event, days)
    if np.all(g > 0):
        return None
    last = float(np.max(train_time))
    return (f"horizon beyond follow-up: the censoring distribution is unknown after day "
            f"{last:g} of the training labels")


def uno_reason(train_time: np.ndarray, train_event: np.ndarray, time: np.ndarray,
               event: np.ndarray, horizon_days: float) -> str:
    """Why Uno's C at `horizon_days` is undefined (when `uno_c` is nan); as `uno_c` counts."""
    time, event = np.asarray(time, dtype=np.float64), np.asarray(event, dtype=bool)
    if not event.any():
        return "no events in the test set"
    counted = event & (time < horizon_days)
    if not counted.any():
        return f"no events before the horizon ({horizon_days:g} days) in the test set"
    beyond = _follow_up_reason(train_time, train_event, time[counted])
    if beyond is not None:
        return beyond
    return (harrell_reason(time, event) if comparable_pairs(time, event) == 0
            else "no comparable pairs before the horizon in the test set")


def brier_reason(train_time: np.ndarray, train_event: np.ndarray, time: np.ndarray,
                 event: np.ndarray, days: np.ndarray) -> str:
    """Why the integrated Brier score on `days` is undefined (when `integrated_brier` is nan)."""
    time, days = np.asarray(time, dtype=np.float64), np.asarray(days, dtype=np.float64)
    if len(days) < 2:
        return ("horizon beyond follow-up: the test follow-up spans no days before the "
                "horizon (no Brier grid)")
    needed = np.asarray(event, dtype=bool) & (time <= days[-1])
    beyond = _follow_up_reason(train_time, train_event, np.r_[time[needed], days])
    return beyond or "undefined: non-finite survival predictions"


def binary_reason(label: np.ndarray) -> str:
    """Why AUROC or AUPRC is undefined (when they are nan)."""
    label = np.asarray(label, dtype=bool)
    if not label.any():
        return "no positives in the test set"
    if label.all():
        return "no negatives in the test set"
    return "undefined: non-finite scores"
