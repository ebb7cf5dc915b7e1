"""The embedded synthetic EHR: a MEDS 0.4 producer used by the demo, tests and benchmarks.

Nothing in the pipeline imports this package; see `generate` for the layout it writes and
`simulate` for the planted structure.
"""

from ehrmotor.synthetic.generate import generate, true_hazards
from ehrmotor.synthetic.hazards import OUTCOMES

__all__ = ["OUTCOMES", "generate", "true_hazards"]
