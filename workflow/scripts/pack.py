"""Write the quantized checkpoint {unpacked} in the external layout {packformat}."""
from quantlib.jobs.script import run_script
from quantlib.jobs.steps import pack


def main(smk):
    pack(f"{smk.wildcards.unpacked}.pack-{smk.wildcards.packformat}", smk.input[0], smk.output[0], smk.params.pack,
         smk.config.get("compute", {}))


run_script(snakemake, main)  # noqa: F821
