# External checkpoint layouts: results/quantized/{name} -> results/packed/{format}/{name} (compressed-tensors
# pack-quantized, GPTQ v2, Any-Precision lookup tables, binary coding; quantlib.checkpoint.pack, docs/packing.md). A packed
# model is evaluated like any other under the name {name}.pack-{format}.


rule pack:
    input:
        pack_input,
    output:
        directory(PATHS.packed.format(format="{packformat}", name="{unpacked}")),
    params:
        pack=EXP.pack_params(),
    log:
        PATHS.log("pack", "{unpacked}.pack-{packformat}"),
    benchmark:
        PATHS.benchmark("pack", "{unpacked}.pack-{packformat}")
    threads: 1
    resources:
        mem_mb=pack_mem,
        runtime=10,
    conda:
        "../envs/quantize.yaml"
    script:
        "../workflow/scripts/pack.py"


# Every other path of results/packed/ (an unknown format, an FP model, ...): its input function stops the DAG with
# the reason (common.smk's pack_refusal); pack goes first wherever both match, so no valid path reaches it. It never
# becomes a job, so it has no action (and no environment).
ruleorder: pack > pack_refused


rule pack_refused:
    input:
        pack_refusal,
    output:
        directory(PATHS.packed.format(format="{anyformat}", name="{anyname}")),
    log:
        PATHS.log("pack_refused", "{anyname}.pack-{anyformat}"),
    wildcard_constraints:
        anyformat=r"[^/]+",
        anyname=r"[^/]+",
    localrule: True
