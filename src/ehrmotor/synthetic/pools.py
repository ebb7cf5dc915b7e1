"""The codes the simulator draws from: the catalogue's codes as index arrays (`CodePools`).

Disease and signature leaves, routine diagnoses (ICD-10-CM, and ICD-9-CM before the 2015 switch)
and procedures with their Zipf-like popularity (`zipf_cdf`), labs, drugs, HemOnc regimens, visit,
demographic and smoking codes. Built once per worker from the catalogue and shared by its shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ehrmotor.synthetic.catalog import (
    CPT4,
    DISEASE_CATEGORIES,
    DRUGS,
    HEMONC_REGIMENS,
    LABS,
    SIGNATURE_BLOCKS,
    SMOKING_STATUS,
    Catalog,
    icd10_leaves_under,
)


@dataclass(frozen=True)
class CodePools:
    """Code indices the simulator draws from, derived from the catalogue."""

    disease: dict[str, np.ndarray]
    signature: list[np.ndarray]
    routine_icd10: np.ndarray
    routine_icd9: np.ndarray
    procedures: np.ndarray
    cpt4: np.ndarray
    labs: dict[str, int]
    drugs: dict[str, int]
    hemonc: np.ndarray
    visit: dict[str, int]
    gender: np.ndarray
    race: np.ndarray
    smoking: int
    birth: int = 0
    death: int = 1

    @classmethod
    def from_catalog(cls, catalog: Catalog) -> CodePools:
        concepts = catalog.concepts

        def codes_where(vocab: str, klass: str) -> list[str]:
            rows = concepts.filter(
                (concepts["vocabulary_id"] == vocab) & (concepts["concept_class_id"] == klass)
            )
            return rows["code"].to_list()

        icd10_codes = codes_where("ICD10CM", "ICD10 code")
        parents = set(catalog.edges.filter(catalog.edges["relationship"] == "Is a")["parent"])
        # Planted codes stay out of the background so their signal is the planted one.
        planted = {c for v in DISEASE_CATEGORIES.values() for c in icd10_leaves_under(v)}
        planted |= {c for b in SIGNATURE_BLOCKS for c in icd10_leaves_under(b)}
        icd10_leaves = [c for c in icd10_codes if c not in parents and c not in planted]
        maps = catalog.edges.filter(catalog.edges["relationship"] == "Maps to")
        icd9_planted = set(maps.filter(maps["parent"].is_in(list(planted)))["child"])
        icd9_codes = [c for c in codes_where("ICD9CM", "ICD9CM code") if c not in icd9_planted]
        return cls(
            disease={k: catalog.ids(icd10_leaves_under(v)) for k, v in DISEASE_CATEGORIES.items()},
            signature=[catalog.ids(icd10_leaves_under(b)) for b in SIGNATURE_BLOCKS],
            routine_icd10=catalog.ids(icd10_leaves),
            routine_icd9=catalog.ids(icd9_codes),
            procedures=catalog.ids(codes_where("ICD10PCS", "ICD10PCS")),
            cpt4=catalog.ids([f"CPT4/{c}" for c, _ in CPT4]),
            labs={code: catalog.index[f"LOINC/{code}"] for code, *_ in LABS},
            drugs={name: catalog.index[f"RxNorm/{rx}"] for rx, name, _ in DRUGS},
            hemonc=catalog.ids([f"HemOnc/{10_000 + i}" for i in range(len(HEMONC_REGIMENS))]),
            visit={v: catalog.index[f"Visit/{v}"] for v in ("IP", "OP", "ER")},
            gender=catalog.ids(["Gender/F", "Gender/M"]),
            race=catalog.ids(["Race/2106-3", "Race/2054-5", "Race/2028-9", "Race/1002-5",
                              "Race/2076-8"]),
            smoking=catalog.index[f"LOINC/{SMOKING_STATUS[0]}"],
        )


def zipf_cdf(n: int, rng: np.random.Generator, exponent: float = 1.1) -> np.ndarray:
    """Cumulative Zipf weights over a random permutation of n codes (heavy-tailed frequencies)."""
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    weights = weights[rng.permutation(n)]
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]
