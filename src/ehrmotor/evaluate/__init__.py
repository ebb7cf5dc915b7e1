"""`ehrmotor evaluate`: MOTOR embeddings against count features on downstream tasks.

`tasks` builds the labels (held-out outcomes or a MEDS label file) and the count features;
`run` fits the probes, computes the metrics and writes the report.
"""

from ehrmotor.evaluate.run import RESULT_SCHEMA, EvaluationResult, Oracle, evaluate

__all__ = ["RESULT_SCHEMA", "EvaluationResult", "Oracle", "evaluate"]
