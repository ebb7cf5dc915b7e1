"""A subject's events as the model reads them: positions, windows, dataset rows and batches.

`positions` (events → positions, each a bag of vocabulary entries with its time features),
`windows` (positions → windows of at most the context, for training and for label times),
`shards` (the prepared datasets' row layout, files and loading), `batching` (token-budget batches
and collating rows into the model's tensors) and `labelled` (the positions of labelled subjects,
read from MEDS or meds_reader, and each label's position).
"""
