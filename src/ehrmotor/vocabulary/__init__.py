"""The vocabulary: codes, their hierarchy and the tokenizer fitted on them.

`athena` (reading an OHDSI Athena download) and `ontology` (each code's parents), `tokenizer`
(vocabulary entries of codes, numeric bins and text values) and `bags` (the ancestor bags the
tokenizer writes once, expanded when batches are collated). `ehrmotor prepare` fits them; every
stage that reads a bundle loads them.
"""
