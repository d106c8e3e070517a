"""Write a dataset's text rows (hub id, local mirror or local files) to one parquet file in the resources folder."""
from quantlib.access.datasets import fetch_dataset
from quantlib.jobs.script import run_script


def main(smk):
    fetch_dataset(smk.params.cfg, smk.output[0], key=smk.wildcards.dataset)


run_script(snakemake, main)  # noqa: F821
