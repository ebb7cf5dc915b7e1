"""femr 0.2.4's hierarchical tokenizer and batch positions, applied to MEDS events as columns.

`FemrVocabulary` reads femr's dictionary.msgpack: `code` entries (a code string), `numeric`
entries (a property and a [val_start, val_end) range) and `text` entries (a property and a
string), plus `age_stats` (mean and std of age, log age, delta, log delta, in seconds).

`femr_positions(events, vocabulary, ancestors)` builds what femr's BatchCreator builds per subject
(events in their given order; the birth is the first MEDS_BIRTH event):

- an event's bag: every ancestor of its code (self included) that is a code entry, each weighted
  1 / (their number); a numeric_value (or text_value that parses as a number) adds the numeric
  entry of its property's range (weight 1), else a text_value adds its text entry (weight 1).
  Weights are rounded to float16, as femr's batches hold them;
- position 0 sums the bags of all static events and every event on or before the birth date;
- later events are positions of their own, in order, except events with an empty bag and events
  whose entries all appeared earlier the same calendar day;
- time data (5 float16): birth [1, 0, 0, 0, 0]; first later position [-1, age, log age, 0, 0];
  the rest [0, age, log age, delta, log delta], each standardised by age_stats (seconds; log is
  log(1 + seconds); delta since the previous position); ages in days (float32) drive rotary.

Returns (positions, bags): positions has subject_id, position, time, age_days, t0..t4 sorted by
(subject_id, position); bags has subject_id, position, entry, weight sorted the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import polars as pl

from ehrmotor.errors import InputError
from ehrmotor.meds.read import BIRTH_CODE

VALUE_PROPERTIES = ("numeric_value", "text_value")
SECONDS_PER_DAY = 86_400.0
TIME_COLUMNS = tuple(f"t{i}" for i in range(5))


@dataclass(frozen=True)
class FemrVocabulary:
    codes: pl.DataFrame  # ancestor (str), entry (i64)
    texts: pl.DataFrame  # property, text_value (str), text_entry (i64)
    numeric: dict[str, tuple[np.ndarray, np.ndarray]]  # property -> (bounds, entries)
    age_stats: dict[str, dict[str, float]]
    size: int

    @classmethod
    def load(cls, path: Path) -> FemrVocabulary:
        dictionary: dict[str, Any] = msgpack.unpackb(Path(path).read_bytes(),
                                                     strict_map_key=False)
        vocab = dictionary["vocab"]
        codes = [(e["code_string"], i) for i, e in enumerate(vocab) if e["type"] == "code"]
        texts = [(e["property"], e["text_string"], i) for i, e in enumerate(vocab)
                 if e["type"] == "text"]
        ranges: dict[str, list[tuple[float, int]]] = {}
        for i, entry in enumerate(vocab):
            if entry["type"] == "numeric":
                ranges.setdefault(entry["property"], []).append((entry["val_start"], i))
        numeric = {}
        for prop, pairs in ranges.items():  # femr: bisect_right over the starts after the first
            pairs.sort()
            numeric[prop] = (np.array([p[0] for p in pairs[1:]], dtype=np.float64),
                             np.array([p[1] for p in pairs], dtype=np.int64))
        return cls(
            codes=pl.DataFrame(codes, schema={"ancestor": pl.String, "entry": pl.Int64},
                               orient="row"),
            texts=pl.DataFrame(texts, schema={"property": pl.String, "text_value": pl.String,
                                              "text_entry": pl.Int64}, orient="row"),
            numeric=numeric, age_stats=dictionary["age_stats"], size=len(vocab))


def _value_entries(events: pl.DataFrame, vocabulary: FemrVocabulary) -> pl.DataFrame:
    """event, entry, weight 1 for numeric and text values (femr: number first, then text)."""
    parts = []
    for prop in VALUE_PROPERTIES:
        value = events.select("event", number=pl.col(prop).cast(pl.Float64, strict=False),
                              text=pl.col(prop).cast(pl.String))
        if prop in vocabulary.numeric:
            bounds, entries = vocabulary.numeric[prop]
            numbers = value.filter(pl.col("number").is_not_null())
            slot = np.searchsorted(bounds, numbers["number"].to_numpy(), side="right")
            parts.append(numbers.select("event", entry=pl.Series(entries[slot])))
            value = value.filter(pl.col("number").is_null())
        texts = vocabulary.texts.filter(pl.col("property") == prop)
        parts.append(value.join(texts.rename({"text_value": "text"}), on="text", how="inner")
                     .select("event", entry="text_entry"))
    return pl.concat(parts).with_columns(weight=pl.lit(1.0))


def _bags(events: pl.DataFrame, vocabulary: FemrVocabulary, ancestors: pl.DataFrame
          ) -> pl.DataFrame:
    """event, entry, weight (float16-rounded) of every event, sorted by (event, kind, entry)."""
    codes = (events.select("event", "code").join(ancestors, on="code", how="left")
             .with_columns(ancestor=pl.coalesce("ancestor", "code"))
             .join(vocabulary.codes, on="ancestor", how="inner")
             .unique(["event", "entry"])
             .with_columns(weight=1.0 / pl.len().over("event"))
             .select("event", "entry", "weight", kind=pl.lit(0)))
    values = _value_entries(events, vocabulary).with_columns(kind=pl.lit(1))
    bags = pl.concat([codes, values]).sort("event", "kind", "entry")
    rounded = bags["weight"].to_numpy().astype(np.float16).astype(np.float32)
    return bags.with_columns(weight=pl.Series(rounded)).drop("kind")


def _with_births(events: pl.DataFrame) -> pl.DataFrame:
    births = (events.filter(pl.col("code") == BIRTH_CODE).group_by("subject_id")
              .agg(birth=pl.col("time").sort_by("event").first()))
    missing = events.join(births, on="subject_id", how="anti")["subject_id"].unique().sort()
    if missing.len():
        raise InputError(f"events: subjects {missing.head(3).to_list()} have no {BIRTH_CODE} "
                         "event; femr models place everything relative to birth")
    return events.join(births, on="subject_id", how="left")


def _kept_events(later: pl.DataFrame, bags: pl.DataFrame) -> pl.DataFrame:
    """Later events that add an entry not seen earlier the same day (femr's codes_seen_today)."""
    day = later.select("event", "subject_id", day=pl.col("time").dt.date())
    entries = bags.join(day, on="event", how="inner")
    first = entries.with_columns(
        first=pl.col("event").min().over("subject_id", "day", "entry"))
    kept = first.filter(pl.col("event") == pl.col("first"))["event"].unique()
    return later.filter(pl.col("event").is_in(kept.implode())).sort("event")


def _time_data(kept: pl.DataFrame, stats: dict[str, dict[str, float]]) -> pl.DataFrame:
    def norm(seconds: pl.Expr, name: str) -> tuple[pl.Expr, pl.Expr]:
        plain = (seconds - stats[name]["mean"]) / stats[name]["std"]
        logged = ((seconds + 1).log() - stats["log_" + name]["mean"]) / stats["log_" + name]["std"]
        return plain, logged

    age = (pl.col("time") - pl.col("birth")).dt.total_microseconds() / 1e6
    delta = pl.col("time").diff().over("subject_id").dt.total_microseconds() / 1e6
    first = pl.col("position") == 1
    age_n, log_age_n = norm(age, "age")
    delta_n, log_delta_n = norm(delta, "delta")
    return kept.with_columns(
        t0=pl.when(first).then(-1.0).otherwise(0.0), t1=age_n, t2=log_age_n,
        t3=pl.when(first).then(0.0).otherwise(delta_n),
        t4=pl.when(first).then(0.0).otherwise(log_delta_n),
        age_days=(age / SECONDS_PER_DAY).cast(pl.Float32))


def femr_positions(events: pl.DataFrame, vocabulary: FemrVocabulary, ancestors: pl.DataFrame
                   ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(positions, bags) of the events' subjects; see the module docstring."""
    events = _with_births(events.with_row_index("event"))
    bags = _bags(events, vocabulary, ancestors)
    at_birth = pl.col("time").is_null() | (pl.col("time").dt.date() <= pl.col("birth").dt.date())
    later = events.filter(~at_birth)
    kept = _kept_events(later, bags).with_columns(
        position=pl.int_range(1, pl.len() + 1).over("subject_id"))
    kept = _time_data(kept, vocabulary.age_stats)
    birth_rows = events.group_by("subject_id").agg(time=pl.col("birth").first()).with_columns(
        position=pl.lit(0, pl.Int64), age_days=pl.lit(0.0, pl.Float32), t0=pl.lit(1.0),
        t1=pl.lit(0.0), t2=pl.lit(0.0), t3=pl.lit(0.0), t4=pl.lit(0.0))
    columns = ["subject_id", "position", "time", "age_days", *TIME_COLUMNS]
    positions = pl.concat([birth_rows.select(columns),
                           kept.with_columns(pl.col("position").cast(pl.Int64)).select(columns)])
    where = pl.concat([
        events.filter(at_birth).select("event", "subject_id", position=pl.lit(0, pl.Int64)),
        kept.select("event", "subject_id", pl.col("position").cast(pl.Int64))])
    bag_rows = bags.join(where, on="event", how="inner").sort("subject_id", "position", "event",
                                                              maintain_order=True)
    return (positions.sort("subject_id", "position"),
            bag_rows.select("subject_id", "position", "entry", "weight"))


def locate_labels(labels: pl.DataFrame, rows: pl.DataFrame, column: str, *, missing: str,
                  before: str, known: pl.Series | None = None) -> pl.DataFrame:
    """labels (label, subject_id, prediction_time) plus `column` of the last row of `rows`
    (subject_id, time, column) at or before each label's time, in label order; InputError when a
    subject has no row ("subjects [...] `missing`") or a label comes before its first ("... come
    before `before`"). `known`: the subjects in the data, if not all are in `rows`."""
    known = (rows["subject_id"] if known is None else known).unique().implode()
    unknown = labels.filter(~pl.col("subject_id").is_in(known))
    if unknown.height:
        shown = unknown["subject_id"].unique().sort().head(3).to_list()
        raise InputError(f"labels: subjects {shown} {missing}")
    located = labels.sort("prediction_time").join_asof(
        rows.sort("time"), left_on="prediction_time", right_on="time", by="subject_id",
        strategy="backward", check_sortedness=False).sort("label")
    early = located.filter(pl.col(column).is_null())
    if early.height:
        row = early.row(0, named=True)
        raise InputError(f"labels: {early.height} labels come before {before}, e.g. subject "
                         f"{row['subject_id']} at {row['prediction_time']}; a femr model has no "
                         f"features there")
    return located
