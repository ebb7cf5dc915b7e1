"""What `precision = "auto"` picks: bf16 autocast where it is measured to help, else fp32.

`auto_uses_bf16(device_type, hidden_size, training=...)` is the one rule, used by pretraining
(`ehrmotor.pretrain.setup.training_arguments`) and featurization (`ehrmotor.representations`):

- CUDA: bf16 autocast where the GPU supports bf16.
- CPU: bf16 autocast where the CPU has AMX-BF16 (`cpu_has_amx_bf16`): always for training,
  whose MOTOR head (final layer × tasks) is the largest matmul even of a narrow model; for
  embedding (the encoder alone) when the model is at least `BF16_MIN_EMBEDDING_HIDDEN_SIZE` wide.
  Else fp32: with AVX512-BF16 alone (no AMX) bf16 matmuls ran slower than fp32 ones (Xeon
  model 207 with AMX hidden, 1,632 × 512 × 8,192, forward and both backward products: 31-45
  against 39-75 GFLOP/s), and bf16 training 0.6-0.7× fp32's tokens/s (benchmarks/PROFILE_CPU.md).
- Any other device: fp32.

Autocast runs the matmuls in bf16 only: the weights, and so the optimizer state, stay fp32, and
the MOTOR loss is computed in fp32 (`model.head.motor_loss`).
"""

from __future__ import annotations

from pathlib import Path

import torch

# Measured on a 2-core CPU with AMX (benchmarks/bench_train.py: tokens/s of bf16 autocast over
# fp32 training, 8,192 tasks, final layer 512): 2 layers × 64 hidden 1.24× at 2,048 tokens per
# batch and 1.31× at 16,384; 6 × 256 (FFN 512) 1.50× and 1.90×; 6 × 768 (`small`) see README.
# Embedding (no head): bf16 pays from this width on (see README, "Speed").
BF16_MIN_EMBEDDING_HIDDEN_SIZE = 256

# Read when torch cannot report the CPU's capabilities itself (torch.cpu.get_capabilities is
# recent); only Linux has it.
CPUINFO = Path("/proc/cpuinfo")
AMX_BF16_FLAGS = ("amx_bf16",)


def cpu_has_amx_bf16() -> bool:
    """True when this CPU has AMX-BF16, the matrix unit where bf16 pays (see the docstring)."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        capabilities = get_capabilities()
        return any(bool(capabilities.get(flag, False)) for flag in AMX_BF16_FLAGS)
    try:
        lines = CPUINFO.read_text().splitlines()
    except OSError:  # not Linux: no way to tell, so no bf16
        return False
    flags = {flag for line in lines if line.startswith("flags") for flag in line.split()}
    return any(flag in flags for flag in AMX_BF16_FLAGS)


def auto_uses_bf16(device_type: str, hidden_size: int, *, training: bool) -> bool:
    """Whether precision "auto" runs a model `hidden_size` wide under bf16 autocast on a device
    of `device_type` ("cuda", "cpu", ...), to train it or to embed with it; see the module
    docstring for the rule."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        wide = training or hidden_size >= BF16_MIN_EMBEDDING_HIDDEN_SIZE
        return wide and cpu_has_amx_bf16()
    return False
