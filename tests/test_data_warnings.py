"""Data oddities every step can read but a user must hear of: one warning line each, with counts
and an example, from `ehrmotor validate` (report.warnings) and once per `prepare` run."""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pytest
from athena_builders import codes_metadata, write_athena
from meds_builders import (
    CODES,
    HELD_OUT,
    TRAIN,
    replace_column,
    rewrite,
    rows_table,
    subject_rows,
    write_table,
)
from prepare_builders import ancestors_of

from ehrmotor.cli import main
from ehrmotor.errors import cut
from ehrmotor.meds import require_valid, validate_dataset
from ehrmotor.meds.oddities import latest_year
from ehrmotor.vocabulary.ontology import Ontology


def only_warning(meds_dir: Path) -> str:
    """The one warning `validate_dataset` gives (no errors; new codes such as MEDS_DEATH are
    not looked up in codes.parquet)."""
    report = validate_dataset(meds_dir, check_codes=False)
    assert report.ok, report.errors
    assert len(report.warnings) == 1, report.warnings
    return str(report.warnings[0])


def test_a_clean_dataset_gives_none_of_these_warnings(
        meds_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert validate_dataset(meds_dir).warnings == []
    metadata = codes_metadata({"ICD10CM/A00.0": ["ICD10CM/A00"], "ICD10CM/A00": []})
    with caplog.at_level(logging.WARNING):
        Ontology.build(["ICD10CM/A00.0"], athena_dir=write_athena(tmp_path / "athena"),
                       codes_metadata=metadata)
    assert caplog.text == ""


# --------------------------------------------------------------------------- MEDS rows


def test_duplicated_rows_are_counted_and_said_to_count_twice(meds_dir: Path) -> None:
    rows = subject_rows(1) + subject_rows(2)
    rows.insert(4, dict(rows[3]))  # subject 1's lab, twice
    rows.insert(2, dict(rows[2]))  # subject 1's diagnosis, twice
    write_table(meds_dir / TRAIN, rows_table(rows))
    warning = only_warning(meds_dir)
    assert warning.startswith(f"{TRAIN}: row 3 (subject 1): 2 duplicate row(s) of 1 subject(s) "
                              "repeat an earlier row in every column")
    assert "does not de-duplicate them" in warning and "counts twice" in warning


def test_events_after_death_give_count_and_largest_gap(meds_dir: Path) -> None:
    train = subject_rows(1) + subject_rows(2)
    # Subject 1 dies at its diagnosis: its lab at that time is not after death, its note is.
    train.insert(3, {"subject_id": 1, "time": datetime(2010, 3, 1, 9), "code": "MEDS_DEATH"})
    write_table(meds_dir / TRAIN, rows_table(train))
    assert only_warning(meds_dir) == (
        f"{TRAIN}: column 'time', row 5 (subject 1): 1 event(s) of 1 subject(s) are dated after "
        "their MEDS_DEATH event, up to 487 day(s) after death; prepare keeps them as ordinary "
        "events; expected no events after MEDS_DEATH")


def test_events_after_death_are_summed_over_files(meds_dir: Path) -> None:
    death = {"time": datetime(2010, 3, 1), "code": "MEDS_DEATH"}
    train = subject_rows(1) + subject_rows(2)
    train.insert(2, {"subject_id": 1, **death})
    held_out = subject_rows(3)
    held_out.insert(2, {"subject_id": 3, **death})
    write_table(meds_dir / TRAIN, rows_table(train))
    write_table(meds_dir / HELD_OUT, rows_table(held_out))
    warning = only_warning(meds_dir)
    assert "6 event(s) of 2 subject(s) are dated after their MEDS_DEATH event, up to 488 " \
           "day(s) after death; prepare keeps them as ordinary events (in 2 files" in warning
    # Files are checked in path order: held_out/ before train/.
    assert warning.startswith(f"{HELD_OUT}: column 'time', row 3 (subject 3): ")


def test_several_birth_times_say_the_earliest_is_used(meds_dir: Path) -> None:
    train = subject_rows(1) + subject_rows(2)
    train.insert(2, {"subject_id": 1, "time": datetime(1960, 5, 1), "code": "MEDS_BIRTH"})
    write_table(meds_dir / TRAIN, rows_table(train))
    warning = only_warning(meds_dir)
    assert warning == (
        f"{TRAIN}: column 'time', row 1 (subject 1): 1 subject(s) have MEDS_BIRTH rows with "
        "different times (2 rows; here 1951-01-01 and 1960-05-01); prepare takes the earliest "
        "as the birth, the later ones are ordinary events; expected one MEDS_BIRTH time per "
        "subject")


def test_implausible_years_give_count_and_range(meds_dir: Path) -> None:
    train = subject_rows(1) + subject_rows(2)
    train[9]["time"] = datetime(9999, 1, 1)  # subject 2's note
    held_out = subject_rows(3)
    held_out[1]["time"] = datetime(1700, 1, 1)  # subject 3's birth
    write_table(meds_dir / TRAIN, rows_table(train))
    write_table(meds_dir / HELD_OUT, rows_table(held_out))
    warning = only_warning(meds_dir)
    assert warning == (
        f"{HELD_OUT}: column 'time', row 1 (subject 3): 2 event(s) of 2 subject(s) have "
        "implausible years (from 1700 to 9999); prepare uses them as given (in 2 files; the "
        f"first here); expected years 1800 to {latest_year()}")


def test_year_one_is_implausible(meds_dir: Path) -> None:
    rows = subject_rows(1) + subject_rows(2)
    rows[1]["time"] = datetime(1, 1, 1)
    write_table(meds_dir / TRAIN, rows_table(rows))
    assert "1 event(s) of 1 subject(s) have implausible years (from 1 to 1)" in (
        only_warning(meds_dir))


def test_float16_numeric_values_are_said_to_be_widened(meds_dir: Path) -> None:
    def to_float16(table: pa.Table) -> pa.Table:
        values = table.column("numeric_value").to_numpy(zero_copy_only=False)
        return replace_column(table, "numeric_value",
                              pa.array(values.astype("float16"), from_pandas=True))

    rewrite(meds_dir, TRAIN, to_float16)
    warning = only_warning(meds_dir)
    assert warning.startswith(f"{TRAIN}: column 'numeric_value', row 3 (subject 1): "
                              "numeric_value is float16 (2 value(s)); read widened to float32")
    assert warning.endswith("expected float32")


def test_prepare_logs_each_oddity_once_for_all_files(
        meds_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    for rel, subjects in ((TRAIN, (1, 2)), (HELD_OUT, (3,))):
        rows = [row for sid in subjects for row in subject_rows(sid)]
        rows.insert(2, dict(rows[2]))
        write_table(meds_dir / rel, rows_table(rows))
    with caplog.at_level(logging.WARNING, logger="ehrmotor.meds.validate"):
        require_valid(meds_dir)
    assert caplog.text.count("duplicate row(s)") == 1
    assert "2 duplicate row(s) of 2 subject(s)" in caplog.text


# --------------------------------------------------------------------------- code hierarchy


def test_parent_cycle_in_codes_metadata_is_named_by_validate_and_the_ontology(
        meds_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    parents = {"GENDER//F": [], "MEDS_BIRTH": [], "ICD10CM//E11.9": ["ICD10CM//E11"],
               "ICD10CM//E11": ["ICD10CM//E1"], "ICD10CM//E1": ["ICD10CM//E11"],
               "LOINC//2345-7": [], "NOTE//discharge": []}
    metadata = codes_metadata(parents)
    metadata.write_parquet(meds_dir / "metadata/codes.parquet")
    warning = only_warning(meds_dir)
    assert warning == (
        "metadata/codes.parquet: column 'parent_codes': 2 code(s) lie on parent cycles, e.g. "
        "'ICD10CM//E1' has parent 'ICD10CM//E11', which has 'ICD10CM//E1' as an ancestor; the "
        "ontology keeps the cycle, so each code on it counts the others as ancestors; expected "
        "parent_codes without cycles")
    with caplog.at_level(logging.WARNING, logger="ehrmotor.vocabulary.ontology"):
        ontology = Ontology.build(CODES, codes_metadata=metadata)
    assert "ontology: 2 code(s) lie on parent cycles, e.g. 'ICD10CM//E1' has parent " \
           "'ICD10CM//E11'" in caplog.text
    assert "(from metadata/codes.parquet parent_codes)" in caplog.text
    assert ancestors_of(ontology, "ICD10CM//E11.9") == ["ICD10CM//E11", "ICD10CM//E1"]


def test_parent_cycle_in_athena_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from athena_builders import ANCESTORS

    # Concept 1 ("I") made a child of its grandchild 3 ("A00"): I -> A00 -> A00-A09 -> I.
    athena = write_athena(tmp_path / "athena", ancestors=[*ANCESTORS, (3, 1, 1)])
    with caplog.at_level(logging.WARNING, logger="ehrmotor.vocabulary.ontology"):
        Ontology.build(["ICD10CM/A00.0"], athena_dir=athena)
    assert "ontology: 3 code(s) lie on parent cycles, e.g. 'ICD10CM/A00' has parent " \
           "'ICD10CM/A00-A09'" in caplog.text
    assert "(from Athena)" in caplog.text


def test_latin1_bytes_in_athena_concepts_name_the_file_and_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    athena = write_athena(tmp_path / "athena")
    path = athena / "CONCEPT.csv"
    text = path.read_bytes()
    text = text.replace(b"Typhoid fever\t", b"Typho\xefd fever\t")  # line 6, in the name
    text = text.replace(b"\t002.0\t", b"\t002.\xe90\t")  # line 12, in the code
    path.write_bytes(text)
    with caplog.at_level(logging.WARNING, logger="ehrmotor.vocabulary.athena"):
        Ontology.build(["ICD10CM/A00.0"], athena_dir=athena)
    assert f"{path}: line 6: 2 line(s) are not valid UTF-8 (Latin-1?)" in caplog.text
    assert "1 of them in the code" in caplog.text


def test_flat_ontology_says_codes_fall_back_to_flat(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ehrmotor.vocabulary.ontology"):
        ontology = Ontology.build(CODES, codes_metadata=codes_metadata({c: [] for c in CODES}))
    assert ontology.parents.height == 0
    assert caplog.messages == [
        "no code hierarchy: no Athena folder was given and codes.parquet gives no parent of any "
        "data code; MOTOR's hierarchical tokenizer and tasks fall back to flat codes (give "
        "--athena, or parent_codes in metadata/codes.parquet)"]


# --------------------------------------------------------------------------- long values


def test_cut_keeps_short_values_and_shortens_long_ones() -> None:
    assert cut("ICD10CM/E11.9") == "ICD10CM/E11.9"
    assert cut("x" * 81) == "x" * 80 + "… (81 chars)"


def test_a_ten_megabyte_code_is_cut_in_every_message(meds_dir: Path) -> None:
    huge = "X" * 10_000_000
    rows = subject_rows(1) + subject_rows(2)
    rows[2]["code"] = huge + "\n"
    rows[7]["code"] = huge
    write_table(meds_dir / TRAIN, rows_table(rows))
    report = validate_dataset(meds_dir)
    lines = [str(f) for f in report.errors + report.warnings]
    assert len(lines) == 2
    assert all(len(line) < 400 for line in lines), [len(line) for line in lines]
    assert all("… (10,000,00" in line for line in lines)


# --------------------------------------------------------------------------- prepare


@pytest.mark.slow
def test_no_validation_data_is_said_by_prepare_and_pretrain(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from synthetic_data import PREPARE_CONFIG, pretrain_tiny, synthetic_meds

    from ehrmotor.prepare import prepare
    from ehrmotor.prepare.split import read_split

    meds = synthetic_meds(tmp_path / "meds", subjects=60)
    config = dataclasses.replace(PREPARE_CONFIG, val_fraction=0.0)
    with caplog.at_level(logging.WARNING):
        prepare(meds, tmp_path / "work", athena_dir=meds / "athena", workers=1, progress=False,
                config=config)
    subjects = read_split(tmp_path / "work/pretraining_files/split.csv").height
    assert caplog.text.count("no validation data") == 1
    assert f"no validation data: the val split has 0 of the {subjects} subject(s)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ehrmotor.pretrain.run"):
        pretrain_tiny(tmp_path / "work", 1)
    assert "pretrain: no validation data (val_batches is empty): training without evaluation " \
           "or early stopping" in caplog.text


def test_cli_validate_prints_oddities_as_warnings_and_exits_0(
        meds_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = subject_rows(1) + subject_rows(2)
    rows.insert(2, dict(rows[2]))
    write_table(meds_dir / TRAIN, rows_table(rows))
    assert main(["validate", str(meds_dir)]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: ") == 1 and "1 duplicate row(s) of 1 subject(s)" in err
