"""Aggregate a table's result JSONs into Markdown, CSV, LaTeX and a plot."""
from quantlib.evaluation.tables import write_table
from quantlib.jobs.script import run_script


def main(smk):
    write_table(smk.params.table, smk.output.md, smk.output.csv, smk.output.tex, smk.output.png)


run_script(snakemake, main)  # noqa: F821
