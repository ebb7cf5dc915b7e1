"""The generative model of the synthetic EHR: a monthly discrete-time simulation of one shard.

All subjects of a shard are simulated together, one month per step, with numpy over whole arrays;
nothing loops over subjects or events. What is planted (and what a model should learn):

- Latent risks `z` (cardiometabolic, respiratory, frailty), never emitted. They drive disease
  hazards, and surface only through rare sibling leaf codes under one ICD-10-CM block per latent
  (`SIGNATURE_BLOCKS`): each leaf is too rare for a count model; their parent block is not.
- Chronic modules (type 2 diabetes E11, hypertension I10, CKD N18, atrial fibrillation I48, heart
  failure I50, COPD J44, lung cancer C34) and acute ones (MI I21, pneumonia J18, stroke I63,
  sepsis A41), with hazards depending on age, latents, earlier diagnoses and treatment.
- Lab trajectories: diabetes and CKD start subclinically; HbA1c (and glucose) or creatinine drift
  upward for months and the diagnosis is coded at the first visit whose lab crosses the threshold.
- Recency: MI raises heart-failure and death hazards, pneumonia raises sepsis and death hazards,
  with effects that decay over a few months.
- Order: atrial fibrillation followed by MI within 12 months multiplies the heart-failure hazard;
  the reverse order does not.
- Treatments start at visits after diagnosis (metformin, lisinopril, statin, beta blocker,
  anticoagulant, inhalers, HemOnc chemotherapy regimens) and lower downstream hazards.
- Background: visits whose rate grows with age, illness and a heavy-tailed personal frailty, with
  routine diagnoses drawn Zipf-like from the whole ICD-10-CM tree (ICD-9-CM before October 2015),
  CPT4 and ICD-10-PCS procedures, lab panels with realistic values and units, smoking status as
  text. Events per subject range from tens to thousands.
- Death (`MEDS_DEATH`) depends on all of the above.

The monthly hazards can be probed at given (subject, month) pairs (`ShardSimulator.run`):
re-running a shard with the same seed reproduces it exactly, so the true monthly hazard of any
outcome is available to evaluation.

The pieces: `pools` holds the codes drawn from, `hazards` the calendar, the subjects' traits and
state and the monthly hazards; this module steps the months and emits the events.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ehrmotor.meds.read import US_PER_DAY
from ehrmotor.synthetic.catalog import SMOKING_VALUES
from ehrmotor.synthetic.hazards import (
    EPOCH,
    FIRST_MONTH,
    MONTH_DAYS,
    NUM_MONTHS,
    OUTCOMES,
    State,
    Subjects,
    decay,
    epoch_days,
    monthly_hazards,
)
from ehrmotor.synthetic.pools import CodePools, zipf_cdf

ICD9_UNTIL = np.datetime64("2015-10-01", "D")
TEXT_VALUES = SMOKING_VALUES


class Events:
    """Column buffers for emitted events: subject index, time (µs), code, value, text."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, ...]] = []

    def add(self, subject: np.ndarray, time_us: np.ndarray, code: np.ndarray | int,
            value: np.ndarray | None = None, text: np.ndarray | None = None) -> None:
        n = len(subject)
        if n == 0:
            return
        code = np.broadcast_to(np.asarray(code, dtype=np.int32), (n,))
        value = np.full(n, np.nan, np.float32) if value is None else value.astype(np.float32)
        text = np.full(n, -1, np.int8) if text is None else text.astype(np.int8)
        self.parts.append((subject.astype(np.int32), time_us.astype(np.int64), code, value, text))

    def columns(self) -> tuple[np.ndarray, ...]:
        return tuple(np.concatenate(col) for col in zip(*self.parts, strict=True))


