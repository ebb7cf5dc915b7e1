"""What `precision = "auto"` picks: bf16 autocast where it is measured to help, else fp32.

`auto_uses_bf16(device_type, hidden_size)` is the one rule, used by pretraining
(`train_setup.training_arguments`) and embedding (`embed.compute_features`):

- CUDA: bf16 autocast where the GPU supports bf16.
- CPU: bf16 autocast where the CPU multiplies bf16 matrices natively (`cpu_has_native_bf16`:
  AMX-BF16 or AVX512-BF16) and the model is at least `BF16_MIN_HIDDEN_SIZE` wide; else fp32.
- Any other device: fp32.

Autocast runs the matmuls in bf16 only: the weights, and so the optimizer state, stay fp32, and
the MOTOR loss is computed in fp32 (`model.head.piecewise_exponential_nll`).
"""

from __future__ import annotations

from pathlib import Path

import torch

# Measured on a 2-core CPU with AMX (tokens/s of bf16 autocast over fp32 training, 2,048 tokens
# per batch, 8,192 tasks): 2 layers × 64 hidden 0.79× (slower), 6 × 256 (FFN 512) 1.43×,
# 6 × 768 2.05×.
BF16_MIN_HIDDEN_SIZE = 256

# Read when torch cannot report the CPU's capabilities itself (torch.cpu.get_capabilities is
# recent); only Linux has it.
CPUINFO = Path("/proc/cpuinfo")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 matrices natively (AMX-BF16 or AVX512-BF16)."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        capabilities = get_capabilities()
        return any(bool(capabilities.get(flag, False)) for flag in NATIVE_BF16_FLAGS)
    try:
        lines = CPUINFO.read_text().splitlines()
    except OSError:  # not Linux: no way to tell, so no bf16
        return False
    flags = {flag for line in lines if line.startswith("flags") for flag in line.split()}
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def auto_uses_bf16(device_type: str, hidden_size: int) -> bool:
    """Whether precision "auto" runs a model `hidden_size` wide under bf16 autocast on a device
    of `device_type` ("cuda", "cpu", ...); see the module docstring for the rule."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return hidden_size >= BF16_MIN_HIDDEN_SIZE and cpu_has_native_bf16()
    return False
