"""Cutting a subject's positions into windows: the one rule shared by training and embedding.

A window of a subject is its position 0 (static and birth-day events) followed by the consecutive
positions `start..end` (start >= 1; end < start when position 0 stands alone), at most `context`
positions in all (the training context, `max_window`). Within a window, position p sits at local
index 0 when p = 0, else p - start + 1. Windows are frames with columns subject_id, window (0-based
per subject, in start order), start, end. Training and embedding differ only in which windows are
cut:

- `training_windows`: consecutive windows covering a subject's later positions once each: window w
  holds positions 1 + w·(context - 1) .. (w + 1)·(context - 1) (fewer in the last one); a subject
  with position 0 only has none.
- `embedding_windows`: for each position read (a label's position p), the window ending at p, as
  training sees a position: position 0 and up to context - 1 positions ending at p, i.e.
  max(1, p - context + 2) .. p. Reads with the same start share one window, ending at the latest
  of them (all reads within the first context - 1 positions do), which causal attention makes
  exact; the reads ride along (`points`, `labels`). At a training point in a subject's first
  window, both rules give the same positions.

`window_sequences` turns windows into rows of the prepared layout (see
`ehrmotor.sequences.shards`), one row per window; `ehrmotor.sequences.batching.collate_windows`
turns rows into the model's batch.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from ehrmotor.sequences.positions import concat_ranges, list_series
from ehrmotor.sequences.time_features import TIME_COLUMNS


def check_context(context: int) -> None:
    """Raise ValueError unless a window can hold position 0 and one more."""
    if context < 2:
        raise ValueError(f"a window must hold position 0 and at least one more; got context "
                         f"{context}")


def training_window(max_window: int) -> pl.Expr:
    """The training window (Int32) of a later position (column `position` >= 1)."""
    check_context(max_window)
    return ((pl.col("position") - 1) // (max_window - 1)).cast(pl.Int32)


def with_windows(positions: pl.DataFrame, max_window: int) -> pl.DataFrame:
    """Add the training `window` of each position (position 0 is in every window; marked 0)."""
    return positions.with_columns(
        window=pl.when(pl.col("position") == 0).then(0).otherwise(training_window(max_window))
        .cast(pl.Int32))


def local_index() -> pl.Expr:
    """Index (Int32) of column `position` in its window (column `start`): 0 for position 0."""
    return pl.when(pl.col("position") == 0).then(0) \
        .otherwise(pl.col("position") - pl.col("start") + 1).cast(pl.Int32)


def training_windows(positions: pl.DataFrame, max_window: int) -> pl.DataFrame:
    """subject_id, window, start, end of every training window of the subjects in `positions`."""
    span = max_window - 1
    return (
        with_windows(positions.select("subject_id", "position").filter(pl.col("position") > 0),
                     max_window)
        .group_by("subject_id", "window").agg(end=pl.col("position").max().cast(pl.Int64))
        .with_columns(start=(1 + pl.col("window").cast(pl.Int64) * span))
        .select("subject_id", "window", "start", "end")
        .sort("subject_id", "window")
    )


def embedding_windows(reads: pl.DataFrame, context: int) -> pl.DataFrame:
    """Windows ending at the positions read, with the reads riding along.

    reads: subject_id, position, label (an id of the read). Returns subject_id, window, start,
    end, points (the reads' local indices) and labels (their ids, in input order), sorted by
    subject and start.
    """
    check_context(context)
    reads = reads.with_columns(
        start=pl.max_horizontal(pl.lit(1), pl.col("position") - (context - 2)).cast(pl.Int64))
    return (
        reads.with_columns(local=local_index())
        .group_by("subject_id", "start", maintain_order=True)
        .agg(end=pl.col("position").max().cast(pl.Int64), points="local", labels="label")
        .sort("subject_id", "start")
        .with_columns(window=pl.int_range(pl.len()).over("subject_id").cast(pl.Int32))
        .select("subject_id", "window", "start", "end", "points", "labels")
    )


def positions_per_window(windows: pl.DataFrame) -> pl.Series:
    """Positions per window (Int64), position 0 included."""
    return windows.select(
        length=1 + (pl.col("end") - pl.col("start") + 1).clip(lower_bound=0)).to_series()


def first_rows(positions: pl.DataFrame) -> pl.DataFrame:
    """subject_id, first_row: the row of each subject's position 0 in `positions`."""
    return positions.select("subject_id", "position").with_row_index("row").filter(
        pl.col("position") == 0).select(
        "subject_id", first_row=pl.col("row").cast(pl.Int64))


def window_sequences(positions: pl.DataFrame, windows: pl.DataFrame) -> pl.DataFrame:
    """One row per window (in `windows` order): subject_id, window, then for positions with
    `items` the prepared layout of `ehrmotor.sequences.shards` (first_events, previous_time,
    event_items, items, times), else bag_sizes, entries, weights, times, age_days, age, log_age,
    log_delta (rows built in memory).

    positions: the columns of `build_positions`, sorted by subject and position (as it returns
    them), for (at least) the windows' subjects. windows may carry `first_row` (`first_rows`),
    which saves a join with every subject when a few windows are taken at a time. Each window's
    positions are gathered by row (position 0, then start..end) and its lists cut from the
    gathered columns by offsets, so the work is proportional to the windows' total length,
    whatever the number of windows per subject. Raises ValueError when a window's subject has no
    positions.
    """
    if "first_row" not in windows.columns:
        windows = windows.join(first_rows(positions), on="subject_id", how="left",
                               maintain_order="left")
    if windows["first_row"].null_count():
        missing = windows.filter(pl.col("first_row").is_null())["subject_id"].unique().sort()
        raise ValueError(f"window_sequences: no positions for subjects {missing.head(5).to_list()}"
                         f" ({missing.len()} in all)")
    lengths = positions_per_window(windows).to_numpy()
    offsets = np.concatenate([[0], np.cumsum(lengths)])  # of each window's positions
    first_row = windows["first_row"].to_numpy()
    # Rows first_row + start - 1 .. first_row + end, the first of which becomes position 0: it
    # is the position before the window's first later one.
    rows = concat_ranges(first_row + windows["start"].to_numpy() - 1, lengths)
    previous = positions["time"].gather(rows[offsets[:-1]]).alias("previous_time")
    rows[offsets[:-1]] = first_row
    head = [windows["subject_id"], windows["window"]]
    if "items" in positions.columns:
        gathered = positions.select("event_items", "items", "time")[rows]
        return pl.DataFrame([*head, *_compact_lists(gathered, offsets), previous,
                             list_series("times", offsets, gathered["time"])])
    gathered = positions.select("entries", "weights", "time", *TIME_COLUMNS)[rows]
    return pl.DataFrame([
        *head, *_bag_lists(gathered, offsets), list_series("times", offsets, gathered["time"]),
        *(list_series(name, offsets, gathered[name]) for name in TIME_COLUMNS),
    ])


def _cut(gathered: pl.DataFrame, name: str, offsets: np.ndarray) -> pl.Series:
    """Column `name` (lists, one per gathered position) cut into one list per window: the
    window's positions' lists one after another (`offsets`: of each window's positions)."""
    sizes = gathered[name].list.len().to_numpy()
    window_offsets = np.concatenate([[0], np.cumsum(sizes)])[offsets]
    return list_series(name, window_offsets,
                       gathered[name].explode(keep_nulls=False, empty_as_null=False))


def _bag_lists(gathered: pl.DataFrame, offsets: np.ndarray) -> list[pl.Series]:
    """bag_sizes (entries per position), entries and weights of each window."""
    bag_sizes = gathered["entries"].list.len().cast(pl.Int32)
    return [list_series("bag_sizes", offsets, bag_sizes),
            _cut(gathered, "entries", offsets), _cut(gathered, "weights", offsets)]


def _compact_lists(gathered: pl.DataFrame, offsets: np.ndarray) -> list[pl.Series]:
    """first_events (events of position 0), event_items and items of each window (layout of
    `ehrmotor.sequences.shards`)."""
    first = gathered["event_items"].list.len().gather(offsets[:-1]).cast(pl.Int32)
    return [first.alias("first_events"), _cut(gathered, "event_items", offsets),
            _cut(gathered, "items", offsets)]
