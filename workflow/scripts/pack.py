"""Write the quantized checkpoint {unpacked} in the external layout {packformat}."""
from quantlib.jobs.steps import pack
from quantlib.jobs.script import run_script


def main(smk):
    pack(f"{smk.wildcards.unpacked}.pack-{smk.wildcards.packformat}", smk.input[0], smk.output[0], smk.params.pack)


run_script(snakemake, main)  # noqa: F821
