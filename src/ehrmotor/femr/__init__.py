"""femr's models, to run the bundles `ehrmotor convert-femr` writes as femr runs them.

`model` (femr 0.2.4's hybrid encoder, and the files of a converted bundle), `released` (the
layout of femr's released models, femr 0.2.0 / 0.2.1), `tokens` (femr 0.2.4's hierarchical
tokenizer and batch positions) and `features` (`compute_features` of a converted bundle, to which
`ehrmotor.embed.compute_features` hands one). The conversion itself, reading a femr model folder,
is the `ehrmotor.convert` stage.
"""
