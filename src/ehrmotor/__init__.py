"""ehrmotor: MOTOR time-to-event foundation models for MEDS electronic health records."""

__version__ = "0.1.0"
