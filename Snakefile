# vlmdiff: stage-wise model diffing of a language model and its vision-language fine-tune.
# Run:  snakemake --cores N            (embedded default, config.yaml)
#       snakemake --cores N --configfile presets/tiny.yaml
import os

from snakemake.utils import min_version

min_version("8.20")


# The embedded default; `--configfile PRESET` is merged over it.
configfile: os.path.join(workflow.basedir, "config.yaml")


include: "rules/common.smk"
include: "rules/world.smk"
include: "rules/models.smk"
include: "rules/cache.smk"
include: "rules/sae.smk"
include: "rules/features.smk"
include: "rules/causal.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        all_targets(),
