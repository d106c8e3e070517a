"""Every job's benchmark TSV in one CSV and a per-rule plot, for the report."""
from pathlib import Path

from quantlib.evaluation.benchmarks import summarize_benchmarks
from quantlib.jobs.script import run_script


def main(smk):
    summarize_benchmarks(Path(smk.output.csv).parent, smk.output.csv, smk.output.png)


run_script(snakemake, main)  # noqa: F821
