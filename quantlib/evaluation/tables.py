"""Paper-table aggregation: result JSONs -> one tidy frame -> Markdown, CSV and LaTeX (and a plot, quantlib.evaluation.plots),
ours beside the paper's figure with the difference.

A table column is a metric: a perplexity dataset (`wikitext2`, read from `value` of results/ppl/...), an lm-eval
task metric (`arc_easy.acc_norm`, read from `metrics` of results/lmeval/...; `winogrande.acc_norm|acc` takes the
first one the task reports, UniQuanF's rule), or an average of task metrics declared in the table's `averages`.
Accuracies are shown in percent, as the papers print them; paper figures are given in the same units.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from quantlib.artifacts.atomic import atomic_file
from quantlib.catalog.names import require_setting
from quantlib.catalog.registry import format_entry
from quantlib.catalog.spec import QuantSpec
from quantlib.errors import ConfigError, DataError
from quantlib.evaluation.metrics import LOWER_IS_BETTER as _LOWER_TASK_METRICS
from quantlib.evaluation.plots import plot_table

LOWER_IS_BETTER = {"ppl"}


# ------------------------------------------------------------------------------------------------ reading results

def load_result(path: str | Path, metric: str | None = None) -> dict:
    """A result JSON, or a DataError naming the file (missing, unreadable, or without the figure the table needs).
    `metric` is None or a perplexity dataset (the record needs a numeric `value`), or `{task}.{field}` (the record
    needs `metrics`)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"result file {path} is missing; re-run the workflow to produce it")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"result file {path} is not valid JSON ({exc}); delete it and re-run the workflow") from None
    if metric is not None and "." in metric:
        if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
            raise DataError(f"result file {path} has no 'metrics' of an lm-eval task; delete it and re-run the workflow")
    elif not isinstance(record, dict) or not isinstance(record.get("value"), (int, float)):
        raise DataError(f"result file {path} has no numeric 'value'; delete it and re-run the workflow")
    return record


def task_field(record: dict, metric: str, path) -> tuple[str, float]:
    """The field of `{task}.{a|b|...}` that the record reports first, and its value."""
    task, _, fields = metric.partition(".")
    for field in fields.split("|"):
        value = record["metrics"].get(field)
        if isinstance(value, (int, float)):
            return field, float(value)
    have = ", ".join(k for k, v in record["metrics"].items() if isinstance(v, (int, float)))
    raise DataError(f"result file {path} has no {' or '.join(fields.split('|'))} for task '{task}' (it has: {have}); "
                    "name one of those in the table's metrics")


def _paper_value(paper: dict, model: str, row: str, setting: str | None, metric: str):
    figures = paper.get(model, {})
    key = row if setting is None else f"{row}.{setting}"
    value = figures.get(key, {}).get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def _setting_parts(setting: str | None) -> tuple[str, str]:
    if setting is None:
        return "FP", "-"
    bits, group = require_setting(setting)
    return str(bits), str(group) if group > 0 else "per-channel"


def collect(params: dict) -> pd.DataFrame:
    """Long table: one row per (model, method, setting, metric), averages included."""
    rows = []
    paper = params.get("paper") or {}
    for cell in params["cells"]:
        metric = cell["metric"]
        record = load_result(cell["path"], metric)
        if "." in metric:
            field, value = task_field(record, metric, cell["path"])
            unit = "raw" if field in _LOWER_TASK_METRICS else "%"
            value = value * 100 if unit == "%" else value
            protocol = _task_protocol_text(record)
        else:
            field, value, unit, protocol = "ppl", float(record["value"]), "ppl", _protocol_text(record)
        rows.append(_row(cell, metric, value, unit, field, protocol, paper,
                         _evaluation_bits(record) if cell["row"] == "fp" else record.get("bits_per_weight")))
    df = pd.DataFrame(rows)
    averages = params.get("averages") or {}
    extra = []
    for key, parts in averages.items():
        sub = df[df.metric.isin(parts)]
        for (model, row, setting, seed), g in sub.groupby(["model", "method", "setting", "seed"], sort=False,
                                                          dropna=False):
            if set(g.metric) != set(parts):
                continue
            cell = {"model": model, "row": row, "setting": None if setting == "fp" else setting,
                    "name": g["name"].iloc[0], "path": None, "seed": None if pd.isna(seed) else seed}
            labels = params.get("metric_labels", {})
            text = "mean of " + ", ".join(labels.get(p, p) for p in parts)
            extra.append(_row(cell, key, float(g["value"].mean()), g["unit"].iloc[0], "mean", text, paper,
                              g["bits_per_weight"].iloc[0]))
    if extra:
        df = pd.concat([df, pd.DataFrame(extra)], ignore_index=True)
    return df


