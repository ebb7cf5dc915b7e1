"""Tests for ehrmotor.prepare.ontology on tiny hand-written Athena folders (raw text, quirks
included)."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
from prepare_builders import ancestors_of, parents_of

from ehrmotor.prepare.ontology import Ontology, OntologyError, OntologyStats

CONCEPT_HEADER = [
    "concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_class_id",
    "standard_concept", "concept_code", "valid_start_date", "valid_end_date", "invalid_reason",
]
RELATIONSHIP_HEADER = [
    "concept_id_1", "concept_id_2", "relationship_id", "valid_start_date", "valid_end_date",
    "invalid_reason",
]
ANCESTOR_HEADER = [
    "ancestor_concept_id", "descendant_concept_id", "min_levels_of_separation",
    "max_levels_of_separation",
]

# (concept_id, name, vocabulary, standard_concept, concept_code)
CONCEPTS = [
    (1, "Certain infectious and parasitic diseases", "ICD10CM", "S", "I"),
    (2, "Intestinal infectious diseases", "ICD10CM", "S", "A00-A09"),
    (3, "Cholera", "ICD10CM", "S", "A00"),
    (4, "Cholera due to Vibrio cholerae 01", "ICD10CM", "S", "A00.0"),
    (5, "Typhoid fever", "ICD10CM", "S", "A01"),
    (6, "Neoplasms", "ICD10CM", "S", "II"),
    (10, 'Cholera due to "vibrio" cholerae', "ICD9CM", "", "001.0"),
    (11, "Typhoid fever (old)", "ICD9CM", "", "002.0"),
    (20, "Office visit", "CPT4", "S", "99213"),
    (30, "ASPIRIN tablet [label \"7]", "SPL", "", "abc-123"),
    (40, "aspirin", "RxNorm", "S", "1191"),
    (41, "acetylsalicylic acid", "ATC", "C", "B01AC06"),
    (42, "cisplatin", "RxNorm", "S", "2555"),
    (50, "Cisplatin and etoposide", "HemOnc", "S", "10000"),
    (51, "Platinum regimens", "HemOnc", "C", "9000"),
]
# (concept_id_1, concept_id_2, relationship_id, invalid_reason)
RELATIONSHIPS = [
    (1, 1, "Maps to", ""),
    (4, 4, "Maps to", ""),
    (10, 10, "Maps to", ""),  # a self-map, which must be ignored
    (10, 4, "Maps to", ""),
    (4, 10, "Mapped from", ""),
    (10, 5, "Maps to", "D"),  # an invalid mapping
    (11, 5, "Maps to", ""),
    (20, 3, "Maps to", ""),  # a standard concept's Maps to is not a parent edge
    (30, 40, "Maps to", ""),
    (50, 42, "Has antineoplastic", ""),
]
# (ancestor, descendant, min_levels); self rows at level 0 are added for standard concepts
ANCESTORS = [
    (1, 2, 1), (2, 3, 1), (3, 4, 1), (2, 5, 1), (1, 3, 2), (2, 4, 2), (1, 4, 3), (1, 5, 2),
    (41, 40, 1), (51, 42, 1), (51, 50, 1), (41, 50, 1),
]


def line(fields: list[object]) -> str:
    return "\t".join(str(f) for f in fields)


def write_athena(
    folder: Path,
    concepts: list[tuple[int, str, str, str, str]] = CONCEPTS,
    relationships: list[tuple[int, int, str, str]] = RELATIONSHIPS,
    ancestors: list[tuple[int, int, int]] = ANCESTORS,
    crlf_vocabularies: tuple[str, ...] = ("CPT4",),
) -> Path:
    """Write CONCEPT, CONCEPT_RELATIONSHIP and CONCEPT_ANCESTOR as raw tab-separated text."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [line(CONCEPT_HEADER) + "\n"]
    for concept_id, name, vocabulary, standard, code in concepts:
        fields = [concept_id, name, "Condition", vocabulary, "Code", standard, code,
                  "19700101", "20991231", ""]
        rows.append(line(fields) + ("\r\n" if vocabulary in crlf_vocabularies else "\n"))
    (folder / "CONCEPT.csv").write_bytes("".join(rows).encode())
    rows = [line(RELATIONSHIP_HEADER)]
    rows += [line([a, b, rel, "19700101", "20991231", invalid])
             for a, b, rel, invalid in relationships]
    # The last relationship row ends in CRLF too.
    (folder / "CONCEPT_RELATIONSHIP.csv").write_bytes(("\n".join(rows) + "\r\n").encode())
    standard = [c[0] for c in concepts if c[3] in ("S", "C")]
    rows = [line(ANCESTOR_HEADER)]
    rows += [line([c, c, 0, 0]) for c in standard]
    rows += [line([a, d, level, level]) for a, d, level in ancestors]
    (folder / "CONCEPT_ANCESTOR.csv").write_bytes(("\n".join(rows) + "\n").encode())
    return folder


@pytest.fixture
def athena(tmp_path: Path) -> Path:
    return write_athena(tmp_path / "athena")


