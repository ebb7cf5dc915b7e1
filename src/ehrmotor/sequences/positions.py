"""From MEDS events to model positions: birth, encoding into vocabulary bags, same-day skipping.

For one shard (all columns, whole-frame polars and numpy operations, no loop per event or
subject):

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

from typing import NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa

from ehrmotor.meds.read import BIRTH_CODE
from ehrmotor.sequences.time_features import raw_time_features, time_features
from ehrmotor.vocabulary.bags import BagTable, code_items
from ehrmotor.vocabulary.ontology import Ontology
from ehrmotor.vocabulary.tokenizer import Tokenizer, assign_bins


def with_birth(events: pl.DataFrame) -> pl.DataFrame:
    """Add `birth` (µs) per subject and `birth_day` (bool: static or on the birth date)."""
    birth = events.group_by("subject_id").agg(
        birth=pl.col("time").filter(pl.col("code") == BIRTH_CODE).min()
        .fill_null(pl.col("time").min())
    )
    events = events.join(birth, on="subject_id", how="left", maintain_order="left")
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


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """starts[0] .. starts[0] + lengths[0] - 1, then the same for each later range (int64)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths)
    shift = np.repeat(np.asarray(starts, dtype=np.int64) - (ends - lengths), lengths)
    return np.arange(ends[-1] if len(ends) else 0, dtype=np.int64) + shift


def list_series(name: str, offsets: np.ndarray, values: np.ndarray | pl.Series) -> pl.Series:
    """A list column whose row i holds values[offsets[i]:offsets[i + 1]]."""
    flat = values.rechunk().to_arrow() if isinstance(values, pl.Series) else pa.array(values)
    return pl.Series(name, pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), flat))


class Bags(NamedTuple):
    """Flat (owner, entry, weight) rows, sorted by owner (an event or a subject), then entry."""

    owner: np.ndarray
    entry: np.ndarray  # u32
    weight: np.ndarray  # f32

    def sizes(self, owners: int) -> np.ndarray:
        """Rows of each owner 0 .. owners - 1."""
        return np.bincount(self.owner, minlength=owners)


def encode_events(events: pl.DataFrame, tokenizer: Tokenizer, ontology: Ontology) -> pl.DataFrame:
    """One row per (event, entry): columns `event` (row index in `events`), `entry`, `weight`.

    Every event contributes its ancestor bag (in-vocabulary code entries of its code and its
    ancestors, weight 1 / bag size) and, when it has one, its numeric-bin or text-value entry
    (weight 1). Events without any entry have no row. Sorted by event, then entry.
    """
    code_id, codes = _code_ids(events)
    bags = _encoded(events, code_id, codes, tokenizer, ontology)
    return pl.DataFrame({"event": bags.owner, "entry": bags.entry, "weight": bags.weight},
                        schema={"event": pl.UInt32, "entry": pl.UInt32, "weight": pl.Float32})


def _code_ids(events: pl.DataFrame) -> tuple[pl.Series, pl.DataFrame]:
    """Each event's `code_id` (u32, null for a null code) and the frame's distinct codes
    (code_id, code). Ids follow the codes' sort order, so sorting by id sorts by code."""
    codes = events.select(pl.col("code").drop_nulls().unique().sort()).with_row_index("code_id")
    code_id = events.select("code").join(codes, on="code", how="left", maintain_order="left")
    return code_id["code_id"], codes


def _encoded(events: pl.DataFrame, code_id: pl.Series, codes: pl.DataFrame,
             tokenizer: Tokenizer, ontology: Ontology) -> Bags:
    """`encode_events` as arrays (owner: the event): each distinct code's ancestor bag is built
    once and gathered for its events; the fewer value entries are merged in by key."""
    offsets, bag_entries, bag_weights = _code_bags(codes, tokenizer, ontology)
    ids = code_id.fill_null(codes.height).to_numpy()  # a null code gets the last bag, empty
    sizes = np.diff(offsets)[ids]
    rows = concat_ranges(offsets[ids], sizes)
    event = np.repeat(np.arange(len(ids), dtype=np.uint32), sizes)
    entry, weight = bag_entries[rows], bag_weights[rows]
    values = _value_entries(events, tokenizer)
    value_event, value_entry = values["event"].to_numpy(), values["entry"].to_numpy()
    # An event's value and code entries differ, so each value has one place among the codes.
    at = np.searchsorted(_keys(event, entry), _keys(value_event, value_entry))
    return Bags(np.insert(event, at, value_event), np.insert(entry, at, value_entry),
                np.insert(weight, at, np.ones(len(at), dtype=np.float32)))


