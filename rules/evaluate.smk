# Evaluation of a quantized ({name}) or unquantized ({model}.fp) model.
#
# Perplexity of a quantized ({name}) or unquantized ({model}.fp) model on every perplexity dataset of the config, one
# result JSON per protocol {dataset}.L{seqlen}[.nw{n}]. One job per model: loading it once saves a model load and the
# library imports per dataset.


rule perplexity:
    input:
        unpack(ppl_inputs),
    output:
        [PATHS.ppl.format(protocol=protocol, anyname="{anyname}") for protocol in EXP.ppl_protocols()],
    params:
        protocols=EXP.ppl_protocols(),
        dataset_cfgs=EXP.ppl_dataset_cfgs(),
        compute=EXP.compute_params("evaluate"),
        batch_size=EXP.cfg["perplexity"]["batch_size"],
    log:
        PATHS.log("perplexity", "{anyname}"),
    benchmark:
        PATHS.benchmark("perplexity", "{anyname}")
    threads: TORCH_THREADS
    resources:
        mem_mb=ppl_mem,
        runtime=ppl_runtime,
    conda:
        "../envs/evaluate.yaml"
    script:
        "../workflow/scripts/perplexity.py"


# lm-eval tasks through lm-eval's own API on the loaded model, one result JSON per protocol
# {task}.{shots}shot[.lim{limit}]. One job per model for every task: the model load and the lm-eval import are its
# fixed costs.
if EXP.lmeval_protocols():

    rule lmeval:
        input:
            model=model_input,
        output:
            [PATHS.lmeval.format(protocol=protocol, anyname="{anyname}") for protocol in EXP.lmeval_protocols()],
        params:
            protocols=EXP.lmeval_protocols(),
            lmeval=EXP.lmeval_params(),
            compute=EXP.compute_params("evaluate"),
        log:
            PATHS.log("lmeval", "{anyname}"),
        benchmark:
            PATHS.benchmark("lmeval", "{anyname}")
        threads: TORCH_THREADS
        resources:
            mem_mb=lmeval_mem,
            runtime=lmeval_runtime,
        conda:
            "../envs/evaluate.yaml"
        script:
            "../workflow/scripts/lmeval.py"
