"""GPU check: attention backends against the naive reference, training and embedding throughput.

    python benchmarks/gpu_check.py --json gpu_check.json   # CUDA, full sizes (budget: 8 min, H100)
    python benchmarks/gpu_check.py --cpu-smoke              # the same sections, tiny, on CPU

- attention: every backend of `BACKENDS` that runs on the device (flex needs CUDA; "auto" is
  reported as the backend it resolves to) against the dense `naive_local_attention` of
  tests/model_reference.py, outputs and the q, k, v gradients of Σ output · (random upstream),
  on three packings: short subjects (1-32 positions), heavy-tailed lengths, and subjects of 1,
  width - 1, width, width + 1, 2·width + 3 positions then a long one. Each dtype's reference is
  computed in fp32 from the inputs that dtype sees (bf16: the bf16-rounded inputs), with fp32
  matmuls at "highest" precision (no TF32). A check passes when every element is finite and
  |actual - reference| <= atol + rtol·|reference| (TOLERANCES); max_rel = max |error| / max
  |reference|; tolerance_used = max |error| / (atol + rtol·|reference|), passing at <= 1.
- training: `bench_train.model_config(preset)` on `bench_train.random_batch`, bf16 autocast,
  AdamW; warm-up steps (flex compiles there), then timed steps: tokens/s, MFU
  (`bench_train.flops_per_token` over `--peak-tflops`, default 989 = H100 SXM dense bf16; a
  smoke value on CPU), peak memory (CUDA: max_memory_allocated after the warm-up; CPU: peak RSS).
- embedding: `ehrmotor synth` + `ehrmotor prepare`, a bundle of a freshly initialised model,
  labels at event times after each birth date; labels/s of one `compute_features` call (bundle
  loading and MEDS reading included) after a 50-label warm-up call.

Full: 8,192 attention tokens of 12 heads × 64, width 496; base at 16,384 tokens, 3 + 20 steps;
2,000 subjects, 5,000 labels, context 16,384. Smoke: 1,024 tokens of 4 × 16, width 128; tiny at
512 tokens, 1 + 2 steps; 100 subjects, 300 labels, context 1,024. Every figure goes to `--json`;
the exit status is 1 when a check fails or a section raises (recorded; the others still run).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from ehrmotor.bundle import record_fingerprint
from ehrmotor.config import PretrainConfig
from ehrmotor.embed import compute_features
from ehrmotor.meds import data_files
from ehrmotor.model import BACKENDS, MotorModel, local_attention, resolve_backend
from ehrmotor.model.attention import flex_available
from ehrmotor.pretrain.setup import build_model_config, load_prepared_files
from ehrmotor.sequences.positions import BIRTH_CODE

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))
sys.path.insert(0, str(BENCHMARKS.parent / "tests"))
import bench_train  # noqa: E402  (random batches, the benchmark model, FLOPs per token)
from model_reference import naive_local_attention  # noqa: E402  (the dense oracle)

Attention = Callable[..., torch.Tensor]  # (q, k, v, segment_ids, width) -> (T, H, D)
LAYOUTS = ("short", "heavy-tailed", "width-edges")
SECTIONS = ("attention", "training", "embedding")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


TOLERANCES = {"fp32": Tolerance(1e-3, 1e-3), "bf16": Tolerance(5e-2, 2e-2)}


@dataclass(frozen=True)
class Sizes:
    attention_tokens: int
    heads: int
    head_dim: int
    width: int
    preset: str
    train_tokens: int
    warmup_steps: int
    timed_steps: int
    subjects: int
    labels: int
    vocab_size: int
    num_tasks: int
    max_window: int  # the embedding context; on CUDA every batch is padded to it


FULL = Sizes(8192, 12, 64, 496, "base", 16_384, 3, 20, 2000, 5000, 16_384, 8192, 16_384)
SMOKE = Sizes(1024, 4, 16, 128, "tiny", 512, 1, 2, 100, 300, 2000, 300, 1024)


def segment_lengths(layout: str, tokens: int, width: int, seed: int = 0) -> list[int]:
    """Subject lengths of one packed sequence of `tokens` positions (see the module docstring)."""
    rng = np.random.default_rng(seed)
    if layout == "width-edges":
        lengths = [1, width - 1, width, width + 1, 2 * width + 3]
        lengths.append(max(1, tokens - sum(lengths)))
    else:
        lengths = []
        while sum(lengths) < tokens:
            draw = rng.integers(1, 33) if layout == "short" else rng.lognormal(5.0, 1.2)
            lengths.append(max(1, int(draw)))
    lengths[-1] -= sum(lengths) - tokens
    return [length for length in lengths if length > 0]


def compare(actual: torch.Tensor, expected: torch.Tensor, tolerance: Tolerance) -> dict[str, Any]:
    """passed, max_abs, max_rel and tolerance_used of `actual` against `expected`."""
    actual, expected = actual.detach().float(), expected.detach().float()
    error = (actual - expected).abs().nan_to_num(nan=math.inf, posinf=math.inf)
    bound = tolerance.atol + tolerance.rtol * expected.abs()
    max_abs, scale = float(error.max()), float(expected.abs().max())
    used = float((error / bound).max())
    return {"passed": used <= 1.0 and bool(torch.isfinite(actual).all()), "max_abs": max_abs,
            "max_rel": max_abs / scale if scale else max_abs, "tolerance_used": used}


def attention_with_grads(attend: Attention, inputs: Sequence[torch.Tensor],
                         segment_ids: torch.Tensor, width: int,
                         upstream: torch.Tensor) -> list[torch.Tensor]:
    """[output, dq, dk, dv] of `attend` for the loss Σ output · upstream."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    output = attend(*leaves, segment_ids, width)
    grads = torch.autograd.grad((output.float() * upstream).sum(), leaves)
    return [output.detach(), *grads]


