"""ehrmotor: MOTOR time-to-event foundation models for MEDS electronic health records."""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """`ehrmotor.compute_features`, imported on first use (torch is slow to import)."""
    if name == "compute_features":
        from ehrmotor.embed import compute_features

        return compute_features
    raise AttributeError(f"module 'ehrmotor' has no attribute {name!r}")
