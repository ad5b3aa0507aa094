"""Stage 1 (rules/models.smk): the toy LM and VLM: build, save and load, tokenizer, training, vision tower, evaluation."""