STATIC_TIME = np.iinfo(np.int64).min  # marks a static row (null time)
CHRONIC = ("hypertension", "afib", "copd", "lung_cancer", "heart_failure")
ACUTE = ("mi", "pneumonia", "stroke", "sepsis")
# Which coded conditions start which treatment, and the treatment's RxNorm ingredient name.
TREATMENT_FOR = {
    "metformin": ("diabetes",), "lisinopril": ("hypertension", "ckd"),
    "atorvastatin": ("mi", "diabetes"), "metoprolol": ("mi", "heart_failure", "afib"),
    "apixaban": ("afib",), "tiotropium": ("copd",), "chemo": ("lung_cancer",),
}
BACKGROUND_DRUGS = ("acetaminophen", "ibuprofen", "omeprazole", "sertraline", "levothyroxine",
                    "aspirin", "amoxicillin", "albuterol", "amlodipine", "furosemide")
VISIT_TYPES = ("OP", "ER", "IP")
# Lowest reportable value per lab where the drawn distribution could reach zero or below.
LAB_FLOOR = {"13457-7": 20.0, "777-3": 10.0, "718-7": 4.0, "2951-2": 110.0, "2823-3": 2.0,
             "2345-7": 40.0, "6690-2": 0.5, "4548-4": 3.5, "2160-0": 0.2}


@dataclass
class Visits:
    """The visits of one month: subject index, type (0 OP, 1 ER, 2 IP), time (µs), reason code."""

    subject: np.ndarray
    kind: np.ndarray
    time_us: np.ndarray
    reason: np.ndarray  # code index coded at the visit, -1 for a routine visit


@dataclass
class ShardResult:
    """Unsorted event columns of one shard, plus probed hazards when asked for."""

    columns: tuple[np.ndarray, ...]  # subject index, time µs, code, numeric value, text index
    hazards: dict[str, np.ndarray] | None