def codes_metadata(parents: dict[str, list[str]]) -> pl.DataFrame:
    return pl.DataFrame(
        {"code": list(parents), "description": [None] * len(parents),
         "parent_codes": list(parents.values())},
        schema={"code": pl.String, "description": pl.String, "parent_codes": pl.List(pl.String)},
    )


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


def test_name_with_bare_quote_parses(athena: Path) -> None:
    ontology = Ontology.build(["ICD9CM/001.0", "SPL/abc-123"], athena_dir=athena)
    assert ontology.stats.data_codes_unknown == 0
    assert parents_of(ontology, "SPL/abc-123") == ["RxNorm/1191"]


def test_crlf_rows_parse_without_trailing_carriage_return(tmp_path: Path) -> None:
    athena = write_athena(tmp_path / "athena", crlf_vocabularies=("CPT4", "ICD10CM"))
    ontology = Ontology.build(["CPT4/99213", "ICD10CM/A00.0"], athena_dir=athena)
    assert ontology.stats.data_codes_unknown == 0
    assert ancestors_of(ontology, "ICD10CM/A00.0")[-1] == "ICD10CM/I"
    for column in ("code", "ancestor"):
        assert not ontology.ancestors[column].str.contains("\r").any()


def test_tab_in_concept_name_does_not_shift_columns(tmp_path: Path) -> None:
    concepts = [*CONCEPTS, (7, "Cholera,\tunspecified", "ICD10CM", "S", "A00.9")]
    athena = write_athena(tmp_path / "athena", concepts=concepts,
                          ancestors=[*ANCESTORS, (3, 7, 1)])
    ontology = Ontology.build(["ICD10CM/A00.9"], athena_dir=athena)
    assert parents_of(ontology, "ICD10CM/A00.9") == ["ICD10CM/A00"]
    assert not ontology.ancestors["code"].str.starts_with("Condition/").any()


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
    with caplog.at_level(logging.WARNING, logger="ehrmotor.prepare.ontology"):
        ontology = Ontology.build(["ICD9CM/002.0", "ICD10CM/A00.0"], athena_dir=athena)
    assert ontology.stats.missing_references == 3
    assert "3 Athena parent-edge rows" in caplog.text
    assert parents_of(ontology, "ICD9CM/002.0") == ["ICD10CM/A01"]
    assert parents_of(ontology, "ICD10CM/A00.0") == ["ICD10CM/A00"]


@pytest.mark.parametrize("name", ["CONCEPT.csv", "CONCEPT_ANCESTOR.csv"])
def test_missing_athena_file_raises_naming_it(athena: Path, name: str) -> None:
    (athena / name).unlink()
    with pytest.raises(OntologyError, match=name):
        Ontology.build(["ICD10CM/A00"], athena_dir=athena)


@pytest.mark.parametrize(("name", "column"), [
    ("CONCEPT.csv", "concept_code"),
    ("CONCEPT_RELATIONSHIP.csv", "relationship_id"),
    ("CONCEPT_ANCESTOR.csv", "min_levels_of_separation"),
])
def test_missing_column_raises_naming_file_and_column(athena: Path, name: str, column: str
                                                      ) -> None:
    path = athena / name
    path.write_text(path.read_text().replace(column, "something_else", 1))
    with pytest.raises(OntologyError, match=f"{name}.*{column}"):
        Ontology.build(["ICD10CM/A00"], athena_dir=athena)


def test_unparsable_concept_id_raises_naming_file(athena: Path) -> None:
    path = athena / "CONCEPT_ANCESTOR.csv"
    path.write_text(path.read_text() + "abc\t4\t1\t1\n")
    with pytest.raises(OntologyError, match="CONCEPT_ANCESTOR.csv"):
        Ontology.build(["ICD10CM/A00"], athena_dir=athena)


