"""Stage 4 (rules/causal.smk): attribution patching to heads, ablation, steering, overlays and their figures."""
