"""Stage 3 (rules/features.smk): feature statistics, the adapted, spatial and OCR sets, the lexical filter."""
