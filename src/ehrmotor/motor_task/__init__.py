"""The MOTOR pretraining task: what the model learns to predict at each prediction point.

`occurrences` (a shard's sampled prediction points and the task occurrences that label them; the
labels themselves are derived when batches are collated, `ehrmotor.sequences.batching`) and
`tasks` (which codes are tasks, their time bins and initial rates: `motor_task.json`).
"""
