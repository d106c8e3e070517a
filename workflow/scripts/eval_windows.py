"""Tokenize an evaluation dataset into windows of {seqlen} tokens under its protocol."""
from quantlib.jobs.steps import make_eval_windows
from quantlib.jobs.script import run_script


def main(smk):
    make_eval_windows(smk.input.model, smk.input.dataset, smk.params.dataset_cfg, int(smk.wildcards.seqlen),
                      smk.output[0])


run_script(snakemake, main)  # noqa: F821
