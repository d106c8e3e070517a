"""Quantize the model named by the {name} wildcard (every setting is in the short name)."""
from quantlib.pipeline import quantize
from quantlib.workflow import run_script


def main(smk):
    quantize(smk.wildcards.name, smk.input.model, smk.input.get("calib"), smk.output[0], smk.params.compute,
             calib_json=smk.input.get("calib_json"))


run_script(snakemake, main)  # noqa: F821
