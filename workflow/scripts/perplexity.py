"""Perplexity of one model under every protocol of the config, one result JSON each."""
from quantlib.jobs.steps import perplexity
from quantlib.jobs.script import run_script


def main(smk):
    perplexity(smk.wildcards.anyname, smk.input.model, {p: smk.input[p] for p in smk.params.protocols},
               smk.params.dataset_cfgs, dict(zip(smk.params.protocols, smk.output)),
               {**smk.config.get("compute", {}), **smk.params.compute},
               smk.params.batch_size)


run_script(snakemake, main)  # noqa: F821
