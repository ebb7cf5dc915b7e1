"""`bench_train.py --vs-femr`: ehrmotor and femr 0.2.4 trained side by side on the same windows.

femr runs in its own virtual environment (benchmarks/femr/make_venv.sh) as a worker process
(benchmarks/femr/femr_train_worker.py) that keeps its model warm; ehrmotor runs in this process.
Both get the same packed batch (written to a temporary .npz), the same shape and threads, and
the AdamW their own Trainer uses: fused for ehrmotor (transformers >= 5 defaults to
adamw_torch_fused), the plain loop for femr (its transformers 4.46 defaults to adamw_torch).
The timed rounds alternate (ehrmotor fp32, ehrmotor bf16, ..., femr, again), so
load from other processes falls on every variant alike; each figure is the median round.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ehrmotor.model import MotorConfig, MotorModel
from ehrmotor.precision import auto_uses_bf16

WORKER = Path(__file__).resolve().parent / "femr" / "femr_train_worker.py"


def cpu_description() -> str:
    """The CPU's model name and its matrix features, from /proc/cpuinfo."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in lines
                 if line.startswith("model name")), "unknown CPU")
    model = next((line.split(":", 1)[1].strip() for line in lines
                  if line.startswith("model\t")), "?")
    flags = {flag for line in lines if line.startswith("flags") for flag in line.split()}
    features = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags]
    return f"{name} (model {model}; {', '.join(features) or 'no AVX'})"


def ehrmotor_step(config: MotorConfig, batch: dict[str, torch.Tensor], bf16: bool,
                  compiled: bool = False) -> Callable[[], None]:
    """One training step (forward, backward, AdamW) of a fresh seeded model, warmed up once
    (with `compiled`: torch.compile'd, the warm-up compiles)."""
    torch.manual_seed(0)
    model = MotorModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    forward = torch.compile(model, dynamic=True) if compiled else model

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = forward(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    return step


def start_femr(venv: Path, batch_file: Path, config: MotorConfig,
               attention: str) -> subprocess.Popen[str]:
    command = [str(venv / "bin" / "python"), str(WORKER), str(batch_file),
               "--layers", str(config.num_layers), "--hidden", str(config.hidden_size),
               "--heads", str(config.num_heads), "--intermediate", str(config.intermediate_size),
               "--final-layer", str(config.final_layer_size), "--vocab", str(config.vocab_size),
               "--tasks", str(config.num_tasks), "--threads", str(torch.get_num_threads()),
               "--attention", attention, "--bin-edges-days",
               *[str(edge) for edge in config.bin_edges_days]]
    worker = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert worker.stdout is not None
    ready = worker.stdout.readline()
    if not ready:
        raise RuntimeError(f"femr worker failed to start: {' '.join(command)}")
    return worker


def femr_seconds(worker: subprocess.Popen[str], steps: int) -> float:
    assert worker.stdin is not None and worker.stdout is not None
    worker.stdin.write(f"{steps}\n")
    worker.stdin.flush()
    return float(json.loads(worker.stdout.readline())["seconds"])


def compare(config: MotorConfig, tokens: int, precisions: list[str], rounds: int, steps: int,
            venv: Path, attention: str, batch_of: Callable[[int], dict[str, torch.Tensor]],
            compiled: bool = False) -> dict[str, float]:
    """Median tokens/s of each ehrmotor precision and of femr on one batch of `tokens`
    (`batch_of(tokens)`: a collated training batch)."""
    batch = batch_of(tokens)
    positions = len(batch["segment_ids"])
    steps_of: dict[str, Callable[[], float]] = {}
    for precision in precisions:
        bf16 = precision == "bf16" or (precision == "auto" and auto_uses_bf16(
            "cpu", config.hidden_size, training=True))
        step = ehrmotor_step(config, batch, bf16, compiled)

        def timed(step: Callable[[], None] = step) -> float:
            started = time.perf_counter()
            for _ in range(steps):
                step()
            return time.perf_counter() - started

        steps_of[f"ehrmotor {precision}"] = timed
    with tempfile.TemporaryDirectory() as folder:
        batch_file = Path(folder) / "batch.npz"
        np.savez(batch_file, **{name: value.numpy() for name, value in batch.items()})
        worker = start_femr(venv, batch_file, config, attention)
        steps_of["femr"] = lambda: femr_seconds(worker, steps)
        seconds: dict[str, list[float]] = {name: [] for name in steps_of}
        try:
            for _ in range(rounds):
                for name, timed_steps in steps_of.items():
                    seconds[name].append(timed_steps())
        finally:
            assert worker.stdin is not None
            worker.stdin.close()
            worker.wait()
    return {name: positions * steps / statistics.median(values)
            for name, values in seconds.items()}


def report(configs: dict[str, MotorConfig], tokens_list: list[int], precisions: list[str],
           rounds: int, steps: int, venv: Path, attention: str,
           batch_of: Callable[[int], dict[str, torch.Tensor]], compiled: bool = False) -> None:
    """Print ehrmotor's and femr's tokens/s and their ratio per shape and batch size."""
    print(f"{cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load {os.getloadavg()[0]:.2f}; {rounds} alternating rounds of {steps} steps, median; "
          f"femr attention {attention}{'; ehrmotor compiled' if compiled else ''}")
    names = [f"ehrmotor {p}" for p in precisions]
    print(f"{'shape':<11}{'tokens':>7}" + "".join(f"{n:>16}" for n in names)
          + f"{'femr':>9}" + "".join(f"{p + ' / femr':>14}" for p in precisions))
    for shape, config in configs.items():
        for tokens in tokens_list:
            r = compare(config, tokens, precisions, rounds, steps, venv, attention, batch_of,
                        compiled)
            print(f"{shape:<11}{tokens:>7}" + "".join(f"{r[n]:>16,.0f}" for n in names)
                  + f"{r['femr']:>9,.0f}" + "".join(f"{r[n] / r['femr']:>13.2f}×" for n in names)
                  + f"   (load {os.getloadavg()[0]:.2f})", flush=True)
