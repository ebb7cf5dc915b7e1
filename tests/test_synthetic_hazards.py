"""Tests for the synthetic EHR's planted effects and true hazards (`ehrmotor.synthetic.outcomes`,
`ehrmotor.synthetic.hazards`).

Datasets come from `synthetic_fixtures`; everything is asserted from the written files alone.
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

import meds
import numpy as np
import polars as pl
import pytest

from ehrmotor.synthetic import OUTCOMES, true_hazards

# Every test here reads the 3,000- or 8,000-subject session datasets (seconds to generate).
pytestmark = pytest.mark.slow

MONTH_DAYS = 30.4375
# Signature block of latent 0 (which drives diabetes) and a placebo block of latent 1 (which
# does not): codes of ICD-10-CM categories E70-E88 and L80-L99.
SIGNATURE_E70_E88 = r"^ICD10CM/E(7\d|8[0-8])"
PLACEBO_L80_L99 = r"^ICD10CM/L[89]\d"


# --------------------------------------------------------------------------- helpers


def _first_time(events: pl.DataFrame, pattern: str, name: str) -> pl.DataFrame:
    """Each subject's first time of a code matching the regex `pattern`, as column `name`."""
    return (
        events.filter(pl.col("code").str.contains(pattern))
        .group_by("subject_id")
        .agg(pl.col("time").min().alias(name))
    )


def _observation(events: pl.DataFrame) -> pl.DataFrame:
    """Each subject's first and last timed event other than the birth."""
    return (
        events.filter(pl.col("time").is_not_null() & (pl.col("code") != meds.birth_code))
        .group_by("subject_id")
        .agg(start=pl.col("time").min(), end=pl.col("time").max(),
             visits=pl.col("code").str.starts_with("Visit/").sum())
    )


def _months(start: pl.Expr, end: pl.Expr) -> pl.Expr:
    return (end - start).dt.total_seconds() / (86_400 * MONTH_DAYS)


def _poisson_sf(k: int, mu: float) -> float:
    """P(X >= k) for X ~ Poisson(mu)."""
    return 1.0 - sum(math.exp(-mu) * mu**i / math.factorial(i) for i in range(k))


# --------------------------------------------------------------------------- planted effects


def test_heart_failure_incidence_jumps_after_a_first_myocardial_infarction(
    power_events: pl.DataFrame,
) -> None:
    window = pl.duration(days=183)
    subjects = (
        _observation(power_events)
        .join(_first_time(power_events, r"^ICD10CM/I21", "mi"), on="subject_id", how="left")
        .join(_first_time(power_events, r"^ICD10CM/I50", "hf"), on="subject_id", how="left")
    )
    # Six months after a first MI, among subjects without heart failure before it.
    after_mi = subjects.filter(
        pl.col("mi").is_not_null() & (pl.col("hf").is_null() | (pl.col("hf") > pl.col("mi")))
    ).with_columns(stop=pl.min_horizontal(pl.col("mi") + window, "end"))
    after_mi = after_mi.with_columns(
        event=pl.col("hf").is_not_null() & (pl.col("hf") <= pl.col("stop")),
        months=_months(pl.col("mi"), pl.min_horizontal("stop", "hf")),
    )
    # Background: everyone from the start of their record to MI, heart failure or the end.
    background = subjects.with_columns(stop=pl.min_horizontal("end", "hf", "mi")).with_columns(
        event=pl.col("hf").is_not_null() & (pl.col("hf") == pl.col("stop")),
        months=_months(pl.col("start"), pl.col("stop")),
    )
    events = int(after_mi["event"].sum())
    base_rate = background["event"].sum() / background["months"].sum()
    expected = base_rate * after_mi["months"].sum()
    ratio = events / expected
    detail = f"{events} HF after {after_mi.height} MIs, expected {expected:.2f}, ratio {ratio:.1f}"
    assert events >= 3, detail
    assert ratio > 3, detail
    assert _poisson_sf(events, expected) < 1e-3, detail


def test_ckd_is_more_common_after_a_diabetes_diagnosis(power_events: pl.DataFrame) -> None:
    subjects = (
        _observation(power_events)
        .join(_first_time(power_events, r"^ICD10CM/E11", "dm"), on="subject_id", how="left")
        .join(_first_time(power_events, r"^ICD10CM/N18", "ckd"), on="subject_id", how="left")
        .with_columns(
            dm_first=pl.col("dm").is_not_null()
            & (pl.col("ckd").is_null() | (pl.col("dm") < pl.col("ckd")))
        )
    )
    rates = subjects.group_by("dm_first").agg(
        n=pl.len(), ckd=pl.col("ckd").is_not_null().sum(), rate=pl.col("ckd").is_not_null().mean()
    )
    by_group = {row["dm_first"]: row for row in rates.iter_rows(named=True)}
    assert by_group[True]["ckd"] >= 10, rates
    assert by_group[True]["rate"] > 2 * by_group[False]["rate"], rates