def _evaluation_bits(record: dict) -> int | None:
    """Bits per weight an unquantized model was evaluated with: its evaluation dtype (float32 on a CPU), not the
    16 bits it may be stored in."""
    parts = [record.get("protocol"), record.get("compute")]  # perplexity and lm-eval results record it differently
    dtype = next((p["dtype"] for p in parts if isinstance(p, dict) and p.get("dtype")), "")
    return {"float32": 32, "float16": 16, "bfloat16": 16}.get(str(dtype).replace("torch.", ""))


def _format_group(name: str) -> str | None:
    """The group column its storage format gives a quantized row (the catalog's `Format.grouping`), or None: the
    setting's group size stands."""
    try:
        spec = QuantSpec.parse(name)
        grouping = format_entry(spec.format).grouping
    except ConfigError:  # not a quantized model's name
        return None
    return grouping(spec) if grouping is not None else None


def _row(cell, metric, value, unit, field, protocol, paper, bits_per_weight=None) -> dict:
    bits, group = _setting_parts(cell["setting"])
    if cell["setting"] is not None and cell.get("name"):
        group = _format_group(cell["name"]) or group
    ref = _paper_value(paper, cell["model"], cell["row"], cell["setting"], metric)
    return {"model": cell["model"], "method": cell["row"], "setting": cell["setting"] or "fp", "bits": bits,
            "group": group, "metric": metric, "value": value, "paper": ref,
            "delta": None if ref is None else value - ref, "unit": unit, "field": field, "name": cell["name"],
            "protocol": protocol, "bits_per_weight": bits_per_weight, "seed": cell.get("seed")}


_CELL = ["model", "method", "setting", "metric"]


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per table cell: the mean over its replicates (calibration seeds), with their standard deviation,
    count, minimum and maximum; the difference from the paper is the mean's."""
    rows = []
    for _, g in df.groupby(_CELL, sort=False):
        first = g.iloc[0].to_dict()
        values = g["value"].astype(float)
        first.update(value=values.mean(), std=values.std(ddof=1) if len(g) > 1 else float("nan"), n=len(g),
                     min=values.min(), max=values.max())
        first["delta"] = None if first["paper"] is None or pd.isna(first["paper"]) else first["value"] - first["paper"]
        rows.append(first)
    return pd.DataFrame(rows)


def replicate_csv(df: pd.DataFrame) -> pd.DataFrame:
    """Every replicate, then for cells with several the mean, std, min and max as rows whose `seed` says which."""
    out = [df.assign(seed=df["seed"].map(lambda s: "" if s is None or pd.isna(s) else str(int(s))))]
    agg = aggregate(df)
    agg = agg[agg["n"] > 1]
    for stat in ("mean", "std", "min", "max"):
        if len(agg):
            out.append(agg.assign(value=agg["value" if stat == "mean" else stat], seed=stat,
                                  delta=agg["delta"] if stat == "mean" else None)[df.columns])
    return pd.concat(out, ignore_index=True)


