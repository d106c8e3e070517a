# Downloads into the resources folder (login-node rules on clusters), calibration and evaluation windows.


localrules:
    fetch_model,
    fetch_dataset,


rule fetch_model:
    output:
        directory(f"{RES}/models/{{model}}"),
    params:
        cfg=lambda wc: EXP.model_cfg(wc.model),
    log:
        "results/logs/fetch_model/{model}.log",
    benchmark:
        "results/benchmarks/fetch_model/{model}.tsv"
    threads: TORCH_THREADS
    resources:
        mem_mb=lambda wc: mem_mb_for(wc.model, 2),
        runtime=60,
    priority: 100
    conda:
        "../envs/data.yaml"
    script:
        "../workflow/scripts/fetch_model.py"


rule fetch_dataset:
    output:
        f"{RES}/datasets/{{dataset}}.parquet",
    params:
        cfg=lambda wc: EXP.dataset_cfg(wc.dataset),
    log:
        "results/logs/fetch_dataset/{dataset}.log",
    benchmark:
        "results/benchmarks/fetch_dataset/{dataset}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    priority: 100
    conda:
        "../envs/data.yaml"
    script:
        "../workflow/scripts/fetch_dataset.py"


rule calibration:
    input:
        unpack(calib_inputs),
    output:
        tokens="results/calibration/{calib}.pt",
        manifest="results/calibration/{calib}.json",
    params:
        dataset_cfg=calib_dataset_cfg,
    log:
        "results/logs/calibration/{calib}.log",
    benchmark:
        "results/benchmarks/calibration/{calib}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/data.yaml"
    script:
        "../workflow/scripts/calibration.py"


rule eval_windows:
    input:
        model=f"{RES}/models/{{model}}",
        dataset=f"{RES}/datasets/{{dataset}}.parquet",
    output:
        "results/evaldata/{model}/{dataset}.L{seqlen}.pt",
    params:
        dataset_cfg=lambda wc: EXP.dataset_cfg(wc.dataset),
    log:
        "results/logs/eval_windows/{model}/{dataset}.L{seqlen}.log",
    benchmark:
        "results/benchmarks/eval_windows/{model}/{dataset}.L{seqlen}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/data.yaml"
    script:
        "../workflow/scripts/eval_windows.py"
