"""A stand-in for xformers (CUDA only), enough for femr 0.2.4 to import and run on CPU.

femr's fixture script puts the folder above this one first on sys.path. Only what femr 0.2.4
touches exists: `ops.AttentionBias`, `ops.fmha.attn_bias.BlockDiagonalMask` with
`make_local_attention` and `materialize`, and `ops.memory_efficient_attention`.
"""
