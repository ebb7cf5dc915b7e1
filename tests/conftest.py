"""Fixtures shared by several test modules (built once per session; see `synthetic_data`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from meds_builders import write_meds
from synthetic_data import synthetic_meds as generate_meds
from synthetic_data import train_bundle

# Fixtures shared by test_synthetic*.py (session datasets, generated once) and test_pretrain*.py.
pytest_plugins = ["synthetic_fixtures", "pretrain_fixtures"]


@pytest.fixture(scope="session")
def synthetic_meds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic MEDS dataset (300 subjects, seed 0; Athena vocabulary in meds/athena).

    Shared by every module that reads it: copy it before changing anything in it.
    """
    return generate_meds(tmp_path_factory.mktemp("synthetic") / "meds")


@pytest.fixture(scope="session")
def tiny_bundle(synthetic_meds: Path,
                tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(MEDS directory, model bundle) of a tiny model trained two steps on `synthetic_meds`.

    The bundle's work folder (with `pretraining_files/`, prepared with
    `synthetic_data.PREPARE_CONFIG`, and `pretraining_output/checkpoint-2`) is the bundle's
    parent: copy it before changing it.
    """
    return synthetic_meds, train_bundle(synthetic_meds, tmp_path_factory.mktemp("tiny_bundle"))


@pytest.fixture
def meds_dir(tmp_path: Path) -> Path:
    """The valid three-subject MEDS 0.4 dataset of meds_builders (subjects 1, 2 in
    meds_builders.TRAIN; 3 in HELD_OUT), fresh for each test."""
    return write_meds(tmp_path / "meds")
