# vlmdiff: stage-wise model diffing of a language model and its vision-language fine-tune.
# Run:  snakemake --cores N            (embedded default, config.yaml)
#       snakemake --cores N --configfile presets/tiny.yaml
from snakemake.utils import min_version

min_version("8.20")


configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/world.smk"
include: "rules/models.smk"


rule all:
    input:
        all_targets(),
    default_target: True
