"""The positions' time inputs: age in days and three normalised time features.

Per position (µs timestamps; birth = the time of the subject's position 0):

    age_days   float32((time - birth) / US_PER_DAY)          drives the rotary encoding
    age        (age_days - age_mean) / age_std
    log_age    (log(1 + max(age_days, 0)) - log_age_mean) / log_age_std
    log_delta  (log(1 + max(age_days - previous age_days, 0)) - log_delta_mean) / log_delta_std,
               0 before normalising at position 0 (no previous position)

all float32, with the means and standard deviations of `Tokenizer.time_stats` (`time_moments` over
the train split's timed events, `time_stats_from_moments`). `time_features` is the one function
computing them from timestamps: `build_positions` uses it, and the collate of prepared rows (which
store only timestamps, `ehrmotor.sequences.shards`) calls it again, so both give the same bits.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from ehrmotor.meds.read import US_PER_DAY

TIME_FEATURES = ("age", "log_age", "log_delta")
TIME_COLUMNS = ("age_days", *TIME_FEATURES)


def _days(time: str) -> pl.Expr:
    return ((pl.col(time) - pl.col("birth")) / US_PER_DAY).cast(pl.Float32)


def time_features(frame: pl.DataFrame, stats: dict[str, float]) -> pl.DataFrame:
    """age_days, age, log_age, log_delta (Float32) of each row of `frame`: time, birth and
    previous (Int64 µs; previous the time of the subject's previous position, null at
    position 0)."""
    age = _days("time")
    delta = age - _days("previous")
    raw_log_age = age.clip(lower_bound=0).log1p()
    raw_log_delta = delta.fill_null(0.0).clip(lower_bound=0).log1p()
    return frame.select(
        age_days=age,
        age=((age - stats["age_mean"]) / stats["age_std"]).cast(pl.Float32),
        log_age=((raw_log_age - stats["log_age_mean"]) / stats["log_age_std"]).cast(pl.Float32),
        log_delta=((raw_log_delta - stats["log_delta_mean"]) / stats["log_delta_std"])
        .cast(pl.Float32),
    )


def raw_time_features(positions: pl.DataFrame) -> pl.DataFrame:
    """age_days, log(1 + age_days), log(1 + days since the subject's previous row) per row
    (time, birth: datetimes), for the statistics (`time_moments`)."""
    age = (pl.col("time") - pl.col("birth")).dt.total_microseconds() / US_PER_DAY
    delta = pl.col("age_days").diff().over("subject_id")
    return positions.with_columns(age_days=age.cast(pl.Float32)).with_columns(
        raw_log_age=pl.col("age_days").clip(lower_bound=0).log1p(),
        raw_log_delta=delta.fill_null(0.0).clip(lower_bound=0).log1p(),
    )


def time_stats_from_moments(moments: np.ndarray) -> dict[str, float]:
    """Means and standard deviations (floored at 1e-6) from summed `time_moments`."""
    n = max(moments[0], 1.0)
    means = moments[1:4] / n
    stds = np.sqrt(np.maximum(moments[4:7] / n - means**2, 1e-12))
    names = ("age", "log_age", "log_delta")
    stats = {f"{k}_mean": float(m) for k, m in zip(names, means, strict=True)}
    stats |= {f"{k}_std": float(max(s, 1e-6)) for k, s in zip(names, stds, strict=True)}
    return stats
