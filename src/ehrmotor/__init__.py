"""ehrmotor: MOTOR time-to-event foundation models for MEDS electronic health records.

After `import ehrmotor`, transformers' Auto classes know the "ehrmotor" model type
(`AutoConfig`, `AutoModel` -> `MotorEncoder`, `AutoModelForPreTraining` -> `MotorModel`; see
`ehrmotor.model`). Registering imports torch (seconds), so it waits until transformers itself is
imported: the command line, which imports neither for most commands, starts without it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """`ehrmotor.compute_features`, imported on first use (torch is slow to import)."""
    if name == "compute_features":
        from ehrmotor.embed import compute_features

        return compute_features
    raise AttributeError(f"module 'ehrmotor' has no attribute {name!r}")


def _register_with_transformers() -> None:
    """Import `ehrmotor.model`, which registers it with the Auto classes; a failure is logged,
    never raised into the user's `import transformers`."""
    if "ehrmotor.model" in sys.modules:
        return  # being imported (it imports transformers) or done: it registers itself
    try:
        importlib.import_module("ehrmotor.model")
    except Exception as error:  # noqa: BLE001 - the user's import of transformers must succeed
        logging.getLogger(__name__).warning(
            "ehrmotor: could not register with transformers' Auto classes: %s", error)


class _AfterTransformers(importlib.abc.MetaPathFinder):
    """Finds `transformers` as the other finders do and registers ehrmotor once it has run."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)  # once; and not while the other finders search
        spec = importlib.util.find_spec(fullname)
        loader = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            _register_with_transformers()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if "transformers" in sys.modules:
    _register_with_transformers()
elif not any(isinstance(finder, _AfterTransformers) for finder in sys.meta_path):
    sys.meta_path.insert(0, _AfterTransformers())
