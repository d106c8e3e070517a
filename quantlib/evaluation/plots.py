"""The plot beside each paper table: every metric against bits per method (perplexity on a log axis, FP as a dashed
line), and, when the table records paper figures, ours against the paper's with the y = x line."""

from __future__ import annotations

import math

import pandas as pd

from quantlib.artifacts.atomic import atomic_file


def _lower_is_better(df: pd.DataFrame, metric: str) -> bool:
    return set(df.loc[df.metric == metric, "unit"]) <= {"ppl", "raw"}


def _log_axis(ax, which: str, values) -> None:
    """A log scale labelled with plain numbers (20, 30, 40 rather than 2x10^1); minor ticks are labelled too
    when the values span less than a decade."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    lo, hi = float(min(values)), float(max(values))
    if lo > 0 and 10 <= hi / lo < 1000:  # a decade or two: 1-2-5 ticks, else a single label may be all there is
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(plain)
    axis.set_minor_formatter(plain if lo > 0 and hi / lo < 10 else NullFormatter())


def plot_table(df: pd.DataFrame, params: dict, out_png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in params.get("columns") or dict.fromkeys(df["metric"]) if c in set(df["metric"])]
    labels = params.get("metric_labels", {})
    row_labels = params.get("row_labels", {})
    multi_model = df["model"].nunique() > 1
    model_labels = params.get("model_labels", {})
    lower = {m: _lower_is_better(df, m) for m in set(df["metric"])}
    # One "ours vs paper" panel per kind of figure that has paper values: perplexity-like, accuracy-like.
    kinds = [k for k in (True, False) if (df["paper"].notna() & (df["metric"].map(lower) == k)).any()]
    n = len(columns) + len(kinds)
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.6 * nrows + 0.9), squeeze=False)
    flat = list(axes.flat)
    methods = [r for r in params.get("rows", []) if r != "fp"]
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    styles = ["-", "--", ":", "-."]
    groups = sorted({g for g in df["group"] if g != "-"}, key=lambda g: (g == "per-channel", g))
    markers = ["o", "s", "^", "D", "v"]
    handles = {}
    for ax, metric in zip(flat, columns):
        sub = df[df.metric == metric]
        bits = sorted({int(b) for b in sub["bits"] if b != "FP"})
        # With one bit width every point would share one x: spread the (method, group) series side by side.
        series = list(dict.fromkeys(zip(sub.loc[sub.method != "fp", "method"], sub.loc[sub.method != "fp", "group"])))
        spread = 0.8 / len(series) if len(bits) == 1 and len(series) > 1 else 0.0
        for model_i, (model, msub) in enumerate(sub.groupby("model", sort=False)):
            prefix = f"{model_labels.get(model, model)}: " if multi_model else ""
            for _, fp in msub[msub.method == "fp"].iterrows():
                h = ax.axhline(fp["value"], color="0.4", ls=(0, (4, 3)), lw=1.2)
                handles.setdefault(f"{prefix}FP", h)
            for (method, group), g in msub[msub.method != "fp"].groupby(["method", "group"], sort=False):
                offset = (series.index((method, group)) - (len(series) - 1) / 2) * spread
                g = g.assign(b=g["bits"].astype(int) + offset).sort_values("b")
                name = f"{prefix}{row_labels.get(method, method)}, {'g' + group if group.isdigit() else group}"
                gi = groups.index(group) if group in groups else 0
                (h,) = ax.plot(g["b"], g["value"], marker=markers[gi % len(markers)], ms=4,
                               color=colors.get(method, "k"), ls=styles[(gi + model_i) % len(styles)])
                if "std" in g and g["std"].notna().any():  # replicates: one standard deviation
                    ax.errorbar(g["b"], g["value"], yerr=g["std"].fillna(0), fmt="none", capsize=3, lw=1,
                                color=colors.get(method, "k"))
                handles.setdefault(name, h)
        if bits:
            ax.set_xticks(bits)
            if spread:
                ax.set_xlim(bits[0] - 0.5, bits[0] + 0.5)
        if lower[metric]:
            _log_axis(ax, "y", sub["value"])
        unit = " (%)" if set(sub["unit"]) == {"%"} else ""
        ax.set_title(f"{labels.get(metric, metric)}{unit} {'↓' if lower[metric] else '↑'}",
                     fontsize=10)
        ax.set_xlabel("bits per weight (nominal)")
        ax.grid(True, which="both", alpha=0.3)
    for ax, kind in zip(flat[len(columns):], kinds):
        sub = df[df["paper"].notna() & (df["metric"].map(lower) == kind)]
        for method, g in sub.groupby("method", sort=False):
            ax.scatter(g["paper"], g["value"], color=colors.get(method, "0.3"), s=22, zorder=3)
            if len(sub) <= 16:
                for _, r in g.iterrows():
                    what = "FP" if r["setting"] == "fp" else f"{row_labels.get(method, method)} {r['setting']}"
                    ax.annotate(f"{what} {labels.get(r['metric'], r['metric'])}", (r["paper"], r["value"]),
                                fontsize=6, xytext=(3, 3), textcoords="offset points")
        lo = min(sub["paper"].min(), sub["value"].min())
        hi = max(sub["paper"].max(), sub["value"].max())
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=1, ls="--", label="y = x")
        if kind:
            _log_axis(ax, "x", [lo, hi])
            _log_axis(ax, "y", [lo, hi])
        ax.set_xlabel("paper")
        ax.set_ylabel("ours")
        ax.set_title("ours vs paper: " + ("perplexity" if kind else "accuracy (%)"), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    for ax in flat[n:]:
        ax.set_visible(False)
    fig.suptitle(params["title"], fontsize=11)
    # As many legend columns as fit the figure's width (a label is up to ~3.4 inches at this font size).
    legend_cols = max(1, min(4, len(handles), int(fig.get_figwidth() // 3.4)))
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=legend_cols, fontsize=8,
                   frameon=False)
    legend_rows = math.ceil(len(handles) / legend_cols) if handles else 0
    fig.set_figheight(fig.get_figheight() + 0.18 * max(0, legend_rows - 1))
    fig.tight_layout(rect=(0, (0.3 + 0.18 * legend_rows) / fig.get_figheight(), 1, 0.97))
    with atomic_file(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
