"""The `ehrmotor convert-femr` stage: a femr model folder into an ehrmotor bundle (`convert_femr`).

What runs the bundle it writes (femr's models, tokenizer and featurization) is the library
`ehrmotor.femr`.
"""
