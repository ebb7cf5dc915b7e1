"""Session fixtures of the synthetic EHR tests (test_synthetic*.py), loaded as a plugin by
conftest.py so that each dataset is generated once per session:
- `main_dir`: 3,000 subjects in 3 shards, used by most tests;
- `power_dir`: 8,000 subjects in 4 shards, for the planted effects that need statistical power;
- `small_w1` / `small_w2`: 300 subjects in 2 shards with 1 and 2 workers (determinism, meds_reader);
- `cli_seed1`: the same 300 subjects with seed 1, written through the `ehrmotor synth` command.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from ehrmotor.meds import data_files
from ehrmotor.synthetic import generate

MAIN_SUBJECTS = 3_000
POWER_SUBJECTS = 8_000
SMALL_SUBJECTS = 300
ATHENA_HEADERS = {
    "CONCEPT.csv": [
        "concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_class_id",
        "standard_concept", "concept_code", "valid_start_date", "valid_end_date", "invalid_reason",
    ],
    "CONCEPT_RELATIONSHIP.csv": [
        "concept_id_1", "concept_id_2", "relationship_id", "valid_start_date", "valid_end_date",
        "invalid_reason",
    ],
    "CONCEPT_ANCESTOR.csv": [
        "ancestor_concept_id", "descendant_concept_id", "min_levels_of_separation",
        "max_levels_of_separation",
    ],
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def main_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "main"
    return generate(out, MAIN_SUBJECTS, seed=0, num_shards=3, progress=False)


@pytest.fixture(scope="session")
def power_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "power"
    return generate(out, POWER_SUBJECTS, seed=0, num_shards=4, progress=False)


@pytest.fixture(scope="session")
def small_w1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "small_w1"
    return generate(out, SMALL_SUBJECTS, seed=0, num_shards=2, workers=1, progress=False)


@pytest.fixture(scope="session")
def small_w2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "small_w2"
    return generate(out, SMALL_SUBJECTS, seed=0, num_shards=2, workers=2, progress=False)


@pytest.fixture(scope="session")
def cli_seed1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 300-subject dataset with seed 1, written by `python -m ehrmotor synth`."""
    out = tmp_path_factory.mktemp("synth") / "cli_seed1"
    command = [sys.executable, "-m", "ehrmotor", "synth", "--subjects", str(SMALL_SUBJECTS),
               "--seed", "1", "--out", str(out), "--shards", "2", "--workers", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"ehrmotor synth failed:\n{result.stderr}"
    return out


def _read_events(meds_dir: Path) -> pl.DataFrame:
    """All data rows, with the file they come from, its split folder and the row in the file."""
    frames = []
    for path in data_files(meds_dir):
        frames.append(
            pl.read_parquet(path).with_row_index("row").with_columns(
                file=pl.lit(path.relative_to(meds_dir).as_posix()),
                folder=pl.lit(path.parent.name),
            )
        )
    return pl.concat(frames)


@pytest.fixture(scope="session")
def main_events(main_dir: Path) -> pl.DataFrame:
    return _read_events(main_dir)


@pytest.fixture(scope="session")
def power_events(power_dir: Path) -> pl.DataFrame:
    """Timed rows of the power dataset (static rows dropped)."""
    return _read_events(power_dir).filter(pl.col("time").is_not_null())


@pytest.fixture(scope="session")
def athena(main_dir: Path) -> dict[str, pl.DataFrame]:
    """The three Athena files read as all-string columns with quoting disabled."""
    return {
        name: pl.read_csv(main_dir / "athena" / name, separator="\t", quote_char=None,
                          infer_schema=False)
        for name in ATHENA_HEADERS
    }


@pytest.fixture(scope="session")
def concepts(athena: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """CONCEPT.csv with integer ids and the MEDS code string."""
    return athena["CONCEPT.csv"].with_columns(
        pl.col("concept_id").cast(pl.Int64),
        code=pl.col("vocabulary_id") + "/" + pl.col("concept_code"),
    )

