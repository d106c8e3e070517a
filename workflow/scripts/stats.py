"""A statistic of the FP model ({stat}) on the calibration windows {calib}, shared by every method that needs it."""
from quantlib.jobs.steps import statistic
from quantlib.jobs.script import run_script


def main(smk):
    needs = {key: smk.input[key] for key in smk.input.keys() if key not in ("model", "tokens")}
    statistic(smk.wildcards.stat, smk.wildcards.calib, smk.input.model, smk.input.tokens, smk.output[0],
              {**smk.config.get("compute", {}), **smk.params.compute}, needs)


run_script(snakemake, main)  # noqa: F821