def check_backend(attend: Attention, inputs: Sequence[torch.Tensor], segment_ids: torch.Tensor,
                  width: int, upstream: torch.Tensor, expected: Sequence[torch.Tensor],
                  tolerance: Tolerance) -> dict[str, Any]:
    """Output and q, k, v gradients of `attend` against `expected` ([output, dq, dk, dv])."""
    try:
        actual = attention_with_grads(attend, inputs, segment_ids, width, upstream)
    except Exception as error:  # a failed check that names it; the other backends still run
        return {"passed": False, "error": _one_line(error)}
    parts = {name: compare(got, want, tolerance)
             for name, got, want in zip(("output", "dq", "dk", "dv"), actual, expected,
                                        strict=True)}
    return {"passed": all(part["passed"] for part in parts.values()),
            **{key: max(part[key] for part in parts.values())
               for key in ("max_abs", "max_rel", "tolerance_used")}, "parts": parts}


def attention_section(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Every backend that runs on `device` against the naive reference (module docstring)."""
    usable = [name for name in BACKENDS if name != "auto"
              and (name != "flex" or (device.type == "cuda" and flex_available()))]
    checks: list[dict[str, Any]] = []
    shape = (sizes.attention_tokens, sizes.heads, sizes.head_dim)  # (T, H, D)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # an fp32 reference, not TF32
    try:
        for seed, layout in enumerate(LAYOUTS):
            lengths = segment_lengths(layout, sizes.attention_tokens, sizes.width, seed)
            segment_ids = torch.repeat_interleave(torch.arange(len(lengths)),
                                                  torch.tensor(lengths)).to(device)
            generator = torch.Generator().manual_seed(seed)
            q, k, v, upstream = (torch.randn(shape, generator=generator).to(device)
                                 for _ in range(4))
            for dtype, tolerance in TOLERANCES.items():
                inputs = [x.to(DTYPES[dtype]) for x in (q, k, v)]
                expected = attention_with_grads(naive_local_attention,
                                                [x.float() for x in inputs], segment_ids,
                                                sizes.width, upstream)
                for name in usable:
                    result = check_backend(partial(local_attention, backend=name), inputs,
                                           segment_ids, sizes.width, upstream, expected, tolerance)
                    checks.append({"layout": layout, "subjects": len(lengths), "dtype": dtype,
                                   "backend": name, **result})
    finally:
        torch.set_float32_matmul_precision(precision)
    return {"tokens": sizes.attention_tokens, "heads": sizes.heads, "head_dim": sizes.head_dim,
            "width": sizes.width, "auto_runs_as": resolve_backend("auto", device),
            "tolerances": {name: asdict(t) for name, t in TOLERANCES.items()},
            "skipped": [name for name in BACKENDS if name != "auto" and name not in usable],
            "passed": bool(checks) and all(check["passed"] for check in checks),
            "checks": checks}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # timings need the queued kernels done
        torch.cuda.synchronize(device)


def training_section(sizes: Sizes, device: torch.device, peak_tflops: float) -> dict[str, Any]:
    """bf16 training tokens/s, MFU and peak memory of the benchmark model (module docstring)."""
    torch.manual_seed(0)
    config = bench_train.model_config(sizes.preset)
    model = MotorModel(config).to(device).train()
    batch = {name: value.to(device) if isinstance(value, torch.Tensor) else value
             for name, value in bench_train.random_batch(sizes.train_tokens, 0).items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses: list[torch.Tensor] = []

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    for _ in range(sizes.warmup_steps):
        step()
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(sizes.timed_steps):
        step()
    _synchronize(device)
    seconds = (time.perf_counter() - started) / sizes.timed_steps
    if device.type == "cuda":
        peak, peak_kind = torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    else:
        peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"
    tokens = int(batch["segment_ids"].shape[0])
    flops = bench_train.flops_per_token(model, config, len(batch["censor_days"]) / tokens)
    return {"preset": sizes.preset, "tokens_per_batch": tokens, "precision": "bf16 autocast",
            "parameters": model.count_parameters(), "warmup_steps": sizes.warmup_steps,
            "timed_steps": sizes.timed_steps, "seconds_per_step": seconds,
            "tokens_per_s": tokens / seconds, "flops_per_token": flops,
            "peak_tflops": peak_tflops, "mfu": tokens / seconds * flops / (peak_tflops * 1e12),
            "peak_memory_gib": peak / 2**30, "peak_memory_kind": peak_kind,
            "losses": [float(loss) for loss in losses]}


def sample_labels(meds: Path, count: int, seed: int = 0) -> pl.DataFrame:
    """Up to `count` (subject_id, prediction_time) at event times after each birth date (birth:
    MEDS_BIRTH, else the first timed event, as `ehrmotor.sequences.positions` has it)."""
    events = pl.scan_parquet(data_files(meds)).filter(pl.col("time").is_not_null())
    births = events.group_by("subject_id").agg(birth=pl.coalesce(
        pl.col("time").filter(pl.col("code") == BIRTH_CODE).min(), pl.col("time").min()))
    candidates = events.join(births, on="subject_id").filter(
        pl.col("time").dt.date() > pl.col("birth").dt.date()
    ).select("subject_id", prediction_time=pl.col("time")).unique().sort(
        "subject_id", "prediction_time").collect()
    chosen = np.random.default_rng(seed).choice(candidates.height,
                                                min(count, candidates.height), replace=False)
    return candidates[np.sort(chosen)]


def _ehrmotor(*args: str) -> None:
    """Run the `ehrmotor` command line (its worker pools then re-import it, not this script)."""
    done = subprocess.run([sys.executable, "-m", "ehrmotor", *args], capture_output=True,
                          text=True)
    if done.returncode:
        raise RuntimeError(f"ehrmotor {args[0]} exited with {done.returncode}: "
                           f"{(done.stderr.strip().splitlines() or [''])[-1]}")


def fresh_bundle(sizes: Sizes, root: Path, workers: int | None) -> tuple[Path, Path]:
    """(MEDS folder, bundle): `ehrmotor synth` + `prepare` under `root`, then the bundle
    `ehrmotor pretrain` would write, holding a freshly initialised model of `sizes.preset`."""
    meds, work, bundle = root / "meds", root / "work", root / "bundle"
    worker_args = [] if workers is None else ["--workers", str(workers)]
    _ehrmotor("synth", "--subjects", str(sizes.subjects), "--seed", "0", "--out", str(meds),
              "--force", *worker_args)
    _ehrmotor("prepare", "--meds", str(meds), "--athena", str(meds / "athena"), "--out",
              str(work), "--force", "--vocab-size", str(sizes.vocab_size), "--candidate-tasks",
              str(sizes.num_tasks), "--max-window", str(sizes.max_window), *worker_args)
    config = build_model_config(PretrainConfig(preset=sizes.preset), load_prepared_files(work))
    shutil.rmtree(bundle, ignore_errors=True)  # this script's own bundle of an earlier run
    torch.manual_seed(0)
    MotorModel(config).save_pretrained(bundle)
    files = work / "pretraining_files"
    shutil.copy(files / "tokenizer" / "dictionary.msgpack", bundle / "dictionary.msgpack")
    shutil.copy(files / "motor_task.json", bundle / "motor_task.json")
    shutil.copytree(files / "ontology", bundle / "ontology")
    record_fingerprint(bundle)  # last, as `pretrain` does: load_bundle checks it
    return meds, bundle


def embedding_section(sizes: Sizes, device: torch.device, root: Path,
                      workers: int | None) -> dict[str, Any]:
    """labels/s of `compute_features` on synthetic MEDS data (module docstring)."""
    started = time.perf_counter()
    meds, bundle = fresh_bundle(sizes, root, workers)
    labels = sample_labels(meds, sizes.labels)
    setup = time.perf_counter() - started
    started = time.perf_counter()
    compute_features(meds, bundle, labels.head(50), device=device)  # warm-up (compiles on CUDA)
    _synchronize(device)
    warmup = time.perf_counter() - started
    started = time.perf_counter()
    features = compute_features(meds, bundle, labels, device=device)["features"]
    _synchronize(device)
    seconds = time.perf_counter() - started
    return {"preset": sizes.preset, "subjects": sizes.subjects, "labels": labels.height,
            "context": sizes.max_window, "hidden_size": int(features.shape[1]),
            "seconds": seconds, "labels_per_s": labels.height / seconds, "setup_seconds": setup,
            "warmup_seconds": warmup,
            "features_finite": bool(np.isfinite(features).all())}


def _attention_lines(result: dict[str, Any]) -> list[str]:
    tolerances = ", ".join(f"{name} {t['atol']:g} + {t['rtol']:g}·|ref|"
                           for name, t in result["tolerances"].items())
    lines = [f"attention: {result['tokens']:,} tokens, {result['heads']} heads × "
             f"{result['head_dim']}, width {result['width']}; |error| <= {tolerances}; auto runs "
             f"as {result['auto_runs_as']}" + "".join(f"; {name} cannot run here"
                                                       for name in result["skipped"]),
             f"  {'layout':<13}{'dtype':<6}{'backend':<10}{'max abs':>10}{'max rel':>10}"
             f"{'tol used':>9}  result"]
    for check in result["checks"]:
        figures = "".join(f"{check.get(key, math.nan):>{width}.2e}" for key, width in
                          (("max_abs", 10), ("max_rel", 10), ("tolerance_used", 9)))
        verdict = "pass" if check["passed"] else f"FAIL {check.get('error', '')}"
        lines.append(f"  {check['layout']:<13}{check['dtype']:<6}{check['backend']:<10}"
                     f"{figures}  {verdict}")
    return lines


def _report_lines(name: str, result: dict[str, Any]) -> list[str]:
    if "error" in result:
        return [f"{name}: ERROR {result['error']}"]
    if name == "attention":
        return _attention_lines(result)
    if name == "training":
        return [f"training: {result['preset']}, {result['tokens_per_batch']:,} tokens per batch, "
                f"bf16 autocast: {result['tokens_per_s']:,.0f} tokens/s "
                f"({result['seconds_per_step']:.3f} s/step, {result['timed_steps']} steps), MFU "
                f"{result['mfu']:.1%} of {result['peak_tflops']:g} TFLOP/s, peak "
                f"{result['peak_memory_gib']:.2f} GiB ({result['peak_memory_kind']})"]
    return [f"embedding: {result['preset']}, {result['labels']:,} labels of "
            f"{result['subjects']:,} subjects in {result['seconds']:.1f} s: "
            f"{result['labels_per_s']:,.0f} labels/s (synth, prepare and bundle "
            f"{result['setup_seconds']:.1f} s; first call on 50 labels, warm-up "
            f"{result['warmup_seconds']:.1f} s)"]


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".strip().splitlines()[0][:300]


def _run_section(name: str, args: argparse.Namespace, device: torch.device,
                 root: Path) -> dict[str, Any]:
    sizes = SMOKE if args.cpu_smoke else FULL
    started = time.perf_counter()
    try:
        if name == "attention":
            result = attention_section(sizes, device)
        elif name == "training":
            result = training_section(sizes, device, args.peak_tflops)
        else:
            result = embedding_section(sizes, device, root, 1 if args.cpu_smoke else None)
    except Exception as error:  # recorded; the other sections still run
        result = {"error": _one_line(error)}
    result["elapsed_s"] = time.perf_counter() - started
    print("\n".join(_report_lines(name, result)) + f"\n  ({name}: {result['elapsed_s']:.1f} s)",
          flush=True)
    return result


def _finite(value: Any) -> Any:
    """`value` with non-finite floats as null, for strict JSON."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sections, print them, write the JSON; 0 when everything passed, else 1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU (the test)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--json", type=Path, default=Path("gpu_check.json"),
                        help="where every figure goes (default: gpu_check.json)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the GPU's dense bf16 peak, for MFU (default 989: H100 SXM)")
    parser.add_argument("--work", type=Path, help="folder for the embedding data (default: temp)")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; --cpu-smoke runs the check on CPU")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    report: dict[str, Any] = {"device": name, "torch": torch.__version__,
                              "mode": "cpu-smoke" if args.cpu_smoke else "full"}
    print(f"gpu_check: {name}, torch {torch.__version__}, {report['mode']}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as temporary:
        for section in args.sections:
            report[section] = _run_section(section, args, device, args.work or Path(temporary))
    report["elapsed_s"] = time.perf_counter() - started
    report["passed"] = all("error" not in report[section] for section in args.sections) and (
        report.get("attention", {}).get("passed", True))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(_finite(report), indent=2, allow_nan=False) + "\n")
    print(f"gpu_check: {'passed' if report['passed'] else 'FAILED'} in "
          f"{report['elapsed_s']:.0f} s; figures in {args.json}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
