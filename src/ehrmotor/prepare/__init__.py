"""Stage 1, `ehrmotor prepare`: MEDS + Athena → ontology, split, tokenizer, MOTOR task, windows.

Modules in pipeline order: `athena` and `ontology` (code hierarchy), `split`, `tokenizer`
(vocabulary fit), `motor_task` (task fit), then a subject's way: `positions` (events → position
bags), `windows` (positions → windows, shared with embedding), `labels` (prediction points and
the task occurrences a window keeps; the MOTOR labels themselves are derived at collate, in
`ehrmotor.batching`), `shards` (the per-shard work run in worker processes: a shard's training
rows and the datasets they are written to); `steps` (one function per step, each with its typed
settings and manifest) and `run` (the lock, clean-up and summary around them).
"""

from ehrmotor.prepare.run import ATHENA_FILES, PrepareError, PrepareSummary, prepare

__all__ = ["ATHENA_FILES", "PrepareError", "PrepareSummary", "prepare"]
