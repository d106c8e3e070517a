"""Aggregate a table's result JSONs into Markdown and CSV."""
from quantlib.tables import write_table
from quantlib.workflow import run_script


def main(smk):
    write_table(smk.params.table, smk.output.md, smk.output.csv)


run_script(snakemake, main)  # noqa: F821
