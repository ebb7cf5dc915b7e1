"""Tests for ehrmotor.vocabulary.ontology on tiny hand-written Athena folders (raw text, quirks
included)."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
from athena_builders import ANCESTORS, CONCEPTS, RELATIONSHIPS, codes_metadata, write_athena
from prepare_builders import ancestors_of, parents_of

from ehrmotor.vocabulary.ontology import Ontology, OntologyError, OntologyStats


@pytest.fixture
def athena(tmp_path: Path) -> Path:
    return write_athena(tmp_path / "athena")


def test_parents_from_level_one_ancestor_rows_and_closure_finds_grandparents(athena: Path) -> None:
    ontology = Ontology.build(["ICD10CM/A00.0"], athena_dir=athena)
    assert parents_of(ontology, "ICD10CM/A00.0") == ["ICD10CM/A00"]
    assert parents_of(ontology, "ICD10CM/A00") == ["ICD10CM/A00-A09"]
    expected = ["ICD10CM/A00", "ICD10CM/A00-A09", "ICD10CM/I"]
    assert ancestors_of(ontology, "ICD10CM/A00.0") == expected
    depths = ontology.ancestors.filter(pl.col("code") == "ICD10CM/A00.0")["depth"].to_list()
    assert depths == [0, 1, 2, 3]
    assert ontology.ancestors.schema == {"code": pl.String, "ancestor": pl.String,
                                         "depth": pl.Int32}


def test_maps_to_gives_parents_of_non_standard_concepts_only(athena: Path) -> None:
    data = ["ICD9CM/001.0", "ICD9CM/002.0", "CPT4/99213"]
    ontology = Ontology.build(data, athena_dir=athena)
    # The self-map and the invalid mapping to A01 are ignored.
    assert parents_of(ontology, "ICD9CM/001.0") == ["ICD10CM/A00.0"]
    assert ancestors_of(ontology, "ICD9CM/001.0")[-1] == "ICD10CM/I"
    assert parents_of(ontology, "ICD9CM/002.0") == ["ICD10CM/A01"]
    assert parents_of(ontology, "CPT4/99213") == []
    assert ontology.parents.filter(pl.col("code") == pl.col("parent")).height == 0


def test_codes_metadata_parent_codes_override_athena(athena: Path) -> None:
    metadata = codes_metadata({
        "ICD10CM/A00.0": ["ICD10CM/A01"],  # replaces the Athena parent A00
        "ICD10CM/A00": [],  # empty: Athena parents stay
        "MEDS_BIRTH": [],
        "LOCAL/lab-1": ["LOCAL/labs", "ICD10CM/II"],
    })
    data = ["ICD10CM/A00.0", "ICD10CM/A00", "MEDS_BIRTH", "LOCAL/lab-1"]
    ontology = Ontology.build(data, athena_dir=athena, codes_metadata=metadata)
    assert parents_of(ontology, "ICD10CM/A00.0") == ["ICD10CM/A01"]
    assert parents_of(ontology, "ICD10CM/A00") == ["ICD10CM/A00-A09"]
    assert parents_of(ontology, "LOCAL/lab-1") == ["ICD10CM/II", "LOCAL/labs"]
    assert ancestors_of(ontology, "MEDS_BIRTH") == []
    assert ontology.stats.data_codes_unknown == 0


def test_pruning_keeps_data_codes_and_their_ancestors_only(athena: Path) -> None:
    ontology = Ontology.build(["ICD10CM/A00", "Unknown/X"], athena_dir=athena)
    kept = set(ontology.ancestors["code"].to_list())
    assert kept == {"ICD10CM/A00", "ICD10CM/A00-A09", "ICD10CM/I", "Unknown/X"}
    assert ontology.stats == OntologyStats(
        concepts_read=len(CONCEPTS), edges_read=11, missing_references=0, codes_kept=4,
        edges_kept=2, data_codes=2, data_codes_unknown=1,
    )
    assert ontology.parents.columns == ["code", "parent"]
    assert ontology.parents.equals(ontology.parents.sort("code", "parent"))


def test_removed_vocabularies_never_enter_as_ancestors(athena: Path) -> None:
    ontology = Ontology.build(["RxNorm/2555", "RxNorm/1191"], athena_dir=athena)
    assert parents_of(ontology, "RxNorm/2555") == []
    assert parents_of(ontology, "RxNorm/1191") == ["ATC/B01AC06"]
    kept = ontology.ancestors["code"]
    assert not kept.str.starts_with("HemOnc/").any()
    assert not kept.str.starts_with("SPL/").any()
    kept_all = Ontology.build(["RxNorm/2555"], athena_dir=athena, remove_vocabularies=())
    assert parents_of(kept_all, "RxNorm/2555") == ["HemOnc/9000"]


def test_removed_vocabulary_code_in_the_data_is_kept(athena: Path) -> None:
    ontology = Ontology.build(["HemOnc/10000"], athena_dir=athena)
    # Its own non-removed parent stays; its HemOnc parent is not in the data and goes.
    assert parents_of(ontology, "HemOnc/10000") == ["ATC/B01AC06"]
    both = Ontology.build(["HemOnc/10000", "HemOnc/9000"], athena_dir=athena)
    assert parents_of(both, "HemOnc/10000") == ["ATC/B01AC06", "HemOnc/9000"]


def test_missing_concept_references_are_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                ) -> None:
    athena = write_athena(
        tmp_path / "athena",
        relationships=[*RELATIONSHIPS, (11, 998, "Maps to", ""), (997, 4, "Maps to", "")],
        ancestors=[*ANCESTORS, (999, 4, 1)],
    )
    with caplog.at_level(logging.WARNING, logger="ehrmotor.vocabulary.ontology"):
        ontology = Ontology.build(["ICD9CM/002.0", "ICD10CM/A00.0"], athena_dir=athena)
    assert ontology.stats.missing_references == 3
    assert "3 Athena parent-edge rows" in caplog.text
    assert parents_of(ontology, "ICD9CM/002.0") == ["ICD10CM/A01"]
    assert parents_of(ontology, "ICD10CM/A00.0") == ["ICD10CM/A00"]


def test_without_athena_parents_come_from_codes_metadata(caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    metadata = codes_metadata({"B": ["A"], "C": ["B", "A"], "A": [], "D": ["E"]})
    with caplog.at_level(logging.WARNING, logger="ehrmotor.vocabulary.ontology"):
        ontology = Ontology.build(pl.Series(["C", "Z", None]), codes_metadata=metadata)
    assert "no Athena vocabulary" in caplog.text
    assert ontology.parents.rows() == [("B", "A"), ("C", "A"), ("C", "B")]
    assert ancestors_of(ontology, "C") == ["A", "B"]
    assert ontology.stats.data_codes == 2
    assert ontology.stats.data_codes_unknown == 1


def test_expand_joins_ancestors_and_maps_unknown_codes_to_themselves(athena: Path) -> None:
    ontology = Ontology.build(["ICD9CM/001.0", "CPT4/99213"], athena_dir=athena)
    events = pl.LazyFrame({
        "subject_id": [1, 1, 2, 2],
        "code": ["ICD9CM/001.0", "CPT4/99213", "NOT/known", "ICD9CM/001.0"],
    })
    expanded = ontology.expand(events)
    assert isinstance(expanded, pl.LazyFrame)
    rows = expanded.collect()
    assert rows.columns == ["subject_id", "code", "ancestor"]
    chain = ["ICD9CM/001.0", "ICD10CM/A00.0", "ICD10CM/A00", "ICD10CM/A00-A09", "ICD10CM/I"]
    expected = ([(1, "ICD9CM/001.0", a) for a in chain] + [(1, "CPT4/99213", "CPT4/99213")]
                + [(2, "NOT/known", "NOT/known")] + [(2, "ICD9CM/001.0", a) for a in chain])
    assert Counter(rows.rows()) == Counter(expected)
    assert rows.rows()[:5] == expected[:5]  # input order kept, each code's ancestors by depth
    frame = ontology.expand(events.collect().rename({"code": "c"}), column="c")
    assert isinstance(frame, pl.DataFrame)
    assert frame.height == len(expected)


def test_expand_rejects_a_missing_column(athena: Path) -> None:
    ontology = Ontology.build(["ICD10CM/A00"], athena_dir=athena)
    with pytest.raises(OntologyError, match="no column 'code'"):
        ontology.expand(pl.DataFrame({"other": ["x"]}))


def test_save_load_round_trip_is_identical_and_deterministic(athena: Path, tmp_path: Path
                                                             ) -> None:
    data = ["ICD9CM/001.0", "HemOnc/10000", "MEDS_BIRTH"]
    ontology = Ontology.build(data, athena_dir=athena)
    ontology.save(tmp_path / "first")
    loaded = Ontology.load(tmp_path / "first")
    assert loaded.parents.equals(ontology.parents)
    assert loaded.ancestors.equals(ontology.ancestors)
    assert loaded.stats == ontology.stats
    Ontology.build(list(reversed(data)), athena_dir=athena).save(tmp_path / "second")
    for name in ("parents.parquet", "ancestors.parquet", "stats.json"):
        first = (tmp_path / "first" / name).read_bytes()
        assert first == (tmp_path / "second" / name).read_bytes(), name


def test_load_missing_file_raises_naming_it(athena: Path, tmp_path: Path) -> None:
    Ontology.build(["ICD10CM/A00"], athena_dir=athena).save(tmp_path / "saved")
    (tmp_path / "saved" / "stats.json").unlink()
    with pytest.raises(OntologyError, match="stats.json"):
        Ontology.load(tmp_path / "saved")


def test_a_cycle_terminates(athena: Path) -> None:
    metadata = codes_metadata({"X/a": ["X/b"], "X/b": ["X/c"], "X/c": ["X/a", "ICD10CM/A00"]})
    ontology = Ontology.build(["X/a"], athena_dir=athena, codes_metadata=metadata)
    assert ancestors_of(ontology, "X/a") == ["X/b", "X/c", "ICD10CM/A00", "ICD10CM/A00-A09",
                                            "ICD10CM/I"]
    pairs = ontology.ancestors.select("code", "ancestor")
    assert pairs.is_unique().all()


@pytest.mark.slow
def test_synthetic_dataset_every_data_code_is_in_the_ontology(tmp_path: Path) -> None:
    from ehrmotor.synthetic import generate

    meds = generate(tmp_path / "meds", 300, seed=1, progress=False)
    data_codes = (
        pl.scan_parquet(meds / "data" / "**" / "*.parquet").select(pl.col("code").unique())
        .collect()["code"]
    )
    metadata = pl.read_parquet(meds / "metadata" / "codes.parquet")
    ontology = Ontology.build(data_codes, athena_dir=meds / "athena", codes_metadata=metadata)
    assert ontology.stats.data_codes_unknown == 0
    assert ontology.stats.missing_references == 0
    assert data_codes.is_in(ontology.ancestors["code"].implode()).all()
    icd9 = sorted(c for c in data_codes.to_list() if c.startswith("ICD9CM/"))[0]
    mapped = parents_of(ontology, icd9)
    assert mapped and all(p.startswith("ICD10CM/") for p in mapped)
    chapter = ancestors_of(ontology, mapped[0])[-1]
    assert chapter in ancestors_of(ontology, icd9)
    assert chapter.split("/")[1].strip("IVX") == ""  # chapters are named by Roman numeral
    assert not ontology.ancestors["code"].str.starts_with("SPL/").any()
    athena_only = Ontology.build(data_codes, athena_dir=meds / "athena")
    assert athena_only.parents.equals(ontology.parents)
