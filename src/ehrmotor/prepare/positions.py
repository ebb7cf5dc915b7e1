"""From MEDS events to model positions: birth, encoding into vocabulary bags, same-day skipping.

For one shard (all columns, whole-frame polars operations, no loop per event or subject):

- Birth: the time of the subject's `MEDS_BIRTH` event, else of its first timed event.
- Static events (null time) and events on the birth day form position 0 of the subject (an empty
  bag when none of them has a vocabulary entry).
- Every event's entries: the code entries of its code and all its ontology ancestors (the code
  itself included) that are in the vocabulary, each with weight 1 / number of such entries (the
  ancestor bag); and, when the event has a numeric value whose (code, bin) is an entry or a text
  value whose (code, text) is an entry, that value entry with weight 1. A valued event keeps its
  hierarchy, as in femr; a valued event whose value has no entry contributes its ancestor bag
  alone, and an event with neither contributes nothing.
- Every later event is one position with those entries, except events with no entry at all and
  events whose entries were all already seen the same calendar day (by an earlier event of the
  subject, in event order), which are skipped. The comparison is on vocabulary entries, so a lab
  repeated the same day in another value bin with an entry makes a position, while one whose
  new bin has no entry (only its already-seen ancestor bag) does not.
- Position 0 holds the union of its events' entries (max weight per entry).
- Each position carries its timestamp (µs), age (days since birth) and time features: normalised
  age, normalised log(1 + age), normalised log(1 + days since the previous position), with the
  means and standard deviations in `Tokenizer.time_stats`.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from ehrmotor.prepare.ontology import Ontology
from ehrmotor.prepare.tokenizer import Tokenizer, assign_bins

US_PER_DAY = 86_400_000_000
BIRTH_CODE = "MEDS_BIRTH"
TIME_FEATURES = ("age", "log_age", "log_delta")


def with_birth(events: pl.DataFrame) -> pl.DataFrame:
    """Add `birth` (µs) per subject and `birth_day` (bool: static or on the birth date)."""
    birth = events.group_by("subject_id").agg(
        birth=pl.col("time").filter(pl.col("code") == BIRTH_CODE).min()
        .fill_null(pl.col("time").min())
    )
    events = events.join(birth, on="subject_id", how="left")
    return events.with_columns(
        birth_day=pl.col("time").is_null() | (pl.col("time").dt.date() <= pl.col("birth").dt.date())
    )


def count_before_birth(events: pl.DataFrame) -> tuple[int, int]:
    """(subjects, events) with timed events strictly earlier than the subject's MEDS_BIRTH time.

    `build_positions` folds such events into position 0, so prepare reports how many there were.
    """
    timed = events.select("subject_id", "time", "code").filter(pl.col("time").is_not_null())
    early = with_birth(timed).filter(pl.col("time") < pl.col("birth"))
    return early["subject_id"].n_unique(), early.height


def encode_events(events: pl.DataFrame, tokenizer: Tokenizer, ontology: Ontology) -> pl.DataFrame:
    """One row per (event, entry): columns `event` (row index in `events`), `entry`, `weight`.

    Every event contributes its ancestor bag (in-vocabulary code entries of its code and its
    ancestors, weight 1 / bag size) and, when it has one, its numeric-bin or text-value entry
    (weight 1). Events without any entry have no row. Sorted by event, then entry.
    """
    entries = tokenizer.entries
    indexed = events.select("code", "numeric_value", "text_value").with_row_index("event")
    binned = indexed.with_columns(
        bin=assign_bins(indexed["code"], indexed["numeric_value"], tokenizer.numeric_edges)
    )
    numeric = binned.join(
        entries.filter(pl.col("kind") == "numeric").select("code", "bin", entry="index"),
        on=["code", "bin"], how="inner",
    ).select("event", "entry")
    text = binned.join(
        entries.filter(pl.col("kind") == "text").select("code", text_value="text", entry="index"),
        on=["code", "text_value"], how="inner",
    ).select("event", "entry")
    values = pl.concat([numeric, text]).with_columns(weight=pl.lit(1.0, pl.Float32))
    codes = (
        ontology.expand(binned.select("event", "code"))
        .join(entries.filter(pl.col("kind") == "code").select(ancestor="code", entry="index"),
              on="ancestor", how="inner")
        .select("event", "entry")
        .unique()
        .with_columns(weight=(1.0 / pl.len().over("event")).cast(pl.Float32))
    )
    return pl.concat([values, codes]).sort("event", "entry")


def build_positions(events: pl.DataFrame, tokenizer: Tokenizer, ontology: Ontology
                    ) -> pl.DataFrame:
    """Positions of every subject in `events` (one shard, MEDS columns), sorted by subject, time.

    Out columns: subject_id, position (0-based), time (µs; birth for position 0), age_days,
    entries (list[u32]), weights (list[f32]), age, log_age, log_delta (normalised features).
    """
    events = with_birth(events.sort("subject_id", "time", "code", nulls_last=False,
                                    maintain_order=True))
    bags = encode_events(events, tokenizer, ontology)
    rows = events.with_row_index("event").select(
        "event", "subject_id", "birth", "birth_day",
        time=pl.col("time").fill_null(pl.col("birth")),
    )
    tagged = bags.join(rows, on="event", how="inner")
    first = _birth_bags(tagged, rows)
    later = tagged.filter(~pl.col("birth_day")).with_columns(day=pl.col("time").dt.date())
    # An event is kept when one of its entries is new that day for the subject.
    new_today = later.with_columns(
        seen=pl.col("event").min().over("subject_id", "day", "entry") < pl.col("event")
    ).group_by("event").agg(keep=(~pl.col("seen")).any())
    later = later.join(new_today.filter("keep").select("event"), on="event", how="inner")
    later_bags = later.group_by("subject_id", "event", maintain_order=False).agg(
        time=pl.col("time").first(), entries=pl.col("entry"), weights=pl.col("weight"),
    ).rename({"event": "order"}).with_columns(pl.col("order").cast(pl.Int64))
    positions = (
        pl.concat([first, later_bags.select(first.columns)])
        .sort("subject_id", "order")
        .with_columns(position=pl.int_range(pl.len()).over("subject_id").cast(pl.Int32))
        .join(rows.group_by("subject_id").agg(pl.col("birth").first()), on="subject_id")
    )
    return _time_features(positions, tokenizer.time_stats).drop("order", "birth")


def _birth_bags(tagged: pl.DataFrame, rows: pl.DataFrame) -> pl.DataFrame:
    """Position 0 of each subject: the union of its static and birth-day entries.

    Every subject has one, empty when none of those events has a vocabulary entry, so that
    position 0 is always the birth-day position and later events start at position 1.
    """
    bags = (
        tagged.filter(pl.col("birth_day"))
        .group_by("subject_id", "entry").agg(weight=pl.col("weight").max())
        .sort("subject_id", "entry")
        .group_by("subject_id", maintain_order=True)
        .agg(entries=pl.col("entry"), weights=pl.col("weight"))
    )
    return (
        rows.group_by("subject_id").agg(time=pl.col("birth").first())
        .join(bags, on="subject_id", how="left")
        .with_columns(entries=pl.col("entries").fill_null(pl.lit([], pl.List(pl.UInt32))),
                      weights=pl.col("weights").fill_null(pl.lit([], pl.List(pl.Float32))),
                      order=pl.lit(-1, pl.Int64))
        .select("subject_id", "order", "time", "entries", "weights")
    )


def raw_time_features(positions: pl.DataFrame) -> pl.DataFrame:
    """age_days, log(1 + age_days), log(1 + days since previous position) per position."""
    age = (pl.col("time") - pl.col("birth")).dt.total_microseconds() / US_PER_DAY
    return positions.with_columns(age_days=age.cast(pl.Float32)).with_columns(
        raw_log_age=pl.col("age_days").clip(lower_bound=0).log1p(),
        raw_log_delta=pl.col("age_days").diff().over("subject_id").fill_null(0.0)
        .clip(lower_bound=0).log1p(),
    )


def _time_features(positions: pl.DataFrame, stats: dict[str, float]) -> pl.DataFrame:
    positions = raw_time_features(positions)
    return positions.with_columns(
        age=((pl.col("age_days") - stats["age_mean"]) / stats["age_std"]).cast(pl.Float32),
        log_age=((pl.col("raw_log_age") - stats["log_age_mean"]) / stats["log_age_std"])
        .cast(pl.Float32),
        log_delta=((pl.col("raw_log_delta") - stats["log_delta_mean"]) / stats["log_delta_std"])
        .cast(pl.Float32),
        time=pl.col("time").dt.epoch("us"),
    ).drop("raw_log_age", "raw_log_delta")


def time_moments(events: pl.DataFrame) -> np.ndarray:
    """Sums for the time statistics of one shard's timed train events: count, then sum and sum of
    squares of age_days, log(1 + age), log(1 + days since the subject's previous event)."""
    timed = with_birth(events.filter(pl.col("time").is_not_null()).sort("subject_id", "time"))
    feats = raw_time_features(timed.select("subject_id", "time", "birth"))
    cols = [pl.col("age_days").cast(pl.Float64), pl.col("raw_log_age"), pl.col("raw_log_delta")]
    sums = feats.select([c.sum().alias(f"s{i}") for i, c in enumerate(cols)]
                        + [(c * c).sum().alias(f"q{i}") for i, c in enumerate(cols)]).row(0)
    return np.array([feats.height, *sums], dtype=np.float64)


def time_stats_from_moments(moments: np.ndarray) -> dict[str, float]:
    """Means and standard deviations (floored at 1e-6) from summed `time_moments`."""
    n = max(moments[0], 1.0)
    means = moments[1:4] / n
    stds = np.sqrt(np.maximum(moments[4:7] / n - means**2, 1e-12))
    names = ("age", "log_age", "log_delta")
    stats = {f"{k}_mean": float(m) for k, m in zip(names, means, strict=True)}
    stats |= {f"{k}_std": float(max(s, 1e-6)) for k, s in zip(names, stds, strict=True)}
    return stats
