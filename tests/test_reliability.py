"""Reliability: every bad input, bad setting and resource fault ends in one line, exit 2, and
nothing is deleted, replaced or half-written.

The table `CASES` holds (input mutation, command, expected exit status, expected message fragment)
rows. Each row runs in a folder of its own; the runner snapshots that folder before the command
and checks afterwards that it is unchanged (or, for the rows that may write, that only complete
artifacts appeared). The existing bad-MEDS cases of `broken_meds.BROKEN` run through `validate`
and `prepare` as rows too. The table lives in reliability_cases.py; resource faults and races in
test_reliability_faults.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from reliability_cases import (
    CASES,
    LOCK_HOLDERS,
    Case,
    _changed_tiny,
    existing_folder,
)
from reliability_world import World, error_lines, make_world, run_cli, run_main, snapshot

from ehrmotor.cli import main


@pytest.fixture(scope="session")
def world(tiny_bundle: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> World:
    return make_world(tiny_bundle, tmp_path_factory)


@pytest.fixture(autouse=True)
def _stop_lock_holders() -> Iterator[None]:
    yield
    while LOCK_HOLDERS:
        holder = LOCK_HOLDERS.pop()
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_line_exit_2_and_nothing_is_written(
        case: Case, world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "case"
    root.mkdir()
    argv = case.setup(world, root)
    before = snapshot(root)
    capsys.readouterr()
    status = run_main(argv)
    err = capsys.readouterr().err
    assert status == case.status, err[-3000:]
    assert "Traceback" not in err
    lines = error_lines(err)
    if case.command == "validate":  # a report: one line per finding, each one line
        lines = [line for line in lines if line.startswith("error: ")]
        assert any(case.fragment in line for line in lines), lines
    else:
        if lines and lines[0].startswith("usage: "):  # argparse: the usage, then the error
            lines = [line for line in lines if line.startswith(f"ehrmotor {case.command}: ")]
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"ehrmotor {case.command}: error: "), lines
        assert case.fragment in lines[0], lines
    if not case.writes:
        assert snapshot(root) == before, "the command changed its folder"


def test_the_table_covers_every_command() -> None:
    commands = {case.command for case in CASES.values()}
    assert commands == {"validate", "prepare", "pretrain", "embed", "evaluate", "synth", "label"}
    assert len(CASES) >= 60


# --------------------------------------------------------------------------- warnings, not errors


def test_birth_after_events_is_warned_by_validate(world: World, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    def late_birth(meds: Path) -> None:
        path = meds / "data/train/0.parquet"
        table = pl.read_parquet(path)
        # subject 1's birth moves after its diagnosis and lab (2010) and note (2011)
        table = table.with_columns(time=pl.when((pl.col("subject_id") == 1)
                                                & (pl.col("code") == "MEDS_BIRTH"))
                                   .then(pl.datetime(2012, 1, 1)).otherwise(pl.col("time")))
        table.sort("subject_id", "time", nulls_last=False).write_parquet(path)
    meds = _changed_tiny(world, tmp_path, late_birth)
    assert main(["validate", str(meds)]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "MEDS_BIRTH" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: "), err
    assert "1 subject" in warnings[0] and "1" in warnings[0]


# --------------------------------------------------------------------------- --debug


@pytest.mark.slow
def test_debug_shows_the_traceback_of_a_one_line_error(world: World, tmp_path: Path) -> None:
    existing_folder(tmp_path)
    argv = ["embed", "--model", str(world.bundle), "--meds", str(world.meds), "--labels",
            str(world.labels), "--out", str(tmp_path / "results")]
    for extra, env in (([], {"EHRMOTOR_DEBUG": "1"}), (["--debug"], {})):
        result = run_cli([*argv, *extra], env=env)
        assert result.returncode == 1 and "Traceback" in result.stderr, result.stderr[-2000:]
        assert "OutputError" in result.stderr
    assert (tmp_path / "results" / "inner" / "precious.txt").read_text() == "do not delete\n"


def test_an_internal_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    from ehrmotor.meds import validate as validate_module

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("an internal invariant failed")
    monkeypatch.setattr(validate_module, "validate_dataset", broken)
    monkeypatch.setattr("ehrmotor.meds.validate_dataset", broken)
    with pytest.raises(ValueError, match="internal invariant"):
        main(["validate", str(tmp_path)])
