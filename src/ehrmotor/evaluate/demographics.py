"""Demographic features for `ehrmotor.evaluate`: the baseline any representation must beat.

Per prediction point: `age_years`, the age at the prediction time in years (365.25 days) from
the subject's MEDS_BIRTH event, else its first timed event (`tasks.birth_days`), and, when the
data has one, a one-hot sex: `sex/<code>` is 1 when the subject has that static (null-time)
code. The sex family is detected (`sex_codes`): static codes whose prefix before the first "/"
is "sex" or "gender" (any case: `Gender/F`, `GENDER//F`, `SEX//M`), kept when the family has
two or more distinct codes in the data; otherwise the features are age alone.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl

from ehrmotor.evaluate.tasks import birth_days, days_between, subject_events

log = logging.getLogger(__name__)

AGE_FEATURE = "age_years"
SEX_PREFIXES = ("sex", "gender")  # static code families read as sex, lower case
DAYS_PER_YEAR = 365.25


def _family() -> pl.Expr:
    return pl.col("code").str.split("/").list.first().str.to_lowercase()


def _static_sex(events: pl.LazyFrame) -> pl.LazyFrame:
    """subject_id, code: each subject's static codes of a sex family."""
    return (events.filter(pl.col("time").is_null() & _family().is_in(list(SEX_PREFIXES)))
            .select("subject_id", "code").unique())


def sex_codes(static: pl.DataFrame) -> list[str]:
    """The codes of the sex family (sorted) in `static` (subject_id, code), or [] when no family
    has two or more codes (the family with the most subjects wins a tie of several)."""
    if static.is_empty():
        return []
    families = (static.with_columns(family=_family()).group_by("family")
                .agg(codes=pl.col("code").unique().sort(), subjects=pl.col("subject_id").n_unique())
                .filter(pl.col("codes").list.len() >= 2)
                .sort(["subjects", "family"], descending=[True, False]))
    return [] if families.is_empty() else families["codes"][0].to_list()


def demographic_features(meds_dir: Path, points: pl.DataFrame) -> tuple[np.ndarray, list[str]]:
    """(matrix (n, 1 + sexes), names): age in years at each point of `points` (subject_id,
    prediction_time; NaN without a birth) and the one-hot sex codes (see the module docstring)."""
    keyed = points.select("subject_id", "prediction_time").with_row_index("row")
    births, statics = [], []
    for events in subject_events(meds_dir, points["subject_id"].unique()):
        births.append(birth_days(events).select("subject_id", "birth_day").collect())
        statics.append(_static_sex(events).collect())
    birth = pl.concat(births).unique("subject_id", keep="first")
    static = pl.concat(statics).unique()
    age = keyed.join(birth, on="subject_id", how="left").sort("row").select(
        days_between("birth_day", "prediction_time") / DAYS_PER_YEAR)
    codes = sex_codes(static)
    columns = [age.to_series().fill_null(np.nan).to_numpy().astype(np.float64)]
    for code in codes:
        having = static.filter(pl.col("code") == code)["subject_id"].implode()
        columns.append(keyed["subject_id"].is_in(having).to_numpy().astype(np.float64))
    log.info("evaluate: demographic baseline: age%s", f" and sex ({', '.join(codes)})"
             if codes else " (no static sex or gender code family with two values)")
    return np.stack(columns, axis=1), [AGE_FEATURE, *(f"sex/{code}" for code in codes)]
