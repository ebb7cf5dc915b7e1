"""Tests for the synthetic EHR's Athena vocabulary (`ehrmotor.synthetic.athena`): the quirks of
the real download, closure under reference, and agreement with the data and codes metadata.

Datasets come from `synthetic_fixtures`; everything is asserted from the written files alone.
"""

from __future__ import annotations

import csv
from pathlib import Path

import meds
import polars as pl
import pytest
from synthetic_fixtures import ATHENA_HEADERS

# Every test here reads the 3,000-subject session dataset (seconds to generate).
pytestmark = pytest.mark.slow

FIRST_CONCEPT_ID = 2_000_000_001


def _ids(frame: pl.DataFrame, *columns: str) -> pl.DataFrame:
    return frame.select(pl.col(c).cast(pl.Int64) for c in columns)


# --------------------------------------------------------------------------- Athena vocabulary


def test_athena_files_parse_with_quoting_disabled(
    main_dir: Path, athena: dict[str, pl.DataFrame]
) -> None:
    for name, header in ATHENA_HEADERS.items():
        path = main_dir / "athena" / name
        lines = path.read_bytes().count(b"\n")
        assert athena[name].columns == header
        assert athena[name].height == lines - 1, name
    # The quirks live in CONCEPT.csv: Python's csv module reads it too, one record per line.
    path = main_dir / "athena" / "CONCEPT.csv"
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = ATHENA_HEADERS["CONCEPT.csv"]
    assert rows[0] == header
    assert len(rows) == path.read_bytes().count(b"\n")
    assert {len(row) for row in rows} == {len(header)}
    assert not any(row[-1] for row in rows[1:])  # invalid_reason is empty, "\r" not kept


def test_athena_has_the_quirks_of_the_real_download(
    main_dir: Path, concepts: pl.DataFrame, athena: dict[str, pl.DataFrame]
) -> None:
    # Bare (unbalanced) double quotes in some concept names.
    quoted = concepts.filter(pl.col("concept_name").str.contains('"', literal=True))
    assert quoted.height > 0
    assert (quoted["concept_name"].str.count_matches('"', literal=True) % 2 == 1).any()
    # CRLF line ends, on CPT4 rows; readers must not keep the carriage return.
    crlf = [line for line in (main_dir / "athena" / "CONCEPT.csv").read_bytes().split(b"\n")
            if line.endswith(b"\r")]
    assert crlf
    assert {line.split(b"\t")[3] for line in crlf} == {b"CPT4"}
    assert not concepts["invalid_reason"].drop_nulls().str.contains("\r").any()
    # YYYYMMDD dates.
    for name in ("CONCEPT.csv", "CONCEPT_RELATIONSHIP.csv"):
        for column in ("valid_start_date", "valid_end_date"):
            dates = athena[name][column]
            assert dates.str.contains(r"^\d{8}$").all(), (name, column)
            assert dates.str.to_date("%Y%m%d", strict=False).null_count() == 0, (name, column)
    # Invented concept ids.
    assert concepts["concept_id"].min() >= FIRST_CONCEPT_ID
    assert concepts["concept_id"].is_unique().all()
    assert concepts["code"].is_unique().all()


def test_athena_is_closed_under_reference(
    concepts: pl.DataFrame, athena: dict[str, pl.DataFrame]
) -> None:
    known = concepts.select(id="concept_id")
    relationship = athena["CONCEPT_RELATIONSHIP.csv"]
    ancestor = athena["CONCEPT_ANCESTOR.csv"]
    assert relationship.height > 0 and ancestor.height > 0
    for frame, columns in ((relationship, ("concept_id_1", "concept_id_2")),
                           (ancestor, ("ancestor_concept_id", "descendant_concept_id"))):
        for column in columns:
            ids = _ids(frame, column).rename({column: "id"}).unique()
            missing = ids.join(known, on="id", how="anti")
            assert missing.height == 0, (column, missing.head())