def comparisons(df: pd.DataFrame, params: dict) -> list[str]:
    """The paired comparisons a table declares: for rows a and b, per model, setting and metric, the ratio a / b
    matched by calibration seed (a row without calibration data has one value for every seed), its mean, and
    whether every seed puts them in the same order."""
    lines = []
    labels = params.get("row_labels", {})
    for a, b in params.get("compare") or []:
        for (model, setting, metric), g in df[df.method.isin([a, b])].groupby(["model", "setting", "metric"],
                                                                               sort=False):
            va = {(None if pd.isna(s) else s): v for s, v in g[g.method == a][["seed", "value"]].values}
            vb = {(None if pd.isna(s) else s): v for s, v in g[g.method == b][["seed", "value"]].values}
            if not va or not vb:
                continue
            seeds = sorted({s for s in [*va, *vb] if s is not None}) or [None]
            pairs = [(va.get(s, va.get(None)), vb.get(s, vb.get(None))) for s in seeds]
            pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
            if not pairs:
                continue
            ratios = [x / y for x, y in pairs]
            mean = sum(ratios) / len(ratios)
            signs = {int(x > y) - int(x < y) for x, y in pairs}
            order = ("every seed agrees" if len(signs) == 1 else "the seeds disagree") if len(pairs) > 1 \
                else "one seed"
            lines.append(f"{labels.get(a, a)} / {labels.get(b, b)}, {setting} {_label(params, metric)}"
                         f"{' (' + model + ')' if df['model'].nunique() > 1 else ''}: mean ratio {mean:.3f} over "
                         f"{len(pairs)} seed{'s' if len(pairs) > 1 else ''} ({order})")
    return lines


def _protocol_text(record: dict) -> str:
    p = record.get("protocol", {})
    src = p.get("source", {})
    files = src.get("data_files")
    if files:  # a local file: `path` is the datasets loader (json, parquet) and `split` its label, not the data's split
        files = [files] if isinstance(files, str) else [f for v in (files.values() if isinstance(files, dict)
                                                                   else files) for f in (v if isinstance(v, list) else [v])]
        where = "local file " + ", ".join(Path(f).name for f in files)
    else:
        where = src.get("path", "?") + (f"/{src['name']}" if src.get("name") else "") + f" [{src.get('split', '?')}]"
    if p.get("windows_from") == "documents":
        how = f"{p.get('windows')} random windows of random documents (seed {p.get('seed')})"
    else:
        how = (f"joined with {json.dumps(p.get('join'))}, first {p.get('windows')} of {p.get('windows_available')} "
               "non-overlapping windows")
    return (f"{where}: {how} of {p.get('seqlen')} tokens ({p.get('tokens_scored'):,} scored), "
            f"{p.get('dtype', '?').replace('torch.', '')}")


def _task_protocol_text(record: dict) -> str:
    src = record.get("source", {})
    split = src.get("eval_split", "?")
    docs = (f"first {record.get('docs'):,} of {record.get('docs_available'):,} documents" if record.get("limit")
            else f"all {record.get('docs'):,} documents")
    if src.get("origin") == "local":
        files = [f for v in src.get("data_files", {}).values() for f in (v if isinstance(v, list) else [v])]
        data = "local copy " + ", ".join(Path(f).name for f in files) if files else f"local copy {src.get('dataset_path')}"
        if src.get("overrides"):
            data += f" (task keys replaced: {', '.join(src['overrides'])})"
    else:
        data = "hub: " + ", ".join(d["path"] + (f"/{d['name']}" if d.get("name") else "")
                                    for d in src.get("datasets", [])) if isinstance(src.get("datasets"), list) \
            else "hub"
    return (f"lm-eval {record.get('lm_eval', '?')} `{record.get('task')}`, {record.get('num_fewshot')}-shot, {docs} "
            f"of the {split} split, {data}")


# ------------------------------------------------------------------------------------------------ formatting

def format_value(v) -> str:
    if v is None or pd.isna(v):
        return "-"
    if abs(v) >= 1000:
        return f"{v:.3g}".replace("e+0", "e").replace("e+", "e")
    return f"{v:.2f}"


