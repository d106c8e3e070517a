"""Distil the quantized model named by {base}.kd.{kd}: the base checkpoint's codes fixed, its scales, zeros and
norm gains trained against the FP model."""
from quantlib.jobs.steps import distill
from quantlib.jobs.script import run_script


def main(smk):
    inputs = {key: smk.input[key] for key in smk.input.keys() if key != "model"}
    distill(f"{smk.wildcards.base}.kd.{smk.wildcards.kd}", smk.input.model, inputs, smk.output[0],
            {**smk.config.get("compute", {}), **smk.params.compute})


run_script(snakemake, main)  # noqa: F821
