"""Helpers for the `compute_features` tests: MEDS copies, label choices.

The trained tiny bundle is conftest's `tiny_bundle` (built by `synthetic_data.train_bundle`).
`Subjects` holds every subject's positions (built with the bundle's tokenizer) so tests can pick
label times at known positions.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl

from ehrmotor.meds import data_files, scan_shard
from ehrmotor.sequences.positions import build_positions
from ehrmotor.vocabulary.ontology import Ontology
from ehrmotor.vocabulary.tokenizer import Tokenizer


def read_events(meds: Path) -> pl.DataFrame:
    """All events of a MEDS directory, in scan_shard's columns and dtypes."""
    return pl.concat([scan_shard(path).collect() for path in data_files(meds)])


def write_meds_copy(events: pl.DataFrame, source: Path, target: Path) -> Path:
    """A one-shard MEDS directory holding `events`, with the metadata of `source`."""
    (target / "data").mkdir(parents=True)
    shutil.copytree(source / "metadata", target / "metadata")
    events.sort("subject_id", "time", nulls_last=False, maintain_order=True).write_parquet(
        target / "data" / "0.parquet")
    return target


def at(micros: int) -> datetime:
    """A naive datetime from µs since 1970."""
    return datetime(1970, 1, 1) + timedelta(microseconds=int(micros))


@dataclass(frozen=True)
class Subjects:
    """Positions of every subject (columns of `build_positions`, time in µs)."""

    positions: pl.DataFrame

    @classmethod
    def build(cls, events: pl.DataFrame, bundle: Path) -> Subjects:
        tokenizer, ontology = Tokenizer.load(bundle), Ontology.load(bundle / "ontology")
        return cls(build_positions(events, tokenizer, ontology))

    def sizes(self) -> pl.DataFrame:
        """subject_id, positions (count), birth (µs), sorted by subject."""
        return self.positions.group_by("subject_id").agg(
            positions=pl.len(), birth=pl.col("time").min()).sort("subject_id")

    def with_sizes(self, low: int, high: int, count: int) -> list[int]:
        """The first `count` subjects with between low and high positions."""
        sizes = self.sizes().filter(pl.col("positions").is_between(low, high))
        return sizes["subject_id"].head(count).to_list()

    def times(self, subject_id: int) -> list[int]:
        """Position times (µs) of one subject, position 0 (birth) first."""
        rows = self.positions.filter(pl.col("subject_id") == subject_id).sort("position")
        return rows["time"].to_list()

    def birth(self, subject_id: int) -> datetime:
        return at(self.times(subject_id)[0])