@pytest.mark.parametrize(
    ("loinc", "diagnosis", "min_rise"),
    [("2160-0", r"^ICD10CM/N18", 0.25), ("4548-4", r"^ICD10CM/E11", 0.4)],
    ids=["creatinine-before-ckd", "hba1c-before-diabetes"],
)
def test_lab_drifts_up_in_the_months_before_the_diagnosis(
    power_events: pl.DataFrame, loinc: str, diagnosis: str, min_rise: float
) -> None:
    labs = power_events.filter(pl.col("code") == f"LOINC/{loinc}").join(
        _first_time(power_events, diagnosis, "diagnosis"), on="subject_id"
    ).with_columns(days=(pl.col("diagnosis") - pl.col("time")).dt.total_days())
    near = labs.filter(pl.col("days").is_between(1, 183)).group_by("subject_id").agg(
        near=pl.col("numeric_value").mean())
    far = labs.filter(pl.col("days") >= 730).group_by("subject_id").agg(
        far=pl.col("numeric_value").mean())
    paired = near.join(far, on="subject_id")
    rise = paired["near"].mean() - paired["far"].mean()
    detail = f"{paired.height} subjects, rise {rise:.2f}"
    assert paired.height >= 10, detail
    assert rise > min_rise, detail
    assert (paired["near"] > paired["far"]).mean() >= 0.8, detail


def test_signature_block_leaves_flag_diabetes_risk_through_their_parent(
    power_events: pl.DataFrame,
) -> None:
    subjects = _observation(power_events).filter(pl.col("visits") >= 10).join(
        _first_time(power_events, r"^ICD10CM/E11", "dm"), on="subject_id", how="left")

    def diabetes_ratio(block: str) -> float:
        counts = power_events.filter(pl.col("code").str.contains(block)).group_by(
            "subject_id").agg(block=pl.len())
        share = subjects.join(counts, on="subject_id", how="left").with_columns(
            share=pl.col("block").fill_null(0) / pl.col("visits"),
            dm=pl.col("dm").is_not_null(),
        )
        high = share.filter(pl.col("share") >= 0.2)
        none = share.filter(pl.col("share") == 0)
        assert high.height >= 100 and none.height >= 100, (block, high.height, none.height)
        return high["dm"].mean() / none["dm"].mean()

    signature, placebo = diabetes_ratio(SIGNATURE_E70_E88), diabetes_ratio(PLACEBO_L80_L99)
    assert signature > 3, (signature, placebo)
    assert signature > 2 * placebo, (signature, placebo)
    # The signal is spread over many rare leaves: visible through the parent, not one code.
    leaves = power_events.filter(pl.col("code").str.contains(SIGNATURE_E70_E88))["code"]
    assert leaves.n_unique() >= 100
    assert leaves.value_counts()["count"].max() < 0.05 * leaves.len()


# --------------------------------------------------------------------------- true hazards


def test_true_hazards_are_finite_inside_records_and_nan_outside(
    main_dir: Path, main_events: pl.DataFrame
) -> None:
    timed = main_events.filter(pl.col("time").is_not_null() & (pl.col("code") != meds.birth_code))
    inside = timed.sort("subject_id", "time").group_by("subject_id").agg(
        pl.col("time").first().alias("first"),
        pl.col("time").get(pl.len() // 2).alias("middle"),
        pl.col("time").last().alias("last"),
    ).unpivot(index="subject_id", value_name="time").select("subject_id", "time")
    births = main_events.filter(pl.col("code") == meds.birth_code)
    deaths = main_events.filter(pl.col("code") == meds.death_code)
    outside = pl.concat([
        births.select("subject_id", time=pl.col("time") - pl.duration(days=1)),
        births.select("subject_id", time=pl.lit(datetime(2026, 3, 1), dtype=pl.Datetime("us"))),
        deaths.select("subject_id", time=pl.col("time") + pl.duration(days=62)),
    ])
    assert deaths.height > 0
    probes = pl.concat([inside, outside])
    hazards = true_hazards(main_dir, probes["subject_id"].to_numpy(),
                           probes["time"].to_numpy(), "death")
    inner, outer = hazards[: inside.height], hazards[inside.height:]
    bad = inside.filter(pl.Series(~(np.isfinite(inner) & (inner > 0))))
    assert bad.height == 0, f"{bad.height} probes inside records without a hazard:\n{bad}"
    assert np.isnan(outer).all(), outside.filter(pl.Series(~np.isnan(outer)))
    with pytest.raises(ValueError, match="unknown outcome"):
        true_hazards(main_dir, np.array([10_001]), np.array([np.datetime64("2020-01-01")]),
                     "not_an_outcome")
    assert "heart_failure" in OUTCOMES and "death" in OUTCOMES


def test_true_heart_failure_hazard_rises_right_after_a_myocardial_infarction(
    main_dir: Path, main_events: pl.DataFrame
) -> None:
    mi = _first_time(main_events, r"^ICD10CM/I21", "mi")
    probes = pl.concat([
        mi.select("subject_id", time=pl.col("mi") + pl.duration(days=45)),
        mi.select("subject_id", time=pl.col("mi") - pl.duration(days=730)),
    ])
    hazards = true_hazards(main_dir, probes["subject_id"].to_numpy(), probes["time"].to_numpy(),
                           "heart_failure")
    after, before = hazards[: mi.height], hazards[mi.height:]
    both = np.isfinite(after) & np.isfinite(before)
    assert both.sum() >= 20, both.sum()
    assert (after[both] > before[both]).all()
    assert np.median(after[both] / before[both]) > 3

