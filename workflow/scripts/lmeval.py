"""lm-eval tasks on one model, one result JSON per task protocol."""
from quantlib.jobs.steps import lm_eval_tasks
from quantlib.jobs.script import run_script


def main(smk):
    cfg = smk.params.lmeval
    lm_eval_tasks(smk.wildcards.anyname, smk.input.model, cfg["tasks"], dict(zip(smk.params.protocols, smk.output)),
                  {**smk.config.get("compute", {}), **smk.params.compute}, cfg["batch_size"], cfg["bootstrap_iters"])


run_script(snakemake, main)  # noqa: F821