class ShardSimulator:
    """Simulates the subjects of one shard month by month (see the module docstring)."""

    def __init__(self, n: int, seed: int, shard: int, pools: CodePools,
                 age_effect: float = 1.0) -> None:
        self.age_effect = age_effect  # `hazards.monthly_hazards`
        self.rng = np.random.default_rng([seed, shard])
        popularity = np.random.default_rng([seed, 1 << 30])  # code popularity is dataset-wide
        self.cdf_icd10 = zipf_cdf(len(pools.routine_icd10), popularity)
        self.cdf_icd9 = zipf_cdf(len(pools.routine_icd9), popularity)
        self.cdf_procedures = zipf_cdf(len(pools.procedures), popularity)
        self.pools = pools
        self.subjects = Subjects.draw(n, self.rng)
        self.state = State(n)
        self.events = Events()
        self.leaf = {d: self.rng.integers(0, len(p), n) for d, p in pools.disease.items()}

    def _draw(self, pool: np.ndarray, cdf: np.ndarray, count: int) -> np.ndarray:
        return pool[np.minimum(np.searchsorted(cdf, self.rng.random(count)), len(pool) - 1)]

    def _disease_code(self, disease: str, subject: np.ndarray) -> np.ndarray:
        return self.pools.disease[disease][self.leaf[disease][subject]]

    def run(self, probe_subject: np.ndarray | None = None,
            probe_month: np.ndarray | None = None) -> ShardResult:
        """Simulate all months; optionally record hazards at (subject, month) probe pairs."""
        subjects, pools = self.subjects, self.pools
        n = len(subjects.birth_day)
        everyone = np.arange(n)
        static = np.full(n, STATIC_TIME)
        self.events.add(everyone, static, pools.gender[subjects.sex])
        self.events.add(everyone, static, pools.race[subjects.race])
        self.events.add(everyone, subjects.birth_day.astype(np.int64) * US_PER_DAY, pools.birth)
        first_month = np.ceil(subjects.start_month)
        probed = None
        if probe_subject is not None and probe_month is not None:
            probed = {k: np.full(len(probe_subject), np.nan) for k in OUTCOMES}
        for month in range(int(first_month.min()), NUM_MONTHS):
            active = np.flatnonzero(self.state.alive & (first_month <= month))
            if len(active) == 0:
                continue
            month_day = epoch_days(FIRST_MONTH) + month * MONTH_DAYS
            age = (month_day - subjects.birth_day[active]) / 365.25
            hazards = monthly_hazards(float(month), age, subjects, self.state, active,
                                      self.age_effect)
            if probed is not None and probe_subject is not None and probe_month is not None:
                rows = np.flatnonzero(probe_month == month)
                pos = np.searchsorted(active, probe_subject[rows])
                pos = np.minimum(pos, len(active) - 1)
                found = active[pos] == probe_subject[rows]
                for k in OUTCOMES:
                    probed[k][rows[found]] = hazards[k][pos[found]]
            self._step(month, month_day, active, age, hazards)
        return ShardResult(self.events.columns(), probed)

    def _step(self, month: int, month_day: float, active: np.ndarray, age: np.ndarray,
              hazards: dict[str, np.ndarray]) -> None:
        state, rng, pools = self.state, self.rng, self.pools
        hit = {k: rng.random(len(active)) < hazards[k] for k in OUTCOMES}
        forced_subject, forced_kind, forced_reason = [], [], []
        for disease in ("diabetes", "ckd"):  # subclinical start; coded later through labs
            new = active[hit[disease] & np.isnan(state.subclinical[disease][active])]
            state.subclinical[disease][new] = month
        for disease in CHRONIC:
            new = active[hit[disease] & ~state.has(disease)[active]]
            state.onset[disease][new] = month
            if disease == "afib":
                state.last["afib"][new] = month
            forced_subject.append(new)
            forced_kind.append(np.full(len(new), 2 if disease in ("heart_failure",
                                                                  "lung_cancer") else 0))
            forced_reason.append(self._disease_code(disease, new))
        for disease in ACUTE:
            new = active[hit[disease]]
            if disease == "mi":  # order effect: AF then MI within a year
                after_af = (month - state.last["afib"][new]) <= 12
                state.order_flag[new[after_af]] = True
            first = np.isnan(state.onset[disease][new])
            state.onset[disease][new[first]] = month
            state.last[disease][new] = month
            forced_subject.append(new)
            forced_kind.append(np.where(rng.random(len(new)) < 0.3, 1, 2))
            forced_reason.append(self._disease_code(disease, new))
        routine_rate = (
            0.15 * self.subjects.visit_rate[active] * np.exp(0.02 * (age - 50.0))
            * (1.0 + 0.3 * sum(state.has(d)[active] for d in CHRONIC + ("diabetes", "ckd")))
        )
        count = rng.poisson(np.minimum(routine_rate, 20.0))
        routine = np.repeat(active, count)
        kind = rng.choice(3, len(routine), p=[0.86, 0.09, 0.05])
        subject = np.concatenate([routine, *forced_subject])
        kind = np.concatenate([kind, *forced_kind]).astype(np.int8)
        reason = np.concatenate([np.full(len(routine), -1), *forced_reason])
        # Whole days from the month's first full day; with every offset within a visit (< 6 h)
        # all events stay inside [month start, month start + 28 days), before any death.
        day = np.ceil(month_day) + rng.integers(0, 27, len(subject))
        minute = rng.integers(8 * 60, 18 * 60, len(subject))
        time_us = day.astype(np.int64) * US_PER_DAY + minute * 60_000_000
        order = np.lexsort((time_us, subject))
        visits = Visits(subject[order], kind[order], time_us[order], reason[order])
        self._visit_content(month, visits)
        died = active[hit["death"]]
        state.alive[died] = False
        death_day = month_day + rng.uniform(28.0, MONTH_DAYS, len(died))
        self.events.add(died, (death_day * US_PER_DAY).astype(np.int64), pools.death)

    def _visit_content(self, month: int, visits: Visits) -> None:
        rng, pools, ev = self.rng, self.pools, self.events
        s, t, kind = visits.subject, visits.time_us, visits.kind
        nv = len(s)
        if nv == 0:
            return
        ev.add(s, t, np.array([pools.visit[VISIT_TYPES[k]] for k in range(3)])[kind])
        reasons = visits.reason >= 0
        ev.add(s[reasons], t[reasons], visits.reason[reasons].astype(np.int32))
        # Routine diagnoses: ICD-9-CM before the October 2015 switch, ICD-10-CM after.
        per_visit = 1 + rng.poisson(0.8, nv)
        vs, vt = np.repeat(s, per_visit), np.repeat(t, per_visit)
        icd9_era = vt < int((ICD9_UNTIL - EPOCH).astype(int)) * US_PER_DAY
        codes = np.where(icd9_era, self._draw(pools.routine_icd9, self.cdf_icd9, len(vs)),
                         self._draw(pools.routine_icd10, self.cdf_icd10, len(vs)))
        ev.add(vs, vt, codes)
        # Procedures: CPT4 in clinics and the ER, ICD-10-PCS in hospital.
        clinic = (kind < 2) & (rng.random(nv) < 0.6)
        ev.add(s[clinic], t[clinic] + 30 * 60_000_000,
               pools.cpt4[np.minimum(rng.geometric(0.45, clinic.sum()) - 1, len(pools.cpt4) - 1)])
        inpatient = kind == 2
        n_proc = np.where(inpatient, 1 + rng.poisson(1.0, nv), 0)
        ps, pt = np.repeat(s, n_proc), np.repeat(t, n_proc)
        procedures = self._draw(pools.procedures, self.cdf_procedures, len(ps))
        ev.add(ps, pt + 120 * 60_000_000, procedures)
        self._labs(month, visits)
        # Latent risks surface through rare sibling leaves of one block each.
        for k, pool in enumerate(pools.signature):
            p = 1 / (1 + np.exp(-(-3.2 + 1.6 * self.subjects.latent[s, k])))
            show = rng.random(nv) < p
            ev.add(s[show], t[show], pool[rng.integers(0, len(pool), show.sum())])
        smoking = rng.random(nv) < 0.08
        ev.add(s[smoking], t[smoking], pools.smoking, text=self.subjects.smoking[s[smoking]])
        self._recode_and_treat(month, visits)

    def _labs(self, month: int, visits: Visits) -> None:
        rng, pools, state, subjects = self.rng, self.pools, self.state, self.subjects
        s, kind = visits.subject, visits.kind
        t = visits.time_us + 60 * 60_000_000
        nv = len(s)
        sex = subjects.sex[s]
        z0 = subjects.latent[s, 0]
        since_dm = np.nan_to_num(month - state.subclinical["diabetes"][s], nan=0.0)
        since_ckd = np.nan_to_num(month - state.subclinical["ckd"][s], nan=0.0)
        hba1c = (5.2 + 0.15 * z0 + rng.normal(0, 0.25, nv) + np.minimum(0.08 * since_dm, 4.0)
                 - 0.8 * state.treated["metformin"][s])
        creatinine = np.maximum(0.75 + 0.2 * sex + rng.normal(0, 0.08, nv)
                                + np.minimum(0.035 * since_ckd, 5.0), 0.3)
        recent_infection = (decay(month, state.last["pneumonia"][s], 1.0)
                            + 2 * decay(month, state.last["sepsis"][s], 1.0))
        hf = state.has("heart_failure")[s]
        mi_now = state.last["mi"][s] == month
        p_panel = np.array([0.3, 0.8, 0.95])[kind]
        bmp = rng.random(nv) < p_panel
        cbc = rng.random(nv) < p_panel * 0.9
        age = (visits.time_us / US_PER_DAY - subjects.birth_day[s]) / 365.25
        a1c = rng.random(nv) < 0.08 + 0.2 * (age > 45) + 0.4 * state.has("diabetes")[s]
        bnp = rng.random(nv) < np.where(hf, 0.5, 0.05 + 0.2 * (kind > 0))
        troponin = (rng.random(nv) < 0.3 * (kind > 0)) | mi_now
        lipids = rng.random(nv) < 0.1
        alt = rng.random(nv) < 0.1
        values = {
            "2160-0": (bmp, np.round(creatinine, 2)),
            "2345-7": (bmp, np.round(28.7 * hba1c - 46.7 + rng.normal(0, 15, nv))),
            "2951-2": (bmp, np.round(rng.normal(140, 2.5, nv))),
            "2823-3": (bmp, np.round(rng.normal(4.2, 0.35, nv) + 0.3 * (creatinine > 1.5), 1)),
            "718-7": (cbc, np.round(rng.normal(12.8 + 1.4 * sex, 1.1, nv) - (creatinine > 2), 1)),
            "6690-2": (cbc, np.round(rng.lognormal(np.log(7), 0.25, nv)
                                     * (1 + recent_infection), 1)),
            "777-3": (cbc, np.round(rng.normal(250, 50, nv))),
            "4548-4": (a1c, np.round(hba1c, 1)),
            "30934-4": (bnp, np.round(rng.lognormal(np.log(40), 0.5, nv) * (1 + 10 * hf))),
            "6598-7": (troponin, np.round(np.where(mi_now, rng.lognormal(np.log(1.5), 0.6, nv),
                                                   rng.lognormal(np.log(0.01), 0.5, nv)), 3)),
            "13457-7": (lipids, np.round(rng.normal(120 + 15 * z0, 30, nv)
                                         - 40 * state.treated["atorvastatin"][s])),
            "1742-6": (alt, np.round(rng.lognormal(np.log(25), 0.4, nv))),
        }
        for loinc, (measured, value) in values.items():
            value = np.maximum(value, LAB_FLOOR.get(loinc, 0.0))  # no negative lab results
            self.events.add(s[measured], t[measured], pools.labs[loinc], value=value[measured])
        # Diagnoses coded when a measured lab crosses its threshold.
        for disease, measured, value, threshold in (
            ("diabetes", a1c, hba1c, 6.5), ("ckd", bmp, creatinine, 1.5),
        ):
            new = measured & (value >= threshold) & ~state.has(disease)[s]
            new &= ~np.isnan(state.subclinical[disease][s])
            subjects_new, first = np.unique(s[new], return_index=True)
            state.onset[disease][subjects_new] = month
            self.events.add(subjects_new, t[new][first] + 30 * 60_000_000,
                            self._disease_code(disease, subjects_new))

    def _recode_and_treat(self, month: int, visits: Visits) -> None:
        rng, pools, state, ev = self.rng, self.pools, self.state, self.events
        s, t = visits.subject, visits.time_us + 15 * 60_000_000
        nv = len(s)
        for disease in CHRONIC + ("diabetes", "ckd"):
            again = state.has(disease)[s] & (state.onset[disease][s] < month)
            again &= rng.random(nv) < 0.35
            ev.add(s[again], t[again], self._disease_code(disease, s[again]))
        rx_time = t + 15 * 60_000_000
        for drug, indications in TREATMENT_FOR.items():
            indicated = np.zeros(nv, bool)
            for disease in indications:
                indicated |= state.has(disease)[s]
            on = state.treated[drug][s]
            start = indicated & ~on & (rng.random(nv) < 0.4)
            refill = on & (rng.random(nv) < 0.5)
            give = start | refill
            state.treated[drug][np.unique(s[start])] = True
            if drug == "chemo":
                regimen = pools.hemonc[self.leaf["lung_cancer"][s[give]] % len(pools.hemonc)]
                ev.add(s[give], rx_time[give], regimen)
                ev.add(s[give], rx_time[give], pools.drugs["carboplatin"])
            else:
                ev.add(s[give], rx_time[give], pools.drugs[drug])
        background = rng.random(nv) < 0.25
        names = np.array([pools.drugs[d] for d in BACKGROUND_DRUGS])
        ev.add(s[background], rx_time[background],
               names[rng.integers(0, len(names), background.sum())])
