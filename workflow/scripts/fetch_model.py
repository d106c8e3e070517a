"""Materialise a model (hub id, local directory or GGUF) as a plain checkpoint in the resources folder."""
from quantlib.access.models import fetch_model
from quantlib.config.experiment import Experiment
from quantlib.jobs.script import run_script


def main(smk):
    cfg = smk.params.cfg
    checks = Experiment(smk.config).shape_checks(smk.wildcards.model)  # not a param: they do not make the artifact
    fetch_model(cfg["source"], smk.output[0], gguf_file=cfg.get("gguf_file"), revision=cfg.get("revision"),
                tokenizer=cfg.get("tokenizer"), shape_checks=checks, model_key=smk.wildcards.model)


run_script(snakemake, main)  # noqa: F821 (injected by Snakemake)
