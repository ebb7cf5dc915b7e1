"""The `ehrmotor embed` stage and `ehrmotor.compute_features`: representations at label times.

`features` holds `compute_features` and `write_embeddings`; the featurization path itself, shared
with `evaluate` and `finetune predict`, is `ehrmotor.representations`.
"""

from ehrmotor.embed.features import compute_features, write_embeddings

__all__ = ["compute_features", "write_embeddings"]
