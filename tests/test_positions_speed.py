"""The array-based `encode_events`, `build_positions` and `window_sequences` equal their plain
polars formulations (kept here as the oracle) exactly, on random shards full of edge cases:
static events, events before MEDS_BIRTH, subjects without a birth code or with static events
only, same-day repeats, values with and without entries, codes unknown to the ontology or
without a code entry, events in any order.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal
from prepare_builders import Row, events_frame, ontology, tokenizer

from ehrmotor.sequences.positions import build_positions, encode_events, with_birth
from ehrmotor.sequences.time_features import raw_time_features
from ehrmotor.sequences.windows import (
    embedding_windows,
    first_rows,
    training_windows,
    window_sequences,
)
from ehrmotor.vocabulary.ontology import Ontology
from ehrmotor.vocabulary.tokenizer import Tokenizer, assign_bins

TREE = {"MEDS_BIRTH": [], "R": [], "R/a": ["R"], "R/b": ["R"], "R/a/x": ["R/a"], "S": [],
        "S/c": ["S"], "L": [], "L/k": ["L"], "N": [], "Q": []}
VOCAB = [("code", "R"), ("code", "R/a"), ("code", "R/a/x"), ("code", "S/c"), ("code", "L"),
         ("numeric", "L/k", 1), ("numeric", "L/k", 3), ("code", "L/k"), ("text", "N", "yes"),
         ("text", "Q", "hi"), ("code", "Q"), ("code", "Z"), ("numeric", "L", 0)]
EDGES = {"L/k": [3.0, 5.0, 7.0], "L": [10.0]}
STATS = {"age_mean": 9000.0, "age_std": 5000.0, "log_age_mean": 8.0, "log_age_std": 1.5,
         "log_delta_mean": 1.0, "log_delta_std": 2.0}
# Z is in the vocabulary but not the ontology; U is in neither.
CODES = [*TREE, "Z", "U"]


def reference_encode(events: pl.DataFrame, tokenizer: Tokenizer, ontology: Ontology
                     ) -> pl.DataFrame:
    entries = tokenizer.entries
    indexed = events.select("code", "numeric_value", "text_value").with_row_index("event")
    binned = indexed.with_columns(
        bin=assign_bins(indexed["code"], indexed["numeric_value"], tokenizer.numeric_edges))
    numeric = binned.join(
        entries.filter(pl.col("kind") == "numeric").select("code", "bin", entry="index"),
        on=["code", "bin"], how="inner").select("event", "entry")
    text = binned.join(
        entries.filter(pl.col("kind") == "text").select("code", text_value="text", entry="index"),
        on=["code", "text_value"], how="inner").select("event", "entry")
    values = pl.concat([numeric, text]).with_columns(weight=pl.lit(1.0, pl.Float32))
    codes = (
        ontology.expand(binned.select("event", "code"))
        .join(entries.filter(pl.col("kind") == "code").select(ancestor="code", entry="index"),
              on="ancestor", how="inner")
        .select("event", "entry").unique()
        .with_columns(weight=(1.0 / pl.len().over("event")).cast(pl.Float32))
    )
    return pl.concat([values, codes]).sort("event", "entry")


def reference_positions(events: pl.DataFrame, tokenizer: Tokenizer, ontology: Ontology
                        ) -> pl.DataFrame:
    events = with_birth(events.sort("subject_id", "time", "code", nulls_last=False,
                                    maintain_order=True))
    rows = events.with_row_index("event").select(
        "event", "subject_id", "birth", "birth_day", time=pl.col("time").fill_null(pl.col("birth")))
    tagged = reference_encode(events, tokenizer, ontology).join(rows, on="event", how="inner",
                                                                maintain_order="left")
    bags = (tagged.filter(pl.col("birth_day"))
            .group_by("subject_id", "entry").agg(weight=pl.col("weight").max())
            .sort("subject_id", "entry")
            .group_by("subject_id", maintain_order=True)
            .agg(entries=pl.col("entry"), weights=pl.col("weight")))
    first = (rows.group_by("subject_id").agg(time=pl.col("birth").first())
             .join(bags, on="subject_id", how="left")
             .with_columns(entries=pl.col("entries").fill_null(pl.lit([], pl.List(pl.UInt32))),
                           weights=pl.col("weights").fill_null(pl.lit([], pl.List(pl.Float32))),
                           order=pl.lit(-1, pl.Int64))
             .select("subject_id", "order", "time", "entries", "weights"))
    later = tagged.filter(~pl.col("birth_day")).with_columns(day=pl.col("time").dt.date())
    new_today = later.with_columns(
        seen=pl.col("event").min().over("subject_id", "day", "entry") < pl.col("event")
    ).group_by("event").agg(keep=(~pl.col("seen")).any())
    later = later.join(new_today.filter("keep").select("event"), on="event", how="inner",
                       maintain_order="left")
    later_bags = later.group_by("subject_id", "event", maintain_order=True).agg(
        time=pl.col("time").first(), entries=pl.col("entry"), weights=pl.col("weight"),
    ).rename({"event": "order"}).with_columns(pl.col("order").cast(pl.Int64))
    positions = (
        pl.concat([first, later_bags.select(first.columns)])
        .sort("subject_id", "order")
        .with_columns(position=pl.int_range(pl.len()).over("subject_id").cast(pl.Int32))
        .join(rows.group_by("subject_id").agg(pl.col("birth").first()), on="subject_id")
    )
    stats = tokenizer.time_stats
    return raw_time_features(positions).with_columns(
        age=((pl.col("age_days") - stats["age_mean"]) / stats["age_std"]).cast(pl.Float32),
        log_age=((pl.col("raw_log_age") - stats["log_age_mean"]) / stats["log_age_std"])
        .cast(pl.Float32),
        log_delta=((pl.col("raw_log_delta") - stats["log_delta_mean"]) / stats["log_delta_std"])
        .cast(pl.Float32),
        time=pl.col("time").dt.epoch("us"),
    ).drop("raw_log_age", "raw_log_delta", "order", "birth")


def reference_sequences(positions: pl.DataFrame, windows: pl.DataFrame) -> pl.DataFrame:
    if "first_row" not in windows.columns:
        windows = windows.join(first_rows(positions), on="subject_id", how="left",
                               maintain_order="left")
    rows = windows.select("subject_id", "window", row=pl.concat_list(
        pl.col("first_row"), pl.int_ranges(pl.col("first_row") + pl.col("start"),
                                           pl.col("first_row") + pl.col("end") + 1)),
    ).explode("row")
    columns = ["entries", "weights", "time", "age_days", "age", "log_age", "log_delta"]
    gathered = pl.concat([rows.drop("row"), positions.select(columns)[rows["row"]]],
                         how="horizontal")
    return gathered.group_by("subject_id", "window", maintain_order=True).agg(
        bag_sizes=pl.col("entries").list.len().cast(pl.Int32),
        entries=pl.col("entries").list.explode(keep_nulls=False, empty_as_null=False),
        weights=pl.col("weights").list.explode(keep_nulls=False, empty_as_null=False),
        times=pl.col("time"), age_days=pl.col("age_days"), age=pl.col("age"),
        log_age=pl.col("log_age"), log_delta=pl.col("log_delta"),
    )


def random_events(seed: int, subjects: int = 40) -> pl.DataFrame:
    """A shard of random subjects, rows shuffled, with every edge case the module names."""
    rng = np.random.default_rng(seed)
    rows: list[Row] = []
    for subject in rng.permutation(subjects) * 7 - 50:
        birth = datetime(1950, 1, 1) + timedelta(days=int(rng.integers(0, 25_000)),
                                                 minutes=int(rng.integers(0, 1440)))
        if rng.random() < 0.7:
            rows.append((int(subject), birth, "MEDS_BIRTH", None, None))
        timed = rng.random() > 0.05  # else a subject with static events only
        for _ in range(int(rng.integers(0, 60))):
            code = CODES[int(rng.integers(len(CODES)))]
            static = not timed or rng.random() < 0.1
            # Few distinct days (some before birth, some on it), so that days repeat.
            when = None if static else birth + timedelta(
                days=int(rng.integers(-2, 8)) * int(rng.integers(0, 3)),
                hours=int(rng.integers(0, 3)) * 5)
            numeric = [None, float(rng.normal(5, 3)), float("nan"), 12.0][int(rng.integers(4))]
            text = [None, None, "yes", "hi", "no"][int(rng.integers(5))]
            rows.append((int(subject), when, code, numeric, text))
            if rng.random() < 0.1:
                rows.append(rows[-1])  # an exact duplicate
    order = rng.permutation(len(rows))
    return events_frame([rows[i] for i in order])


@pytest.fixture(scope="module")
def fitted() -> tuple[Tokenizer, Ontology]:
    return tokenizer(VOCAB, EDGES, STATS), ontology(TREE)


@pytest.mark.parametrize("seed", range(8))
def test_encoding_and_positions_equal_the_polars_formulation(
        seed: int, fitted: tuple[Tokenizer, Ontology]) -> None:
    events = random_events(seed)
    assert_frame_equal(encode_events(events, *fitted), reference_encode(events, *fitted),
                       check_exact=True)
    assert_frame_equal(build_positions(events, *fitted), reference_positions(events, *fitted),
                       check_exact=True)


def test_positions_of_no_events_equal_the_polars_formulation(
        fitted: tuple[Tokenizer, Ontology]) -> None:
    events = random_events(0).clear()
    assert_frame_equal(build_positions(events, *fitted), reference_positions(events, *fitted),
                       check_exact=True)


@pytest.mark.parametrize("seed", range(4))
def test_window_sequences_equal_the_polars_formulation(
        seed: int, fitted: tuple[Tokenizer, Ontology]) -> None:
    positions = build_positions(random_events(seed), *fitted)
    for context in (2, 3, 5, 200):
        windows = training_windows(positions, context)
        assert_frame_equal(window_sequences(positions, windows),
                           reference_sequences(positions, windows), check_exact=True)
        reads = positions.select("subject_id", "position").with_row_index("label") \
            .sample(fraction=0.5, seed=seed).sort("subject_id", "position")
        windows = embedding_windows(reads, context).join(
            first_rows(positions), on="subject_id", how="left", maintain_order="left")
        for part in (windows, windows.slice(3, 4), windows.clear()):
            assert_frame_equal(window_sequences(positions, part),
                               reference_sequences(positions, part), check_exact=True)


def test_window_sequences_reject_a_subject_without_positions(
        fitted: tuple[Tokenizer, Ontology]) -> None:
    positions = build_positions(random_events(1), *fitted)
    windows = pl.DataFrame({"subject_id": [10**9], "window": [0], "start": [1], "end": [2]},
                           schema={"subject_id": pl.Int64, "window": pl.Int32,
                                   "start": pl.Int64, "end": pl.Int64})
    with pytest.raises(ValueError, match="no positions for subjects"):
        window_sequences(positions, windows)