def test_icd9cm_concepts_reach_the_hierarchy_only_through_maps_to(
    concepts: pl.DataFrame, athena: dict[str, pl.DataFrame]
) -> None:
    icd9 = concepts.filter(pl.col("vocabulary_id") == "ICD9CM")
    assert icd9.height > 1_000
    assert icd9["standard_concept"].null_count() == icd9.height  # non-standard
    relationship = athena["CONCEPT_RELATIONSHIP.csv"].with_columns(
        pl.col("concept_id_1", "concept_id_2").cast(pl.Int64)
    )
    maps = relationship.filter(pl.col("relationship_id") == "Maps to").join(
        icd9.select(concept_id_1="concept_id"), on="concept_id_1"
    )
    assert maps["concept_id_1"].n_unique() == icd9.height  # every ICD9CM concept maps
    targets = maps.join(concepts.select(concept_id_2="concept_id", vocab="vocabulary_id",
                                        standard="standard_concept"), on="concept_id_2")
    assert set(targets["vocab"].unique()) == {"ICD10CM"}
    assert set(targets["standard"].unique()) == {"S"}
    own_is_a = relationship.filter(pl.col("relationship_id") == "Is a").join(
        icd9.select(concept_id_1="concept_id"), on="concept_id_1")
    assert own_is_a.height == 0
    ancestor = _ids(athena["CONCEPT_ANCESTOR.csv"], "ancestor_concept_id",
                    "descendant_concept_id")
    icd9_ids = icd9["concept_id"].implode()
    in_ancestor = ancestor.filter(pl.col("ancestor_concept_id").is_in(icd9_ids)
                                  | pl.col("descendant_concept_id").is_in(icd9_ids))
    assert in_ancestor.height == 0


def test_athena_has_vocabularies_the_pipeline_prunes(concepts: pl.DataFrame) -> None:
    counts = dict(concepts["vocabulary_id"].value_counts().iter_rows())
    assert counts.get("SPL", 0) > 0
    assert counts.get("HemOnc", 0) > 0


def test_every_data_code_is_an_athena_concept(
    main_events: pl.DataFrame, concepts: pl.DataFrame
) -> None:
    used = main_events.select("code").unique().filter(
        ~pl.col("code").is_in([meds.birth_code, meds.death_code])
    )
    missing = used.join(concepts.select("code"), on="code", how="anti")
    assert missing.height == 0, missing.head()


def test_codes_metadata_parents_match_the_athena_hierarchy(
    main_dir: Path, concepts: pl.DataFrame, athena: dict[str, pl.DataFrame]
) -> None:
    codes = pl.read_parquet(main_dir / meds.code_metadata_filepath)
    assert codes["code"].is_unique().all()
    expected_codes = set(concepts["code"]) | {meds.birth_code, meds.death_code}
    assert set(codes["code"]) == expected_codes
    standard = concepts.filter(pl.col("standard_concept").is_not_null()).select(child="concept_id")
    source = concepts.filter(pl.col("standard_concept").is_null()).select(child="concept_id")
    maps_to = (
        athena["CONCEPT_RELATIONSHIP.csv"]
        .filter(pl.col("relationship_id") == "Maps to")
        .select(child=pl.col("concept_id_1").cast(pl.Int64),
                parent=pl.col("concept_id_2").cast(pl.Int64))
        .filter(pl.col("child") != pl.col("parent"))
        .join(source, on="child")
    )
    is_a = (
        athena["CONCEPT_ANCESTOR.csv"]
        .filter(pl.col("min_levels_of_separation") == "1")
        .select(child=pl.col("descendant_concept_id").cast(pl.Int64),
                parent=pl.col("ancestor_concept_id").cast(pl.Int64))
        .join(standard, on="child")
    )
    names = concepts.select("concept_id", "code")
    athena_pairs = (
        pl.concat([maps_to, is_a])
        .join(names.rename({"concept_id": "child", "code": "child_code"}), on="child")
        .join(names.rename({"concept_id": "parent", "code": "parent_code"}), on="parent")
        .select("child_code", "parent_code")
        .unique()
    )
    metadata_pairs = (
        codes.select(child_code="code", parent_code="parent_codes")
        .explode("parent_code")
        .drop_nulls()
        .unique()
    )
    assert athena_pairs.height > 100_000
    only_athena = athena_pairs.join(metadata_pairs, on=["child_code", "parent_code"], how="anti")
    only_metadata = metadata_pairs.join(athena_pairs, on=["child_code", "parent_code"],
                                        how="anti")
    assert only_athena.height == 0, only_athena.head()
    assert only_metadata.height == 0, only_metadata.head()

