"""Stage 1, `ehrmotor prepare`: MEDS + Athena → ontology, split, tokenizer, MOTOR task, windows.

Modules in pipeline order: `athena` and `ontology` (code hierarchy), `split`, `tokenizer`
(vocabulary fit and encoding), `positions` (events → position bags), `labels` (prediction points
and MOTOR labels), `motor_task` (task fit), `windows` (positions → windows, shared with
embedding), `examples` (a shard's training rows), `datasets` (writing them), `label_cache` (a
shard's labels, computed once by the task step and reused by the dataset step), `shards` (the
per-shard work run in worker processes), `steps` (one function per step, each with its typed
settings and manifest) and `run` (the lock, clean-up and summary around them).
"""

from ehrmotor.prepare.run import ATHENA_FILES, PrepareError, PrepareSummary, prepare

__all__ = ["ATHENA_FILES", "PrepareError", "PrepareSummary", "prepare"]
