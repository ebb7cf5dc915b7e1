"""Tests for ehrmotor.vocabulary.athena: reading raw Athena downloads (quirks, truncated and broken
files) through Ontology.build."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from athena_builders import ANCESTORS, CONCEPTS, RELATIONSHIPS, write_athena
from prepare_builders import ancestors_of, parents_of

from ehrmotor.vocabulary.ontology import Ontology, OntologyError


@pytest.fixture
def athena(tmp_path: Path) -> Path:
    return write_athena(tmp_path / "athena")


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
    with caplog.at_level(logging.WARNING, logger="ehrmotor.vocabulary.ontology"):
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

