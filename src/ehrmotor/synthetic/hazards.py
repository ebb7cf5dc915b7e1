"""The hazard model of the synthetic EHR: who is simulated and how likely each outcome is.

The simulation calendar (months of MONTH_DAYS from FIRST_MONTH up to CUTOFF), each subject's fixed
traits (`Subjects`: birth day, record start, sex, race, the latent risks, visit rate, smoking),
its disease, treatment and lab state (`State`, updated by `simulate`), and from both the monthly
hazard of every outcome (`monthly_hazards`, its age slopes scaled by `age_effect`). These are
the hazards `generate.true_hazards` reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ehrmotor.synthetic.catalog import DISEASE_CATEGORIES

MONTH_DAYS = 30.4375
EPOCH = np.datetime64("1970-01-01", "D")
FIRST_MONTH = np.datetime64("1995-01-01", "D")
CUTOFF = np.datetime64("2026-01-01", "D")
NUM_MONTHS = int((CUTOFF - FIRST_MONTH).astype(int) / MONTH_DAYS)
OUTCOMES = (*DISEASE_CATEGORIES, "death")


def epoch_days(date: np.datetime64) -> float:
    """Days from 1970-01-01 to `date`."""
    return float((date - EPOCH).astype(int))


def decay(now: float, last: np.ndarray, months: float) -> np.ndarray:
    """exp(-(now - last) / months), 0 where there was no previous event (last is nan)."""
    return np.nan_to_num(np.exp(-(now - last) / months), nan=0.0)


@dataclass
class Subjects:
    """Fixed per-subject traits of one shard (arrays of length n)."""

    birth_day: np.ndarray  # days since 1970
    start_month: np.ndarray  # first observed month index (float)
    sex: np.ndarray  # 0 female, 1 male
    race: np.ndarray
    latent: np.ndarray  # (n, 3)
    visit_rate: np.ndarray  # personal multiplier, lognormal
    smoking: np.ndarray  # 0 never, 1 former, 2 current

    @classmethod
    def draw(cls, n: int, rng: np.random.Generator) -> Subjects:
        cutoff = epoch_days(CUTOFF)
        age_at_cutoff = rng.uniform(1.0, 95.0, n) * 365.25
        birth_day = np.floor(cutoff - age_at_cutoff)
        record_years = np.clip(rng.lognormal(np.log(7.0), 0.7, n), 0.5, 31.0)
        start_day = np.maximum(cutoff - record_years * 365.25, birth_day)
        start_month = np.maximum((start_day - epoch_days(FIRST_MONTH)) / MONTH_DAYS, 0.0)
        latent = rng.standard_normal((n, 3))
        p_current = 1 / (1 + np.exp(-(-1.6 + 1.2 * latent[:, 1])))
        smoking = np.where(rng.random(n) < p_current, 2, rng.choice([0, 0, 1], n))
        return cls(
            birth_day=birth_day, start_month=start_month, sex=rng.integers(0, 2, n),
            race=rng.choice(5, n, p=[0.6, 0.15, 0.12, 0.08, 0.05]), latent=latent,
            visit_rate=rng.lognormal(0.0, 0.6, n), smoking=smoking,
        )


class State:
    """Disease, treatment and lab state of every subject; nan times mean 'never'."""

    def __init__(self, n: int) -> None:
        nan = np.full(n, np.nan)
        self.onset = {k: nan.copy() for k in OUTCOMES}  # month of coded diagnosis / event
        self.last = {k: nan.copy() for k in ("mi", "pneumonia", "sepsis", "stroke", "afib")}
        self.subclinical = {"diabetes": nan.copy(), "ckd": nan.copy()}
        self.treated = {k: np.zeros(n, bool) for k in
                        ("metformin", "lisinopril", "atorvastatin", "metoprolol", "apixaban",
                         "tiotropium", "chemo")}
        self.order_flag = np.zeros(n, bool)
        self.alive = np.ones(n, bool)

    def has(self, disease: str) -> np.ndarray:
        return ~np.isnan(self.onset[disease])


def monthly_hazards(month: float, age: np.ndarray, subjects: Subjects, state: State,
                    idx: np.ndarray, age_effect: float = 1.0) -> dict[str, np.ndarray]:
    """Monthly hazards of every outcome for the subjects `idx` (arrays aligned with idx).

    `age_effect` multiplies every outcome's log-hazard slope in age (1: the default dataset; 3:
    age dominates every outcome's risk, the latent traits and history matter less)."""
    a = age_effect * (age - 60.0) / 10.0
    z0, z1, z2 = (subjects.latent[idx, k] for k in range(3))
    smoker = subjects.smoking[idx]
    has = {k: state.has(k)[idx].astype(float) for k in OUTCOMES}
    treated = {k: v[idx] for k, v in state.treated.items()}
    recent_mi = decay(month, state.last["mi"][idx], 6.0)
    recent_pneu = decay(month, state.last["pneumonia"][idx], 2.0)
    recent_sepsis = decay(month, state.last["sepsis"][idx], 1.0)
    h = {
        "diabetes": 0.0009 * np.exp(0.3 * a + 0.9 * z0),
        "hypertension": 0.0015 * np.exp(0.45 * a + 0.6 * z0),
        "ckd": 0.0003
        * np.exp(0.4 * a + 0.6 * z0 + 1.2 * has["diabetes"] + 0.7 * has["hypertension"])
        * np.where(treated["lisinopril"], 0.5, 1.0) * np.where(treated["metformin"], 0.7, 1.0),
        "afib": 0.0004 * np.exp(0.6 * a + 0.5 * z2),
        "mi": 0.0003 * np.exp(0.5 * a + 0.8 * z0 + 0.6 * has["diabetes"] + 0.5 * has["hypertension"]
                              + 0.5 * (smoker == 2)) * np.where(treated["atorvastatin"], 0.6, 1.0),
        "heart_failure": 0.0002 * np.exp(0.5 * a + 0.5 * z0 + 0.6 * has["hypertension"]
                                         + 0.8 * has["ckd"])
        * (1.0 + 30.0 * recent_mi) * np.where(state.order_flag[idx], 5.0, 1.0)
        * np.where(treated["metoprolol"], 0.6, 1.0),
        "copd": 0.00025 * np.exp(0.4 * a + 1.3 * z1 + 1.0 * (smoker == 2) + 0.5 * (smoker == 1)),
        "pneumonia": 0.0006 * np.exp(0.3 * a + 0.5 * z1 + 0.4 * z2 + 1.0 * has["copd"])
        * np.where(treated["tiotropium"], 0.7, 1.0),
        "lung_cancer": 0.00006 * np.exp(0.5 * a + 1.5 * z1 + 1.2 * (smoker == 2)),
        "stroke": 0.0002 * np.exp(0.5 * a + 0.5 * z0)
        * (1.0 + 2.0 * has["afib"] * ~treated["apixaban"]),
        "sepsis": 0.0001 * np.exp(0.4 * a + 0.6 * z2) * (1.0 + 10.0 * recent_pneu),
    }
    h["death"] = (
        0.0004 * np.exp(0.75 * a + 0.5 * z2 + 0.7 * has["heart_failure"] + 0.5 * has["ckd"]
                        + 1.5 * has["lung_cancer"] * ~treated["chemo"] + 0.8 * treated["chemo"]
                        + 0.4 * has["copd"] + 0.3 * has["diabetes"])
        * (1.0 + 6.0 * recent_mi + 10.0 * recent_sepsis + 3.0 * recent_pneu)
    )
    return {k: np.minimum(v, 0.9) for k, v in h.items()}
