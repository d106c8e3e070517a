"""Sample the calibration windows named by the {calib} wildcard."""
from quantlib.jobs.steps import calibrate
from quantlib.jobs.script import run_script


def main(smk):
    calibrate(smk.input.model, smk.input.dataset, smk.params.dataset_cfg, smk.wildcards.calib,
              smk.output.tokens, smk.output.manifest)


run_script(snakemake, main)  # noqa: F821
