"""Stage 1, `ehrmotor prepare`: MEDS + Athena → ontology, split, tokenizer, MOTOR task, windows.

The stage only: `steps` (one function per step, each with its typed settings and manifest), `run`
(the lock, clean-up and summary around them), `split` (the train/val and held-out splits),
`shard_jobs` (the per-shard work run in worker processes: a shard's training rows, written in the
layout of `ehrmotor.sequences.shards`) and `executors` (local processes or Ray). What the steps
fit and build lives in the library packages: `ehrmotor.vocabulary` (ontology, tokenizer, bags),
`ehrmotor.sequences` (positions, windows, the dataset rows) and `ehrmotor.motor_task`.
"""

from ehrmotor.prepare.run import ATHENA_FILES, PrepareError, PrepareSummary, prepare

__all__ = ["ATHENA_FILES", "PrepareError", "PrepareSummary", "prepare"]