def _delta_text(v, paper, unit: str) -> str:
    if v is None or paper is None or pd.isna(v) or pd.isna(paper):
        return "-"
    sign = "+" if v - paper >= 0 else ""
    if unit == "%":
        return f"{sign}{v - paper:.2f}"  # percentage points
    return f"{sign}{v - paper:.2f} ({sign}{100 * (v - paper) / paper:.1f}%)"


def _columns(df: pd.DataFrame, params: dict) -> list[str]:
    present = set(df["metric"])
    return [c for c in params.get("columns") or dict.fromkeys(df["metric"]) if c in present]


def _label(params: dict, metric: str) -> str:
    return params.get("metric_labels", {}).get(metric, metric)


def resolve_labels(df: pd.DataFrame, params: dict) -> dict:
    """`params` with each `{task}.a|b` column labelled by the field its results gave, where they all gave one."""
    labels = dict(params.get("metric_labels", {}))
    for metric in set(df["metric"]):
        fields = set(df.loc[df.metric == metric, "field"])
        task = metric.partition(".")[0]
        if "|" in metric and len(fields) == 1 and task in params.get("task_labels", {}):
            labels[metric] = f"{params['task_labels'][task]} {fields.pop()}"
    return {**params, "metric_labels": labels}


def _arrow(df: pd.DataFrame, metric: str) -> str:
    units = set(df.loc[df.metric == metric, "unit"])
    return "↓" if units <= {"ppl", "raw"} else "↑"


def table_grid(df: pd.DataFrame, params: dict) -> tuple[list[str], list[list[str]]]:
    """Header and body cells of the table. Layout `long`: a line per method and setting, a column per metric;
    `wide`: a line per method, columns per setting x metric. Each metric column is followed by the paper's figure
    and the difference when the table records paper figures for it."""
    labels = params["row_labels"]
    df = aggregate(df) if "n" not in df else df
    multi_model = df["model"].nunique() > 1
    columns = _columns(df, params)
    with_paper = {m: bool(df.loc[df.metric == m, "paper"].notna().any()) for m in columns}
    order = {s: i for i, s in enumerate(["fp", *params["settings"]])}
    rank = {r: i for i, r in enumerate(params["rows"])}
    keyed = df.assign(_s=df["setting"].map(order), _r=df["method"].map(rank))

    def metric_cells(g, metric):
        r = g[g.metric == metric]
        v = r["value"].iloc[0] if len(r) else None
        p = r["paper"].iloc[0] if len(r) else None
        unit = r["unit"].iloc[0] if len(r) else ""
        n = int(r["n"].iloc[0]) if len(r) and "n" in r else 1
        out = [format_value(v) if n < 2 else f"{format_value(v)} ± {format_value(r['std'].iloc[0])} (n={n})"]
        if with_paper[metric]:
            out += [format_value(p), _delta_text(v, p, unit)]
        return out

    def metric_header(prefix, metric):
        name = f"{prefix}{_label(params, metric)}"
        return [f"{name} {_arrow(df, metric)}"] + ([f"{name} paper", "Δ vs paper"] if with_paper[metric] else [])

    lead = ["Model"] if multi_model else []
    body = []
    if params.get("layout", "long") == "wide":
        settings = [s for s in params["settings"] if s in set(df["setting"])]
        header = lead + ["Method"] + [h for s in settings for m in columns for h in metric_header(f"{s} ", m)]
        for (model, method), g in keyed.sort_values(["model", "_r"], kind="stable").groupby(
                ["model", "method"], sort=False):
            cells = ([params["model_labels"].get(model, model)] if multi_model else []) + [labels.get(method, method)]
            for s in settings:
                sub = g if method == "fp" else g[g.setting == s]  # FP is every setting's reference
                cells += [c for m in columns for c in metric_cells(sub, m)]
            body.append(cells)
        return header, body
    # Bits/w: storage bits per quantized weight, statistics, tables and outliers included (from the checkpoint)
    header = lead + ["Method", "Bits", "Group", "Bits/w"] + [h for m in columns for h in metric_header("", m)]
    for (model, setting, method), g in keyed.sort_values(["model", "_s", "_r"], kind="stable").groupby(
            ["model", "setting", "method"], sort=False):
        first = g.iloc[0]
        bpw = first.get("bits_per_weight")
        cells = ([params["model_labels"].get(model, model)] if multi_model else []) + [
            labels.get(method, method), first["bits"], first["group"],
            "-" if bpw is None or pd.isna(bpw) else (f"{bpw:.0f}" if method == "fp" else f"{bpw:.2f}")]
        cells += [c for m in columns for c in metric_cells(g, m)]
        body.append([str(c) for c in cells])
    return header, body


