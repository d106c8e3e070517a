# One generic rule: the solver, init and every setting come from the short name {name}; the inputs are what the
# spec's catalog entries say it reads (QuantSpec.inputs()), so a new statistic or method needs no edit here.


rule quantize:
    input:
        unpack(quantize_inputs),
    output:
        directory(PATHS.quantized),
    params:
        # Only the settings that make the result; chunk sizes and the like are read from the config by the script.
        compute=EXP.compute_params("quantize"),
    log:
        PATHS.log("quantize", "{name}"),
    benchmark:
        PATHS.benchmark("quantize", "{name}")
    threads: TORCH_THREADS
    resources:
        mem_mb=quantize_mem,
        runtime=quantize_runtime,
    conda:
        "../envs/quantize.yaml"
    script:
        "../workflow/scripts/quantize.py"
