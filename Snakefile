# Post-training quantization of LLMs as one DAG of artifacts named by short names:
# calibration -> quantization -> evaluation -> paper tables. See README.md; the config is config.yaml
# (or a preset: --configfile presets/<paper>.yaml), validated by quantlib.config before any job starts.

from snakemake.utils import min_version

min_version("9.0")


# A file given with --configfile (a preset, or config.yaml plus an overlay) is the whole experiment; without one,
# config.yaml is. (Snakemake would otherwise merge presets into config.yaml key by key.)
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/stats.smk"
include: "rules/quantize.smk"
include: "rules/distill.smk"
include: "rules/pack.smk"
include: "rules/evaluate.smk"
include: "rules/tables.smk"


rule all:
    input:
        all_tables(),
        EXP.pack_targets(),
        PATHS.benchmark_summary.format(ext="csv"),
    default_target: True
