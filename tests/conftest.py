"""Fixtures shared by several test modules (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest
from features_fixtures import train_bundle


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(MEDS directory, model bundle) of a tiny model trained two steps on 300 subjects.

    The bundle's work folder (with `pretraining_files/`) is the bundle's parent.
    """
    return train_bundle(tmp_path_factory.mktemp("tiny_bundle"))
