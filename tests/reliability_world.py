"""Shared read-only inputs of test_reliability*.py (`make_world`) and the helpers that run a
command and read what it said or wrote."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
from meds_builders import write_meds

from ehrmotor.cli import main

LOG_LINE = re.compile(r"(DEBUG|INFO|WARNING|ERROR) ")


# --------------------------------------------------------------------------- shared inputs


@dataclass(frozen=True)
class World:
    """Read-only inputs shared by the rows; each row copies what it changes into `root`."""

    meds: Path  # synthetic MEDS (300 subjects) with athena/
    bundle: Path  # tiny model bundle trained on it
    prepared: Path  # its work folder's pretraining_files/
    labels: Path  # a valid label parquet for `meds`
    tiny_meds: Path  # the three-subject dataset of meds_builders


def make_world(tiny_bundle: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
               ) -> World:
    """The shared inputs, from conftest `tiny_bundle`'s data and bundle."""
    meds, bundle = tiny_bundle
    root = tmp_path_factory.mktemp("reliability")
    events = pl.concat([pl.read_parquet(p) for p in sorted((meds / "data").rglob("*.parquet"))])
    last = (events.filter(pl.col("time").is_not_null()).group_by("subject_id")
            .agg(prediction_time=pl.col("time").max(), birth=pl.col("time").min())
            .filter(pl.col("prediction_time") > pl.col("birth") + pl.duration(days=2))
            .drop("birth").sort("subject_id").head(40)
            .with_columns(boolean_value=pl.col("subject_id") % 2 == 0))
    labels = root / "labels.parquet"
    last.write_parquet(labels)
    return World(meds, bundle, bundle.parent / "pretraining_files", labels,
                 write_meds(root / "tiny_meds"))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Relative path → (size, mtime in ns) of every file under `folder`; (-1, 0) for folders."""
    if not folder.exists():
        return {}
    found = {}
    for path in folder.rglob("*"):
        info = path.lstat()
        found[path.relative_to(folder).as_posix()] = (
            (-1, 0) if path.is_dir() else (info.st_size, info.st_mtime_ns))
    return found


def error_lines(err: str) -> list[str]:
    """stderr without log records and progress bars."""
    return [line for line in err.strip().splitlines()
            if line.strip() and not LOG_LINE.match(line) and "\r" not in line]


def run_main(argv: list[str]) -> int:
    """`ehrmotor ARGV` in this process; argparse's usage errors exit through SystemExit."""
    try:
        return main(argv)
    except SystemExit as exited:
        return int(exited.code or 0)



def run_cli(argv: list[str], env: dict[str, str] | None = None,
            preexec: Callable[[], None] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ehrmotor", *argv], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, preexec_fn=preexec,
                          timeout=timeout)

