"""Tests for ehrmotor.meds.shard_checks: code and birth checks, and how prepare reports them."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from meds_builders import (
    HELD_OUT,
    TRAIN,
    rewrite,
    rows_table,
    set_value,
    subject_rows,
    write_table,
)

from ehrmotor.meds import (
    MedsError,
    require_valid,
    scan_shard,
    validate_dataset,
)

# --------------------------------------------------------------------------- codes and birth


@pytest.mark.parametrize(
    ("code", "says"),
    [
        ("", "empty code"),
        ("ICD10CM//E11\n.9", r"code 'ICD10CM//E11\n.9' holds a control character"),
        ("LOINC//2345-7\t", r"code 'LOINC//2345-7\t' holds a control character"),
        ("NOTE//x\x7f", r"code 'NOTE//x\x7f' holds a control character"),
        ("\x00", r"code '\x00' holds a control character"),
    ],
    ids=["empty", "newline", "tab", "del", "nul"],
)
def test_empty_and_control_character_codes_are_errors(
    meds_dir: Path, code: str, says: str
) -> None:
    # Rows 7 and 8 of train/0.parquet are subject 2's lab and note.
    rewrite(meds_dir, TRAIN, lambda t: set_value(set_value(t, "code", 7, code), "code", 8, code))
    report = validate_dataset(meds_dir, check_codes=False)
    assert [(e.file, e.column, e.row, e.subject_id) for e in report.errors] == [
        (TRAIN, "code", 7, 2)
    ]
    text = str(report.errors[0])
    assert text == (
        f"{TRAIN}: column 'code', row 7 (subject 2): {says} (2 row(s) of this file); expected "
        "a non-empty code without control characters (newline, tab, < 0x20 or 0x7f)"
    )
    with pytest.raises(MedsError, match="row 7"):
        require_valid(meds_dir)


def test_prepare_refuses_a_control_character_code(meds_dir: Path, tmp_path: Path) -> None:
    from ehrmotor.prepare import PrepareError, prepare

    rewrite(meds_dir, HELD_OUT, lambda t: set_value(t, "code", 2, "ICD10CM//E11\r"))
    with pytest.raises(PrepareError) as raised:
        prepare(meds_dir, tmp_path / "work", workers=1, progress=False)
    assert str(raised.value) == (
        f"{HELD_OUT}: column 'code', row 2 (subject 3): code 'ICD10CM//E11\\r' holds a control "
        "character (1 row(s) of this file); expected a non-empty code without control "
        "characters (newline, tab, < 0x20 or 0x7f)"
    )


def _born_late(subject_id: int, birth: datetime) -> list[dict[str, object]]:
    """Subject rows with MEDS_BIRTH moved to `birth`, re-sorted by time (static row first)."""
    rows = subject_rows(subject_id)
    rows[1]["time"] = birth
    return [rows[0], *sorted(rows[1:], key=lambda r: r["time"])]


def test_events_before_meds_birth_are_a_warning_with_count_and_example(meds_dir: Path) -> None:
    # Subject 1 is born at the time of its diagnosis (not earlier: no count); subject 2 after
    # its diagnosis and lab, before its note.
    rows = _born_late(1, datetime(2010, 3, 1, 9)) + _born_late(2, datetime(2011, 1, 1))
    assert [r["code"] for r in rows[5:]] == [
        "GENDER//F", "ICD10CM//E11.9", "LOINC//2345-7", "MEDS_BIRTH", "NOTE//discharge"
    ]
    write_table(meds_dir / TRAIN, rows_table(rows))
    report = validate_dataset(meds_dir)
    assert report.ok, report.errors
    assert [str(w) for w in report.warnings] == [
        f"{TRAIN}: column 'time', row 6 (subject 2): 1 subject(s) have 2 timed event(s) before "
        "their MEDS_BIRTH event (prepare folds them into the birth position); expected "
        "MEDS_BIRTH no later than a subject's first timed event"
    ]


def test_prepare_counts_the_events_it_folds_into_the_birth_position(meds_dir: Path) -> None:
    from ehrmotor.prepare import PrepareSummary
    from ehrmotor.sequences.positions import count_before_birth

    rows = _born_late(1, datetime(2010, 3, 1, 9)) + _born_late(2, datetime(2011, 1, 1))
    # Subject 4 has no MEDS_BIRTH: its first event is its birth, nothing is early.
    rows += [r for r in subject_rows(4) if r["code"] != "MEDS_BIRTH"]
    write_table(meds_dir / TRAIN, rows_table(rows))
    events = scan_shard(meds_dir / TRAIN).collect()
    assert count_before_birth(events) == (1, 2)
    assert count_before_birth(scan_shard(meds_dir / HELD_OUT).collect()) == (0, 0)
    summary = PrepareSummary(subjects_born_late=1, events_before_birth=2)
    assert "events before MEDS_BIRTH 2 of 1 subject(s), folded into the birth position" in (
        summary.lines()
    )

