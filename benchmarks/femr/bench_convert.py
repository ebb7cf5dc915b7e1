"""femr vs ehrmotor featurizing the femr fixture cohort on CPU, and a base-size converted model's
speed.

    python benchmarks/femr/bench_convert.py [--femr-venv /work/femr-venvs/0.2.4]

1. `ehrmotor synth --subjects 120 --seed 5` (the data of tests/data/femr), converted to a
   meds_reader database with femr's `meds_reader_convert`;
2. femr 0.2.4's own `compute_features` on the fixture's model and 341 labels, in femr's
   environment (num_proc 4, tokens_per_batch 256, the CPU patches of make_fixture.py), timed
   inside that process (model load and batching included, imports excluded);
3. `ehrmotor convert-femr` of the same model, then `compute_features` on the same database and
   labels, timed the same way;
4. tokens/s of a randomly initialised 6-layer x 768 femr hybrid encoder (femr's defaults:
   12 heads, intermediate 3072, attention width 496) on one packed 4,096-position sequence, fp32
   and under CPU bf16 autocast.
Prints one line per measurement. CPU timings depend on the machine's load: give it alongside.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import torch

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "data" / "femr"
FEMR_RUN = """
import sys, time
sys.path.insert(0, {fixture!r})
import make_fixture  # noqa: F401  (CPU patches: xformers stand-in, cuda.synchronize, EmbeddingBag)
import femr.models.transformer, femr.ontology, meds_reader, pyarrow.parquet as pq

def main():
    labels = pq.read_table({labels!r}).to_pylist()
    start = time.perf_counter()
    with meds_reader.SubjectDatabase({database!r}, num_threads=4) as db:
        ontology = femr.ontology.Ontology({athena!r})
        ontology.prune_to_dataset(db, remove_ontologies={{"SPL", "HemOnc"}})
        femr.models.transformer.compute_features(db, {model!r}, labels, num_proc=4,
                                                 tokens_per_batch=256, ontology=ontology)
    print("SECONDS", time.perf_counter() - start)

if __name__ == "__main__":
    main()
"""


def femr_seconds(venv: Path, database: Path, athena: Path) -> float:
    script = FEMR_RUN.format(fixture=str(FIXTURE), labels=str(FIXTURE / "labels.parquet"),
                             database=str(database), athena=str(athena),
                             model=str(FIXTURE / "model"))
    done = subprocess.run([str(venv / "bin" / "python"), "-c", script], capture_output=True,
                          text=True, check=True, cwd=database.parent)
    return float(done.stdout.split("SECONDS")[-1])


def ehrmotor_seconds(database: Path, athena: Path, work: Path) -> float:
    from ehrmotor.convert.femr_folder import convert_femr
    from ehrmotor.embed import compute_features

    labels = pl.read_parquet(FIXTURE / "labels.parquet")
    start = time.perf_counter()
    bundle = convert_femr(FIXTURE / "model", work / "bundle", athena=athena)
    converted = time.perf_counter()
    compute_features(database, bundle, labels, tokens_per_batch=256)
    end = time.perf_counter()
    print(f"ehrmotor convert-femr: {converted - start:.2f} s")
    return end - converted


def base_tokens_per_second(positions: int = 4096) -> dict[str, float]:
    from ehrmotor.femr.model import FemrHybridConfig, FemrHybridEncoder

    config = FemrHybridConfig(vocab_size=32768, hidden_size=768, intermediate_size=3072,
                              num_heads=12, num_layers=6, attention_width=496,
                              use_normed_ages=True, hidden_act="swiglu")
    model = FemrHybridEncoder(config).eval()
    generator = torch.Generator().manual_seed(0)
    entries = torch.randint(0, config.vocab_size, (positions * 3,), generator=generator)
    inputs = dict(entries=entries, weights=torch.full((positions * 3,), 1 / 3),
                  bag_offsets=torch.arange(0, positions * 3 + 1, 3),
                  ages_days=torch.linspace(0, 20000, positions),
                  time_data=torch.randn(positions, 5, generator=generator),
                  segment_ids=torch.repeat_interleave(torch.arange(4), positions // 4))
    rates = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32,
                                             enabled=dtype is not None):
            model(**inputs)  # warm-up
            start = time.perf_counter()
            model(**inputs)
            rates[name] = positions / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--femr-venv", type=Path, default=Path("/work/femr-venvs/0.2.4"))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for ehrmotor (default torch's; 1 on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from ehrmotor.synthetic import generate

        meds = generate(work / "meds", 120, seed=5, progress=False)
        database = work / "database"
        subprocess.run([str(args.femr_venv / "bin" / "meds_reader_convert"), str(meds),
                        str(database), "--num_threads", "4"], check=True, capture_output=True)
        femr = femr_seconds(args.femr_venv, database, meds / "athena")
        ours = ehrmotor_seconds(database, meds / "athena", work)
    print(f"featurize 341 labels of 120 subjects, CPU: femr 0.2.4 {femr:.2f} s, "
          f"ehrmotor {ours:.2f} s ({femr / ours:.1f}x)")
    rates = base_tokens_per_second()
    print(f"converted 6 x 768 femr hybrid encoder, CPU, {torch.get_num_threads()} threads: "
          f"{rates['fp32']:,.0f} positions/s fp32, {rates['bf16']:,.0f} positions/s bf16")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
