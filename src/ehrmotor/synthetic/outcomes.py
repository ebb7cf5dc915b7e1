"""The planted outcomes as `evaluate` takes them: each name's codes, and the true hazards.

The CLI, the demo and the tests hand these to `ehrmotor.evaluate`, which knows nothing of the
generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ehrmotor.errors import InputError
from ehrmotor.synthetic.catalog import DISEASE_CATEGORIES
from ehrmotor.synthetic.generate import true_hazards
from ehrmotor.synthetic.hazards import OUTCOMES

DEFAULT_OUTCOMES = ("heart_failure", "ckd", "diabetes", "copd", "death")


def outcome_codes(names: Sequence[str]) -> dict[str, list[str]]:
    """name → codes: a planted outcome's code (`death`, `heart_failure`, ...), else the name
    taken as a code itself (`ICD10CM/I50`, `MEDS_DEATH`, `HOSPITAL_ADMISSION//ICU`).

    Raises InputError for an empty name; a code absent from the data is refused where the data
    is read (`ehrmotor.evaluate.landmarks`).
    """
    codes: dict[str, list[str]] = {}
    for name in names:
        if not name.strip():
            raise InputError(f"outcome {name!r}: expected one of {', '.join(sorted(OUTCOMES))}, "
                             "or a code such as ICD10CM/I50 or MEDS_DEATH")
        if name == "death":
            codes[name] = ["MEDS_DEATH"]
        elif name in OUTCOMES:
            codes[name] = [f"ICD10CM/{DISEASE_CATEGORIES[name]}"]
        else:
            codes[name] = [name]
    return codes


def written_by_synth(meds_dir: Path) -> bool:
    """Whether `ehrmotor synth` wrote `meds_dir` (its metadata/synthetic.json is there)."""
    return (Path(meds_dir) / "metadata" / "synthetic.json").is_file()


def synthetic_oracle(
        meds_dir: Path) -> Callable[[str, np.ndarray, np.ndarray], np.ndarray | None] | None:
    """The generator's true hazard of each planted outcome, or None when `meds_dir` was not
    written by `ehrmotor synth` (no metadata/synthetic.json)."""
    if not written_by_synth(meds_dir):
        return None

    def oracle(outcome: str, subject_ids: np.ndarray, times: np.ndarray) -> np.ndarray | None:
        return true_hazards(meds_dir, subject_ids, times, outcome) if outcome in OUTCOMES else None
    return oracle
