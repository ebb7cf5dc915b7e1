"""The bag table and the expansion of stored items at collate (`ehrmotor.vocabulary.bags`)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from prepare_builders import event, events_frame, ontology, tokenizer

from ehrmotor.errors import InputError
from ehrmotor.sequences.batching import collate_windows, expand_items, frame_rows
from ehrmotor.sequences.positions import build_positions
from ehrmotor.sequences.shards import INDEX, load_prepared
from ehrmotor.sequences.time_features import TIME_COLUMNS
from ehrmotor.sequences.windows import training_windows, window_sequences
from ehrmotor.vocabulary.bags import BAGS_FILE, OLDER_LAYOUT, BagTable

# C is out of the vocabulary with two in-vocabulary parents: its events store two items, A and B.
TREE = {"A": [], "B": [], "C": ["A", "B"], "D": ["C"], "A/x": ["A"], "L": [], "MEDS_BIRTH": []}
VOCAB = [("code", "A"), ("code", "B"), ("code", "A/x"), ("code", "D"), ("code", "L"),
         ("numeric", "L", 1), ("text", "B", "yes")]
BIRTH = datetime(2000, 1, 1, 8)
EVENTS = [
    # Position 0: A/x (bag A, A/x: weights 1/2), D (bag A, B, D: weights 1/3) and B (bag B:
    # weight 1, and its text entry, weight 1) overlap in A and B, which keep their larger weight.
    event(1, None, "A/x"), event(1, BIRTH, "MEDS_BIRTH"), event(1, BIRTH, "D"),
    event(1, BIRTH, "B", text="yes"),
    event(1, datetime(2000, 2, 1), "C"),  # items A, B: bag A, B
    event(1, datetime(2000, 2, 2), "L", 4.0),  # items L and its bin entry
    event(1, datetime(2000, 2, 3), "D"),
    event(2, datetime(1990, 5, 1), "MEDS_BIRTH"),  # position 0 without any entry
    event(2, datetime(2001, 1, 1), "C", text="yes"),  # C has no text entry: items A, B
]


def expanded(positions: pl.DataFrame, table: BagTable) -> tuple[list, list, list]:
    def flat(name: str) -> torch.Tensor:
        return torch.tensor(positions[name].explode().drop_nulls().to_list(), dtype=torch.long)

    events = torch.tensor(positions["event_items"].list.len().to_list())
    entries, weights, sizes = expand_items(
        flat("items"), flat("event_items"),
        torch.repeat_interleave(torch.arange(len(events)), events), positions.height, table)
    return entries.tolist(), weights.tolist(), sizes.tolist()


def test_items_expand_to_exactly_the_encoded_bags() -> None:
    vocabulary, tree = tokenizer(VOCAB, {"L": [3.0, 5.0]}), ontology(TREE)
    table = BagTable.of(vocabulary, tree)
    positions = build_positions(events_frame(EVENTS), vocabulary, tree, table)
    encoded = build_positions(events_frame(EVENTS), vocabulary, tree)  # expanded bags
    assert positions.drop("items", "event_items").equals(
        encoded.drop("entries", "weights", *TIME_COLUMNS))
    assert positions["items"].to_list()[:2] == [[2, 1, 6, 3], [0, 1]]  # events by time, code
    assert positions["event_items"].to_list()[:2] == [[1, 2, 1], [2]]
    entries, weights, sizes = expanded(positions, table)
    assert entries == encoded["entries"].explode().drop_nulls().to_list()
    assert sizes == encoded["entries"].list.len().to_list()
    # float32 bits: the weights are exactly the encoded ones.
    expected = encoded["weights"].explode().drop_nulls().to_numpy()
    assert np.array(weights, dtype=np.float32).tobytes() == expected.tobytes()
    assert encoded["entries"].to_list()[0] == [0, 1, 2, 3, 6]
    # A: 1/2 (from A/x) over 1/3 (from D); B: 1 (the B event) over 1/3; D: 1/3 only.
    assert weights[:5] == [0.5, 1.0, 0.5, pytest.approx(1 / 3), 1.0]


def test_the_table_round_trips_and_a_missing_one_names_the_older_layout(tmp_path: Path) -> None:
    table = BagTable.of(tokenizer(VOCAB), ontology(TREE))
    assert table.members[table.offsets[3]:table.offsets[4]].tolist() == [0, 1, 3]  # D
    table.save(tmp_path)
    loaded = BagTable.load(tmp_path)
    for name in ("offsets", "members", "value"):
        assert np.array_equal(getattr(loaded, name), getattr(table, name)), name
    assert loaded.time_stats == table.time_stats
    with np.load(tmp_path / BAGS_FILE) as stored:
        older = {name: stored[name] for name in ("offsets", "members", "value")}
    np.savez(tmp_path / BAGS_FILE, **older, format_version=np.array([1]))
    with pytest.raises(InputError, match="format_version 1; prepared with an older layout"):
        BagTable.load(tmp_path)
    (tmp_path / BAGS_FILE).unlink()
    with pytest.raises(InputError, match="rerun `ehrmotor prepare`"):
        BagTable.load(tmp_path)


def test_a_dataset_of_the_older_layout_names_the_fix(tmp_path: Path) -> None:
    (tmp_path / INDEX).write_text(json.dumps({"format_version": 3, "files": []}))
    with pytest.raises(InputError) as raised:
        load_prepared(tmp_path)
    assert OLDER_LAYOUT in str(raised.value) and "\n" not in str(raised.value)


STATS = {"age_mean": 3000.0, "age_std": 2000.0, "log_age_mean": 6.5, "log_age_std": 1.5,
         "log_delta_mean": 1.2, "log_delta_std": 0.9}


@pytest.mark.parametrize("max_window", [2, 3, 16])
def test_prepared_rows_collate_to_the_time_inputs_of_rows_built_in_memory(max_window: int
                                                                          ) -> None:
    """The prepared layout stores times only; its collate computes age and time features that
    equal, bit for bit, those of the in-memory rows of the same windows, in every window (a
    later window's first position follows the subject's position before it, not birth)."""
    vocabulary, tree = tokenizer(VOCAB, {"L": [3.0, 5.0]}, STATS), ontology(TREE)
    table = BagTable.of(vocabulary, tree)
    prepared = build_positions(events_frame(EVENTS), vocabulary, tree, table)
    encoded = build_positions(events_frame(EVENTS), vocabulary, tree)
    windows = training_windows(encoded, max_window)
    assert windows["window"].max() == (2 if max_window == 2 else 1 if max_window == 3 else 0)
    for layout, rows in (("prepared", window_sequences(prepared, windows)),
                         ("in memory", window_sequences(encoded, windows))):
        rows = rows.with_columns(points=pl.lit([1]))
        batch = collate_windows(frame_rows(rows), bags=table)
        if layout == "prepared":
            got = batch
        else:
            expected = batch
    for key in ("age_days", "time_features", "entries", "weights", "bag_offsets"):
        assert got[key].dtype == expected[key].dtype, key
        assert got[key].numpy().tobytes() == expected[key].numpy().tobytes(), key
    # Subject 1's later positions are a day apart; log_delta differs from position 0's.
    assert len(set(expected["time_features"][:, 2].tolist())) > 1
