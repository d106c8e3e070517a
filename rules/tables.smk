# Paper tables: every table of the config reads its result JSONs and writes Markdown, CSV, LaTeX and a plot, all but
# the LaTeX marked for `snakemake --report`. The benchmark summary gathers every job's benchmark TSV for the report.


rule table:
    input:
        lambda wc: EXP.table_inputs(wc.table),
    output:
        md=report(
            "results/tables/{table}.md",
            caption="../report/table.rst",
            category="Paper tables",
            subcategory="{table}",
            labels={"table": "{table}", "file": "Markdown"},
        ),
        csv=report(
            "results/tables/{table}.csv",
            caption="../report/table.rst",
            category="Paper tables",
            subcategory="{table}",
            labels={"table": "{table}", "file": "CSV (long format)"},
        ),
        tex="results/tables/{table}.tex",
        png=report(
            "results/tables/{table}.png",
            caption="../report/plot.rst",
            category="Paper tables",
            subcategory="{table}",
            labels={"table": "{table}", "file": "plot"},
        ),
    params:
        table=lambda wc: EXP.table_params(wc.table),
    log:
        "results/logs/table/{table}.log",
    benchmark:
        "results/benchmarks/table/{table}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/tables.yaml"
    script:
        "../workflow/scripts/table.py"


# Runs after the tables, so every job that they need has written its benchmark; reads the TSVs that exist (jobs that
# were up to date keep their earlier ones).
rule benchmark_summary:
    input:
        all_tables(),
    output:
        csv=report(
            "results/benchmarks/summary.csv",
            caption="../report/benchmarks.rst",
            category="Benchmarks",
            labels={"file": "per-job CSV"},
        ),
        png=report(
            "results/benchmarks/summary.png",
            caption="../report/benchmarks.rst",
            category="Benchmarks",
            labels={"file": "per-rule plot"},
        ),
    log:
        "results/logs/benchmark_summary.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/tables.yaml"
    script:
        "../workflow/scripts/benchmark_summary.py"
