# Statistics of the FP model ({stat}: a key of quantlib.catalog.registry.STATISTICS) on the calibration windows {calib},
# computed once and shared by every method whose spec reads them.


rule stats:
    input:
        unpack(stats_inputs),
    output:
        directory(PATHS.stats),
    params:
        compute=EXP.compute_params("stats"),
    log:
        PATHS.log("stats", "{stat}/{calib}"),
    benchmark:
        PATHS.benchmark("stats", "{stat}/{calib}")
    threads: TORCH_THREADS
    resources:
        mem_mb=stats_mem,
        runtime=stats_runtime,
    conda:
        "../envs/quantize.yaml"
    script:
        "../workflow/scripts/stats.py"
