"""Tiny hand-built inputs for the `prepare` step tests (events, ontology, tokenizer, positions).

Everything here is written out by hand so that the tests can state expected values literally:
MEDS event frames from row tuples, an ontology from a `code -> parents` dict (through a
codes.parquet-like table, no Athena), a tokenizer from a literal list of vocabulary entries, and
positions frames for the window tests; the shared subject of the positions and labels tests.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timedelta

import polars as pl

from ehrmotor.sequences.batching import collate_windows, frame_rows
from ehrmotor.sequences.positions import build_positions
from ehrmotor.vocabulary.ontology import Ontology
from ehrmotor.vocabulary.tokenizer import Tokenizer

US_PER_DAY = 86_400_000_000

MEDS_SCHEMA = {
    "subject_id": pl.Int64,
    "time": pl.Datetime("us"),
    "code": pl.String,
    "numeric_value": pl.Float32,
    "text_value": pl.String,
}

# Time statistics under which the normalised features equal the raw ones.
IDENTITY_TIME_STATS = {"age_mean": 0.0, "age_std": 1.0, "log_age_mean": 0.0, "log_age_std": 1.0,
                       "log_delta_mean": 0.0, "log_delta_std": 1.0}

Row = tuple[int, datetime | None, str, float | None, str | None]


def event(subject_id: int, time: datetime | None, code: str, numeric: float | None = None,
          text: str | None = None) -> Row:
    return (subject_id, time, code, numeric, text)


def events_frame(rows: Sequence[Row]) -> pl.DataFrame:
    """A MEDS events frame (the columns and dtypes `scan_shard` produces)."""
    return pl.DataFrame(list(rows), schema=MEDS_SCHEMA, orient="row")


def ontology(parents: dict[str, list[str]]) -> Ontology:
    """An ontology of exactly the codes in `parents` (code -> its direct parents)."""
    metadata = pl.DataFrame(
        {"code": list(parents), "description": [f"about {c}" for c in parents],
         "parent_codes": list(parents.values())},
        schema={"code": pl.String, "description": pl.String,
                "parent_codes": pl.List(pl.String)},
    )
    return Ontology.build(list(parents), codes_metadata=metadata)


def tokenizer(entries: Sequence[tuple], numeric_edges: dict[str, list[float]] | None = None,
              time_stats: dict[str, float] | None = None) -> Tokenizer:
    """A tokenizer whose vocabulary is `entries` in order (index = position in the list).

    Each entry is ("code", code) or ("numeric", code, bin) or ("text", code, text).
    """
    rows = []
    for entry in entries:
        kind, code = entry[0], entry[1]
        rows.append({"kind": kind, "code": code,
                     "bin": entry[2] if kind == "numeric" else None,
                     "text": entry[2] if kind == "text" else None,
                     "probability": 0.5, "score": 0.1, "lower": None, "upper": None})
    frame = pl.DataFrame(rows, schema={
        "kind": pl.String, "code": pl.String, "bin": pl.Int32, "text": pl.String,
        "probability": pl.Float64, "score": pl.Float64, "lower": pl.Float64,
        "upper": pl.Float64}).with_row_index("index")
    return Tokenizer(frame, dict(numeric_edges or {}), dict(time_stats or IDENTITY_TIME_STATS),
                     num_train_subjects=10)


def positions_frame(subject_positions: dict[int, int], start: datetime = datetime(2000, 1, 1)
                    ) -> pl.DataFrame:
    """Positions as `build_positions` returns them: subject -> number of positions (0 included).

    Position p of every subject is at `start` + p days, with the one entry p (weight 1), so a
    window's contents can be read back from its `entries` and `age_days`.
    """
    base = (start - datetime(1970, 1, 1)) // timedelta(microseconds=1)
    rows = []
    for subject_id, count in subject_positions.items():
        for p in range(count):
            rows.append({"subject_id": subject_id, "position": p, "time": base + p * US_PER_DAY,
                         "age_days": float(p), "entries": [p], "weights": [1.0],
                         "age": float(p), "log_age": 0.0, "log_delta": 0.0})
    return pl.DataFrame(rows, schema={
        "subject_id": pl.Int64, "position": pl.Int32, "time": pl.Int64, "age_days": pl.Float32,
        "entries": pl.List(pl.UInt32), "weights": pl.List(pl.Float32), "age": pl.Float32,
        "log_age": pl.Float32, "log_delta": pl.Float32})


def ancestors_of(ontology: Ontology, code: str) -> list[str]:
    """Ancestors of `code` in `ontology` (self excluded), nearest first, ties by name."""
    rows = ontology.ancestors.filter((pl.col("code") == code) & (pl.col("depth") > 0))
    return rows.sort("depth", "ancestor")["ancestor"].to_list()


def parents_of(ontology: Ontology, code: str) -> list[str]:
    """Direct parents of `code` in `ontology`, sorted; [] for a root or an unknown code."""
    return ontology.parents.filter(pl.col("code") == code)["parent"].sort().to_list()


# The positions and labels tests' subject.
POSITION_TREE = {"G/F": [], "R": [], "R/a": ["R"], "R/b": ["R"], "L": [], "N": [],
                 "MEDS_BIRTH": [], "X": []}
# Vocabulary: MEDS_BIRTH, N and X have no code entry; L values in [3, 5) have entry 5, values
# from 7 entry 7; L values below 3 or in [5, 7) have no bin entry.
POSITION_VOCAB = [("code", "G/F"), ("code", "R"), ("code", "R/a"), ("code", "R/b"),
                  ("code", "L"), ("numeric", "L", 1), ("text", "N", "yes"), ("numeric", "L", 3)]
POSITION_EDGES = {"L": [3.0, 5.0, 7.0]}
BIRTH_1 = datetime(2000, 1, 1, 8)
SUBJECT_1 = [
    event(1, None, "G/F"),
    event(1, BIRTH_1, "MEDS_BIRTH"),
    event(1, datetime(2000, 1, 1, 20), "R/a"),  # birth day: part of position 0
    event(1, datetime(2000, 1, 11, 0), "R/a"),  # position 1: R, R/a
    event(1, datetime(2000, 1, 11, 6), "R/a"),  # R, R/a already seen that day: skipped
    event(1, datetime(2000, 1, 11, 6), "R/b"),  # position 2: R/b is new that day
    event(1, datetime(2000, 1, 12, 0), "R/a"),  # position 3: a new day
    event(1, datetime(2000, 1, 21, 12), "L", 4.0),  # position 4: code L and its bin entry
    event(1, datetime(2000, 1, 21, 12), "L", 6.0),  # bin 2 has no entry, L seen: skipped
    event(1, datetime(2000, 1, 21, 12), "L", 100.0),  # position 5: bin 3's entry is new today
    event(1, datetime(2000, 1, 22, 0), "N", text="yes"),  # position 6: text entry (N: no code)
    event(1, datetime(2000, 1, 22, 0), "N", text="no"),  # no entry at all: no position
    event(1, datetime(2000, 1, 23, 0), "X"),  # no entry: no position (but the last event)
]


def build(rows: list) -> pl.DataFrame:
    return build_positions(events_frame(rows), tokenizer(POSITION_VOCAB, POSITION_EDGES),
                           ontology(POSITION_TREE))


def points_frame(rows: list[tuple[int, int, int]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"subject_id": pl.Int64, "position": pl.Int32,
                                      "time": pl.Int64}, orient="row")


def occurrences_frame(rows: list[tuple[int, int, int]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"subject_id": pl.Int64, "task": pl.Int32,
                                      "time": pl.Int64}, orient="row")


def window_labels(rows: pl.DataFrame, index: int) -> list[tuple[int, int, float]]:
    """Row `index`'s (point, task, days) labels as the training collate derives them, sorted."""
    batch = collate_windows(frame_rows(rows[index:index + 1]), labels=True)
    return sorted(zip(batch["label_point"].tolist(), batch["label_task"].tolist(),
                      batch["label_days"].tolist(), strict=True))


def one_line_error(err: str) -> str:
    """The error line of stderr, which must be the only line apart from log records."""
    lines = [line for line in err.strip().splitlines()
             if not re.match(r"(DEBUG|INFO|WARNING) ehrmotor", line)]
    assert len(lines) == 1, err
    assert lines[0].startswith("ehrmotor prepare: error: "), err
    return lines[0]
