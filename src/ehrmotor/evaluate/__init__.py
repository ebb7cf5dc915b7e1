"""`ehrmotor evaluate`: MOTOR embeddings against count features on downstream tasks.

`tasks` builds the labels (held-out outcomes or a MEDS label file), `counts` the count-feature
baseline; `probes` fits the linear probes, scored with `metrics`; `run` is the stage (pool and
test split, train sizes, bootstrap intervals) and `report` writes the table and the plot.
"""

from ehrmotor.evaluate.run import RESULT_SCHEMA, EvaluationResult, Oracle, evaluate

__all__ = ["RESULT_SCHEMA", "EvaluationResult", "Oracle", "evaluate"]
