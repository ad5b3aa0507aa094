"""Stage 2 (rules/sae.smk): the TopK SAE, its training, adaptation to the VLM, and splice evaluation."""
