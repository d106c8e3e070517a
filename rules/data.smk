# Downloads into the resources folder (login-node rules on clusters), calibration and evaluation windows.


localrules:
    fetch_model,
    fetch_dataset,


rule fetch_model:
    input:
        hub_preflight("model"),
    output:
        directory(PATHS.models.format(resources=RES, model="{model}")),
    params:
        # Only what makes the artifact: the group sizes the fetch checks come from the config in the job, so adding
        # a method never refetches the model (and reruns everything after it).
        cfg=lambda wc: EXP.model_cfg(wc.model),
    log:
        PATHS.log("fetch_model", "{model}"),
    benchmark:
        PATHS.benchmark("fetch_model", "{model}")
    threads: TORCH_THREADS
    resources:
        mem_mb=lambda wc: job_mem("fetch", wc.model, None),
        runtime=60,
    priority: 100
    conda:
        "../envs/data.yaml"
    script:
        "../workflow/scripts/fetch_model.py"


rule fetch_dataset:
    input:
        hub_preflight("dataset"),
    output:
        PATHS.datasets.format(resources=RES, dataset="{dataset}"),
    params:
        cfg=lambda wc: EXP.dataset_cfg(wc.dataset),
    log:
        PATHS.log("fetch_dataset", "{dataset}"),
    benchmark:
        PATHS.benchmark("fetch_dataset", "{dataset}")
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
        tokens=PATHS.calibration,
        manifest=PATHS.calibration_manifest,
    params:
        dataset_cfg=calib_dataset_cfg,
    log:
        PATHS.log("calibration", "{calib}"),
    benchmark:
        PATHS.benchmark("calibration", "{calib}")
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
        model=PATHS.models.format(resources=RES, model="{model}"),
        dataset=PATHS.datasets.format(resources=RES, dataset="{dataset}"),
    output:
        PATHS.evaldata,
    params:
        dataset_cfg=lambda wc: EXP.dataset_cfg(wc.dataset),
    log:
        PATHS.log("eval_windows", "{model}/{dataset}.L{seqlen}"),
    benchmark:
        PATHS.benchmark("eval_windows", "{model}/{dataset}.L{seqlen}")
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/data.yaml"
    script:
        "../workflow/scripts/eval_windows.py"
