# Lightweight distillation of a quantized model (NeUQI): {base}.kd.{dataset}.n{N}.L{L}[.s{seed}][.{option}...].
# The codes of the base checkpoint stay; its scales, zeros and norm gains train against the FP model; the output is
# a checkpoint of the same format, which perplexity, lm-eval and tables read like any other.


rule distill:
    input:
        unpack(distill_inputs),
    output:
        directory(PATHS.quantized.format(name="{base}.kd.{kd}")),
    params:
        compute=EXP.compute_params("quantize"),
    log:
        PATHS.log("distill", "{base}.kd.{kd}"),
    benchmark:
        PATHS.benchmark("distill", "{base}.kd.{kd}")
    threads: TORCH_THREADS
    resources:
        mem_mb=distill_mem,
        runtime=distill_runtime,
    conda:
        "../envs/quantize.yaml"
    script:
        "../workflow/scripts/distill.py"
