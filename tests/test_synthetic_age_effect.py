"""The strong-age generator setting (`age_effect`): every outcome's age slope scaled, recorded
in metadata/synthetic.json, and used by `true_hazards` when it re-simulates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from ehrmotor.synthetic import OUTCOMES, generate, true_hazards
from ehrmotor.synthetic.hazards import State, Subjects, monthly_hazards


def test_age_effect_scales_every_outcomes_log_hazard_slope_in_age() -> None:
    n = 50
    subjects = Subjects.draw(n, np.random.default_rng(0))
    state, everyone = State(n), np.arange(n)

    def log_ratio(age_effect: float) -> dict[str, np.ndarray]:
        old, young = (monthly_hazards(100.0, np.full(n, age), subjects, state, everyone,
                                      age_effect) for age in (75.0, 45.0))
        return {name: np.log(old[name] / young[name]) for name in OUTCOMES}

    default, strong = log_ratio(1.0), log_ratio(3.0)
    for name in OUTCOMES:
        assert np.all(default[name] > 0), name
        np.testing.assert_allclose(strong[name], 3 * default[name], rtol=1e-9, err_msg=name)


def test_age_effect_is_recorded_and_used_by_the_true_hazards(tmp_path: Path) -> None:
    meds = generate(tmp_path / "meds", 30, seed=2, progress=False, age_effect=3.0)
    params_file = meds / "metadata" / "synthetic.json"
    params = json.loads(params_file.read_text())
    assert params["age_effect"] == 3.0
    visits = (pl.read_parquet(meds / "data" / "*" / "*.parquet")
              .filter(pl.col("code").str.starts_with("Visit/")).unique("subject_id").head(5))
    ids, times = visits["subject_id"].to_numpy(), visits["time"].to_numpy()
    strong = true_hazards(meds, ids, times, "diabetes")
    del params["age_effect"]  # a dataset written before the option: age effect 1
    params_file.write_text(json.dumps(params))
    default = true_hazards(meds, ids, times, "diabetes")
    assert np.isfinite(strong).all() and np.isfinite(default).all()
    assert not np.allclose(strong, default)
