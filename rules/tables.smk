# Paper tables: every table of the config reads its result JSONs and writes Markdown and CSV.


rule table:
    input:
        lambda wc: EXP.table_inputs(wc.table),
    output:
        md="results/tables/{table}.md",
        csv="results/tables/{table}.csv",
    params:
        table=lambda wc: EXP.table_params(wc.table),
    log:
        "results/logs/table/{table}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/tables.yaml"
    script:
        "../workflow/scripts/table.py"