def test_without_athena_parents_come_from_codes_metadata(caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    metadata = codes_metadata({"B": ["A"], "C": ["B", "A"], "A": [], "D": ["E"]})
    with caplog.at_level(logging.WARNING, logger="ehrmotor.prepare.ontology"):
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


# --------------------------------------------------------------------------- broken downloads

CONCEPT_ROW = b"7\tCholera, unspecified\tCondition\tICD10CM\tCode\tS\tA00.9\t19700101\t20991231\t\n"
# Lines of the default folder's files, header included (the last one of each is its last row).
CONCEPT_LINES = 1 + len(CONCEPTS)
RELATIONSHIP_LINES = 1 + len(RELATIONSHIPS)
ANCESTOR_LINES = 1 + sum(c[3] in ("S", "C") for c in CONCEPTS) + len(ANCESTORS)


def append_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(path.read_bytes() + data)


@pytest.mark.parametrize("name", ["CONCEPT.csv", "CONCEPT_RELATIONSHIP.csv",
                                  "CONCEPT_ANCESTOR.csv"])
def test_header_only_file_is_an_empty_vocabulary_warning(
        athena: Path, name: str, caplog: pytest.LogCaptureFixture) -> None:
    path = athena / name
    path.write_bytes(path.read_bytes().split(b"\n")[0] + b"\r\n")
    with caplog.at_level(logging.WARNING, logger="ehrmotor.prepare.ontology"):
        ontology = Ontology.build(["ICD10CM/A00"], athena_dir=athena)
    assert f"{path}: empty vocabulary" in caplog.text
    assert ontology.stats.data_codes == 1


@pytest.mark.parametrize(("name", "tail", "line", "fields"), [
    # Cut after concept_code: read from the line's end, it was the bogus concept "99/RxNorm".
    ("CONCEPT.csv", b"99\tAspirin 81 mg\tDrug\tRxNorm\tClinical Drug\tS\t1191",
     CONCEPT_LINES + 1, "7 of the header's 10"),
    ("CONCEPT_RELATIONSHIP.csv", b"11\t4\tMaps to", RELATIONSHIP_LINES + 1, "3 of the header's 6"),
    # A cut id: "4" may be the start of "41", a different concept.
    ("CONCEPT_ANCESTOR.csv", b"1\t4", ANCESTOR_LINES + 1, "2 of the header's 4"),
])
def test_truncated_last_line_raises_naming_file_and_line(
        athena: Path, name: str, tail: bytes, line: int, fields: str) -> None:
    append_bytes(athena / name, tail)
    with pytest.raises(OntologyError) as raised:
        Ontology.build(["ICD10CM/A00"], athena_dir=athena)
    message = str(raised.value)
    assert message.startswith(f"{athena / name}: line {line}: "), message
    assert fields in message and "truncated download" in message
    assert "\n" not in message


def test_short_line_inside_concept_file_raises(athena: Path) -> None:
    path = athena / "CONCEPT.csv"
    lines = path.read_bytes().split(b"\n")
    lines.insert(3, b"98\tHalf a row\tDrug")  # a row split by a stray newline
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(OntologyError, match=r"CONCEPT.csv: line 4: 3 of the header's 10 "):
        Ontology.build(["ICD10CM/A00"], athena_dir=athena)


def test_duplicate_concept_id_raises_naming_id_and_lines(athena: Path) -> None:
    path = athena / "CONCEPT.csv"
    append_bytes(path, b"\r\n" + CONCEPT_ROW.replace(b"7\t", b"5\t", 1))  # after a blank line
    with pytest.raises(OntologyError) as raised:
        Ontology.build(["ICD10CM/A00"], athena_dir=athena)
    assert str(raised.value) == (
        f"{path}: line {CONCEPT_LINES + 2}, column 'concept_id': concept_id 5 is also on line 6 "
        "(1 repeated line(s)); expected each concept_id once"
    )


@pytest.mark.parametrize(("name", "row", "line", "column", "value"), [
    ("CONCEPT.csv", CONCEPT_ROW.replace(b"7\t", b"7a\t", 1), CONCEPT_LINES + 1, "concept_id",
     "'7a'"),
    ("CONCEPT.csv", CONCEPT_ROW.replace(b"7\t", b"\t", 1), CONCEPT_LINES + 1, "concept_id", "''"),
    # After a blank line, which still counts as a line.
    ("CONCEPT_RELATIONSHIP.csv", b"\n11\t4.0\tMaps to\t19700101\t20991231\t\n",
     RELATIONSHIP_LINES + 2, "concept_id_2", "'4.0'"),
    ("CONCEPT_RELATIONSHIP.csv", b"x11\t4\tIs a\t19700101\t20991231\t\n", RELATIONSHIP_LINES + 1,
     "concept_id_1", "'x11'"),
    ("CONCEPT_ANCESTOR.csv", b"1e3\t4\t1\t1\n", ANCESTOR_LINES + 1, "ancestor_concept_id",
     "'1e3'"),
    ("CONCEPT_ANCESTOR.csv", b"1\t4 \t1\t1\n", ANCESTOR_LINES + 1, "descendant_concept_id",
     "'4 '"),
])
def test_non_integer_id_raises_naming_file_column_and_line(
        athena: Path, name: str, row: bytes, line: int, column: str, value: str) -> None:
    append_bytes(athena / name, row)
    with pytest.raises(OntologyError) as raised:
        Ontology.build(["ICD10CM/A00"], athena_dir=athena)
    message = str(raised.value)
    expected = f"{athena / name}: line {line}, column {column!r}: {value} is not an integer"
    assert message.startswith(expected), message
    assert "\n" not in message


@pytest.mark.parametrize(("name", "row", "column"), [
    ("CONCEPT_RELATIONSHIP.csv", b"\n11\t\tMaps to\t19700101\t20991231\t\n", "concept_id_2"),
    ("CONCEPT_ANCESTOR.csv", b"\t4\t1\t1\n", "ancestor_concept_id"),
])
def test_empty_id_in_a_used_row_raises(athena: Path, name: str, row: bytes, column: str) -> None:
    append_bytes(athena / name, row)
    with pytest.raises(OntologyError, match=rf"{name}: line \d+, column '{column}': empty "):
        Ontology.build(["ICD10CM/A00"], athena_dir=athena)