def _notes(df: pd.DataFrame, params: dict) -> list[str]:
    """One line per metric and protocol: how each figure was measured."""
    lines = []
    for metric in _columns(df, params):
        kind = " perplexity" if "." not in metric and metric not in (params.get("averages") or {}) else ""
        for proto in dict.fromkeys(df.loc[df.metric == metric, "protocol"]):
            lines.append(f"{_label(params, metric)}{kind}: {proto}")
    if len(df) and df.groupby(_CELL).size().max() > 1:
        lines.append("A ± B (n=k): mean and standard deviation over k calibration seeds (each its own draw of the "
                     "calibration windows, quantized model and evaluation)")
    if (df["unit"] == "%").any():
        lines.append("Accuracies in %; acc_norm is lm-eval's accuracy with each choice's log-likelihood divided by its "
                     "length in characters; differences from the paper in percentage points.")
    return lines


def render_markdown(df: pd.DataFrame, params: dict) -> str:
    params = resolve_labels(df, params)
    header, body = table_grid(df, params)
    lines = [f"# {params['title']}", ""]
    if df["model"].nunique() == 1:
        lines += [f"Model: {next(iter(params['model_labels'].values()))}.", ""]
    if params.get("paper_source"):
        lines += [f"Paper figures: {params['paper_source']}.", ""]
    lines += [f"- {n}" for n in _notes(df, params)] + [""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    compared = comparisons(df, params)
    if compared:
        lines += ["", "Paired comparisons (same seed = same calibration windows):", ""]
        lines += [f"- {c}" for c in compared]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "↓": r"$\downarrow$", "↑": r"$\uparrow$", "Δ": r"$\Delta$", "`": ""}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def render_latex(df: pd.DataFrame, params: dict) -> str:
    """A booktabs table (needs \\usepackage{booktabs}); the notes go into the caption."""
    params = resolve_labels(df, params)
    header, body = table_grid(df, params)
    n_text = sum(1 for h in header if h in ("Model", "Method", "Bits", "Group"))
    spec = "l" * n_text + "r" * (len(header) - n_text)
    caption = params["title"]
    if df["model"].nunique() == 1:
        caption += f". Model: {next(iter(params['model_labels'].values()))}"
    if params.get("paper_source"):
        caption += f". Paper figures: {params['paper_source']}"
    caption += ". " + " ".join(n.rstrip(".") + "." for n in _notes(df, params))
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             rf"\caption{{{latex_escape(caption)}}}", rf"\label{{tab:{latex_escape(params['key'])}}}",
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(c) for c in row) + r" \\" for row in body]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_table(params: dict, out_md, out_csv, out_tex=None, out_png=None) -> pd.DataFrame:
    df = collect(params)
    with atomic_file(out_md) as tmp:
        tmp.write_text(render_markdown(df, params))
    with atomic_file(out_csv) as tmp:
        replicate_csv(df).to_csv(tmp, index=False)
    if out_tex:
        with atomic_file(out_tex) as tmp:
            tmp.write_text(render_latex(df, params))
    if out_png:
        plot_table(aggregate(df), resolve_labels(df, params), out_png)
    return df
