# One generic rule: the solver, init and every setting come from the short name {name}.


rule quantize:
    input:
        unpack(quantize_inputs),
    output:
        directory("results/quantized/{name}"),
    params:
        compute=EXP.cfg["compute"],
    log:
        "results/logs/quantize/{name}.log",
    benchmark:
        "results/benchmarks/quantize/{name}.tsv"
    threads: TORCH_THREADS
    resources:
        mem_mb=quantize_mem,
        runtime=quantize_runtime,
    conda:
        "../envs/quantize.yaml"
    script:
        "../workflow/scripts/quantize.py"
