"""Stand-ins that let femr 0.2.0 / 0.2.1 (the released models' layout) import on a CPU-only machine.

femr 0.2.1 imports `flash_attn` (CUDA only) at module level, but on CPU its attention runs its own
`flash_attn_fallback` (femr.models.flash_attention): the stand-in only has to provide the names.
femr 0.2.1's tasks module imports `esds_spec` (its data schema package, pinned to a version whose
types it uses only in annotations): the stand-in provides `Patient` and `Label` as plain dicts.
femr 0.2.0 imports the same package as `event_stream_data_standard`. `install()` puts these
modules into `sys.modules` before femr is imported.
"""

from __future__ import annotations

import sys
import types

FLASH_NAMES = ("flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func",
               "flash_attn_varlen_func", "flash_attn_varlen_kvpacked_func",
               "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache")


def _cuda_only(*args, **kwargs):
    raise RuntimeError("flash_attn stand-in: CUDA kernels are not available (femr runs its CPU "
                       "fallback attention on CPU tensors)")


def install() -> None:
    flash = types.ModuleType("flash_attn")
    for name in FLASH_NAMES:
        setattr(flash, name, _cuda_only)
    esds = types.ModuleType("esds_spec")
    esds.Patient = dict
    esds.Label = dict
    sys.modules.setdefault("flash_attn", flash)
    sys.modules.setdefault("esds_spec", esds)
    sys.modules.setdefault("event_stream_data_standard", esds)  # femr 0.2.0's name for it
