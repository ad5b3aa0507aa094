"""Stage 5 (rules/report.smk): auto-interp evidence and backends, feature dashboards and the report."""
