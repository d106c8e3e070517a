"""Quantize the model named by the {name} wildcard (every setting is in the short name; the inputs are what the
spec reads, `QuantSpec.inputs()`, plus the model)."""
from quantlib.jobs.steps import quantize
from quantlib.jobs.script import run_script


def main(smk):
    inputs = {key: smk.input[key] for key in smk.input.keys() if key != "model"}
    quantize(smk.wildcards.name, smk.input.model, inputs, smk.output[0], {**smk.config.get("compute", {}),
                                                                         **smk.params.compute})


run_script(snakemake, main)  # noqa: F821
