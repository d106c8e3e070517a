"""Material for `snakemake --report` beyond the tables: every job's benchmark TSV gathered into one CSV and a
per-rule plot (wall time and peak memory)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from quantlib.artifacts.atomic import atomic_file
from quantlib.errors import DataError


def read_benchmarks(root: str | Path) -> pd.DataFrame:
    """One row per benchmark TSV under `root` ({root}/{rule}/{job...}.tsv): rule, job and Snakemake's figures
    (s = wall seconds, max_rss in MB, cpu_time in seconds, ...); the mean where a job was benchmarked repeatedly."""
    root = Path(root)
    rows = []
    for path in sorted(root.rglob("*.tsv")):
        rel = path.relative_to(root)
        if len(rel.parts) < 2:
            continue
        try:
            bench = pd.read_csv(path, sep="\t")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise DataError(f"benchmark file {path} is unreadable ({exc}); delete it") from None
        numeric = bench.select_dtypes("number").mean()
        rows.append({"rule": rel.parts[0], "job": str(rel.with_suffix(""))[len(rel.parts[0]) + 1:],
                     **{k: round(float(v), 3) for k, v in numeric.items()}})
    return pd.DataFrame(rows)


def summarize_benchmarks(root: str | Path, out_csv, out_png) -> pd.DataFrame:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = read_benchmarks(root)
    with atomic_file(out_csv) as tmp:
        df.to_csv(tmp, index=False)
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * max(4, df["rule"].nunique() if len(df) else 1) + 1.5))
    if len(df):
        per_rule = df.groupby("rule").agg(jobs=("job", "size"), total_s=("s", "sum"), max_s=("s", "max"),
                                          max_rss=("max_rss", "max")).sort_values("total_s")
        y = range(len(per_rule))
        axes[0].barh(y, per_rule["total_s"], color="tab:blue", label="all jobs")
        axes[0].barh(y, per_rule["max_s"], color="tab:orange", height=0.4, label="slowest job")
        for i, (_, r) in enumerate(per_rule.iterrows()):
            jobs = int(r["jobs"])
            axes[0].annotate(f" {jobs} job{'s' if jobs > 1 else ''}", (r["total_s"], i), va="center", fontsize=8)
        axes[0].set_yticks(list(y), per_rule.index)
        axes[0].set_xlabel("wall time (s)")
        if per_rule["total_s"].max() > 100 * max(per_rule["total_s"].min(), 1e-3):
            axes[0].set_xscale("log")
        axes[0].legend(fontsize=8, loc="lower right")
        axes[1].barh(y, per_rule["max_rss"].fillna(0), color="tab:green")
        axes[1].set_yticks(list(y), [""] * len(per_rule))
        axes[1].set_xlabel("peak resident memory (MB)")
    for ax in axes:
        ax.grid(True, axis="x", alpha=0.3)
    total = df["s"].sum() if len(df) else 0.0
    fig.suptitle(f"Snakemake benchmarks: {len(df)} jobs, {math.floor(total / 60)} min {total % 60:.0f} s of wall "
                 "time in all", fontsize=11)
    fig.tight_layout()
    with atomic_file(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return df