def _keys(owner: np.ndarray, entry: np.ndarray) -> np.ndarray:
    """(owner, entry) as one u64 that sorts as the pair (both below 2**32)."""
    return (owner.astype(np.uint64) << np.uint64(32)) | entry.astype(np.uint64)


def _code_bags(codes: pl.DataFrame, tokenizer: Tokenizer, ontology: Ontology
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ancestor bag of each code (code_id, code), then an empty one: offsets (int64, bags + 1),
    entries (u32, ascending in each bag) and weights (f32, 1 / bag size)."""
    code_entries = tokenizer.entries.filter(pl.col("kind") == "code").select(
        ancestor="code", entry="index")
    bags = (
        ontology.expand(codes)
        .join(code_entries, on="ancestor", how="inner")
        .select("code_id", "entry").unique()
        .sort("code_id", "entry")
    )
    code_id = bags["code_id"].to_numpy()
    sizes = np.bincount(code_id, minlength=codes.height + 1)
    weight = (1.0 / sizes[code_id]).astype(np.float32)
    return np.concatenate([[0], np.cumsum(sizes)]), bags["entry"].to_numpy(), weight


def _value_entries(events: pl.DataFrame, tokenizer: Tokenizer) -> pl.DataFrame:
    """event (row in `events`) and entry of the numeric-bin and text-value entries, sorted."""
    entries = tokenizer.entries
    indexed = events.select("code", "numeric_value", "text_value").with_row_index("event")
    measured = indexed.filter(pl.col("numeric_value").is_not_null())
    numeric = measured.with_columns(
        bin=assign_bins(measured["code"], measured["numeric_value"], tokenizer.numeric_edges)
    ).join(
        entries.filter(pl.col("kind") == "numeric").select("code", "bin", entry="index"),
        on=["code", "bin"], how="inner",
    ).select("event", "entry")
    text = indexed.filter(pl.col("text_value").is_not_null()).join(
        entries.filter(pl.col("kind") == "text").select("code", text_value="text", entry="index"),
        on=["code", "text_value"], how="inner",
    ).select("event", "entry")
    return pl.concat([numeric, text]).sort("event", "entry")


def build_positions(events: pl.DataFrame, tokenizer: Tokenizer, ontology: Ontology,
                    table: BagTable | None = None) -> pl.DataFrame:
    """Positions of every subject in `events` (one shard, MEDS columns), sorted by subject, time.

    Out columns: subject_id, position (0-based), time (µs; birth for position 0), age_days,
    entries (list[u32]), weights (list[f32]), age, log_age, log_delta (normalised features);
    with the bag `table` (the prepared layout, whose collate computes the time columns),
    event_items (list[u16]: items of each of the position's events) and items (list[u32]: their
    items, see `ehrmotor.vocabulary.bags`) instead of entries, weights and the time columns.
    """
    code_id, codes = _code_ids(events)
    events = with_birth(events.with_columns(code_id).sort(
        "subject_id", "time", "code_id", nulls_last=False, maintain_order=True))
    bags = _encoded(events, events["code_id"], codes, tokenizer, ontology)
    subject = events["subject_id"].to_numpy()
    new_subject = np.ones(len(subject), dtype=bool)
    new_subject[1:] = subject[1:] != subject[:-1]
    starts = np.flatnonzero(new_subject)  # each subject's first event
    subject_index = np.cumsum(new_subject) - 1  # each event's subject
    kept = np.flatnonzero(_kept_events(events, bags, new_subject))
    layout = _Layout.of(subject_index[kept], len(starts))
    births = events["birth"].gather(starts)
    times = pl.concat([births, events["time"].gather(kept)]).gather(layout.source)
    birth_day = events["birth_day"].to_numpy()
    if table is None:
        lists = _position_bags(_birth_bags(bags, subject_index, birth_day), bags, kept,
                               layout.source)
    else:
        lists = _position_items(_event_items(events, codes, tokenizer, ontology, table), kept,
                                layout.source, subject_index, birth_day)
    positions = pl.DataFrame([
        events["subject_id"].gather(starts).gather(layout.subject),
        times.alias("time"),
        *lists,
        pl.Series("position", layout.position),
        births.gather(layout.subject),
    ])
    if table is not None:
        return positions.with_columns(pl.col("time").dt.epoch("us")).drop("birth")
    return _time_features(positions, tokenizer.time_stats).drop("birth")


class _Layout(NamedTuple):
    """Where each subject's position 0 and its later positions go among the positions."""

    source: np.ndarray  # per position: its subject (position 0) or subjects + its later row
    subject: np.ndarray  # per position: its subject's index
    position: np.ndarray  # per position: its index in its subject (i32)

    @classmethod
    def of(cls, later_subject: np.ndarray, subjects: int) -> _Layout:
        """later_subject: the subject of each later position (ascending, in event order)."""
        later = len(later_subject)
        # A subject's position 0 follows the earlier subjects' positions; its later ones follow.
        first_row = np.arange(subjects) + np.searchsorted(later_subject, np.arange(subjects))
        later_row = np.arange(later) + later_subject + 1
        source = np.empty(subjects + later, dtype=np.int64)
        source[first_row] = np.arange(subjects)
        source[later_row] = subjects + np.arange(later)
        subject = np.empty(subjects + later, dtype=np.int64)
        subject[first_row] = np.arange(subjects)
        subject[later_row] = later_subject
        position = np.zeros(subjects + later, dtype=np.int32)
        position[later_row] = later_row - first_row[later_subject]
        return cls(source, subject, position)


def _kept_events(events: pl.DataFrame, bags: Bags, new_subject: np.ndarray) -> np.ndarray:
    """Per event (sorted by subject and time): whether it makes a later position, i.e. it is
    not a birth-day event and one of its entries is new that calendar day for the subject."""
    later = ~events["birth_day"].to_numpy()[bags.owner]
    day = events["time"].dt.date().to_physical().fill_null(0).to_numpy()
    # Events are sorted by subject and time, so each subject-day is one run of events.
    new_day = new_subject.copy()
    new_day[1:] |= day[1:] != day[:-1]
    day_run = np.cumsum(new_day) - 1
    owner = bags.owner[later]
    keys = _keys(day_run[owner], bags.entry[later])
    order = np.argsort(keys, kind="stable")  # equal keys stay in event order
    sorted_keys = keys[order]
    first_seen = np.ones(len(keys), dtype=bool)
    first_seen[1:] = sorted_keys[1:] != sorted_keys[:-1]
    kept = np.zeros(events.height, dtype=bool)
    kept[owner[order[first_seen]]] = True
    return kept


def _birth_bags(bags: Bags, subject_index: np.ndarray, birth_day: np.ndarray) -> Bags:
    """Position 0 of each subject (owner: its index): the union of its static and birth-day
    entries, with the largest weight of each.

    Every subject has one, empty when none of those events has a vocabulary entry, so that
    position 0 is always the birth-day position and later events start at position 1.
    """
    rows = birth_day[bags.owner]
    union = (
        pl.DataFrame({"subject": subject_index[bags.owner[rows]], "entry": bags.entry[rows],
                      "weight": bags.weight[rows]})
        .group_by("subject", "entry").agg(pl.col("weight").max())
        .sort("subject", "entry")
    )
    return Bags(union["subject"].to_numpy(), union["entry"].to_numpy(),
                union["weight"].to_numpy())


def _position_bags(first: Bags, bags: Bags, kept: np.ndarray, source: np.ndarray
                   ) -> tuple[pl.Series, pl.Series]:
    """entries and weights of each position, taken from `source` (see `_Layout`): the birth
    bags `first` of the subjects, then the event bags `bags` of the `kept` events."""
    subjects = len(source) - len(kept)
    first_sizes, event_sizes = first.sizes(subjects), np.bincount(bags.owner)
    sizes = np.concatenate([first_sizes, event_sizes[kept]])[source]
    starts = np.concatenate([np.cumsum(first_sizes) - first_sizes,
                             len(first.entry) + (np.cumsum(event_sizes) - event_sizes)[kept]])
    rows = concat_ranges(starts[source], sizes)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    return (list_series("entries", offsets, np.concatenate([first.entry, bags.entry])[rows]),
            list_series("weights", offsets, np.concatenate([first.weight, bags.weight])[rows]))


def _event_items(events: pl.DataFrame, codes: pl.DataFrame, tokenizer: Tokenizer,
                 ontology: Ontology, table: BagTable) -> Bags:
    """Each event's items (owner: the event; weight unused, 1): its code's items
    (`bags.code_items`, built once per distinct code and gathered), then its value entry."""
    per_code = code_items(codes, tokenizer, ontology, table)
    sizes = np.bincount(per_code["code_id"].to_numpy(), minlength=codes.height + 1)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    ids = events["code_id"].fill_null(codes.height).to_numpy()
    rows = concat_ranges(offsets[ids], sizes[ids])
    owner = np.repeat(np.arange(len(ids), dtype=np.uint32), sizes[ids])
    values = _value_entries(events, tokenizer)
    owner = np.concatenate([owner, values["event"].to_numpy()])
    item = np.concatenate([per_code["item"].to_numpy()[rows], values["entry"].to_numpy()])
    order = np.argsort(owner, kind="stable")
    return Bags(owner[order], item[order], np.ones(len(order), dtype=np.float32))


def _position_items(items: Bags, kept: np.ndarray, source: np.ndarray,
                    subject_index: np.ndarray, birth_day: np.ndarray
                    ) -> tuple[pl.Series, pl.Series]:
    """event_items and items of each position, taken from `source` (see `_Layout`): position 0
    of a subject holds its birth-day events that have items, a later position its kept event."""
    subjects = len(source) - len(kept)
    counts = items.sizes(len(birth_day))
    first = np.flatnonzero(birth_day & (counts > 0))  # grouped by subject, in event order
    first_count = np.bincount(subject_index[first], minlength=subjects)
    event_sizes = np.concatenate([first_count, np.ones(len(kept), dtype=np.int64)])[source]
    event_starts = np.concatenate([np.cumsum(first_count) - first_count,
                                   len(first) + np.arange(len(kept))])[source]
    chosen = np.concatenate([first, kept])[concat_ranges(event_starts, event_sizes)]
    item_sizes = counts[chosen]
    if len(item_sizes) and item_sizes.max() > np.iinfo(np.uint16).max:
        raise ValueError(f"an event has {item_sizes.max()} vocabulary items, more than 65535")
    rows = concat_ranges((np.cumsum(counts) - counts)[chosen], item_sizes)
    event_offsets = np.concatenate([[0], np.cumsum(event_sizes)])
    item_offsets = np.concatenate([[0], np.cumsum(item_sizes)])[event_offsets]
    return (list_series("event_items", event_offsets, item_sizes.astype(np.uint16)),
            list_series("items", item_offsets, items.entry[rows].astype(np.uint32)))


def _time_features(positions: pl.DataFrame, stats: dict[str, float]) -> pl.DataFrame:
    """Positions (time, birth: datetimes) with time as µs and their `time_features`."""
    times = positions.select(
        time=pl.col("time").dt.epoch("us"), birth=pl.col("birth").dt.epoch("us"),
        previous=pl.when(pl.col("position") != 0).then(pl.col("time").dt.epoch("us").shift(1)))
    return positions.with_columns(times["time"], *time_features(times, stats))


def time_moments(events: pl.DataFrame) -> np.ndarray:
    """Sums for the time statistics of one shard's timed train events: count, then sum and sum of
    squares of age_days, log(1 + age), log(1 + days since the subject's previous event)."""
    timed = with_birth(events.filter(pl.col("time").is_not_null()).sort("subject_id", "time"))
    feats = raw_time_features(timed.select("subject_id", "time", "birth"))
    cols = [pl.col("age_days").cast(pl.Float64), pl.col("raw_log_age"), pl.col("raw_log_delta")]
    sums = feats.select([c.sum().alias(f"s{i}") for i, c in enumerate(cols)]
                        + [(c * c).sum().alias(f"q{i}") for i, c in enumerate(cols)]).row(0)
    return np.array([feats.height, *sums], dtype=np.float64)
