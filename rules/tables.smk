# Paper tables: every table of the config reads its result JSONs and writes Markdown, CSV, LaTeX and a plot, all but
# the LaTeX marked for `snakemake --report`. The benchmark summary gathers every job's benchmark TSV for the report.


rule table:
    input:
        lambda wc: EXP.table_inputs(wc.table),
    output:
        md=report(
            PATHS.tables.format(table="{table}", ext="md"),
            caption="../report/table.rst",
            category="Paper tables",
            subcategory="{table}",
            labels={"table": "{table}", "file": "Markdown"},
        ),
        csv=report(
            PATHS.tables.format(table="{table}", ext="csv"),
            caption="../report/table.rst",
            category="Paper tables",
            subcategory="{table}",
            labels={"table": "{table}", "file": "CSV (long format)"},
        ),
        tex=PATHS.tables.format(table="{table}", ext="tex"),
        png=report(
            PATHS.tables.format(table="{table}", ext="png"),
            caption="../report/plot.rst",
            category="Paper tables",
            subcategory="{table}",
            labels={"table": "{table}", "file": "plot"},
        ),
    params:
        table=lambda wc: EXP.table_params(wc.table),
    log:
        PATHS.log("table", "{table}"),
    benchmark:
        PATHS.benchmark("table", "{table}")
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
            PATHS.benchmark_summary.format(ext="csv"),
            caption="../report/benchmarks.rst",
            category="Benchmarks",
            labels={"file": "per-job CSV"},
        ),
        png=report(
            PATHS.benchmark_summary.format(ext="png"),
            caption="../report/benchmarks.rst",
            category="Benchmarks",
            labels={"file": "per-rule plot"},
        ),
    log:
        PATHS.log("benchmark_summary", "summary"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/tables.yaml"
    script:
        "../workflow/scripts/benchmark_summary.py"


# The same summary after one table (for a report of a partial run:
# `snakemake --report report.html results/tables/main.md results/benchmarks/summary.main.csv`).
use rule benchmark_summary as table_benchmark_summary with:
    input:
        expand(PATHS.tables, table="{table}", ext=TABLE_FORMATS),
    output:
        csv=report(
            PATHS.benchmark_summary.format(ext="{table}.csv"),
            caption="../report/benchmarks.rst",
            category="Benchmarks",
            labels={"file": "per-job CSV"},
        ),
        png=report(
            PATHS.benchmark_summary.format(ext="{table}.png"),
            caption="../report/benchmarks.rst",
            category="Benchmarks",
            labels={"file": "per-rule plot"},
        ),
    log:
        PATHS.log("benchmark_summary", "{table}"),
