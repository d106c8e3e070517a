"""Paper-table aggregation: result JSONs -> one tidy frame -> Markdown and CSV, ours beside the paper's figure."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .errors import DataError
from .io import atomic_file

LOWER_IS_BETTER = {"ppl"}


def load_result(path: str | Path) -> dict:
    """A result JSON, or a DataError naming the file (missing, unreadable, or without a value)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"result file {path} is missing; re-run the workflow to produce it")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"result file {path} is not valid JSON ({exc}); delete it and re-run the workflow") from None
    if not isinstance(record, dict) or not isinstance(record.get("value"), (int, float)):
        raise DataError(f"result file {path} has no numeric 'value'; delete it and re-run the workflow")
    return record


def _paper_value(paper: dict, model: str, row: str, setting: str | None, metric: str):
    figures = paper.get(model, {})
    key = row if setting is None else f"{row}.{setting}"
    value = figures.get(key, {}).get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def _setting_parts(setting: str | None) -> tuple[str, str]:
    if setting is None:
        return "FP", "-"
    bits, _, group = setting[1:].partition("g")
    return bits, group or "per-channel"


def collect(params: dict) -> pd.DataFrame:
    """Long table: one row per (model, method, setting, metric)."""
    rows = []
    for cell in params["cells"]:
        record = load_result(cell["path"])
        paper = _paper_value(params.get("paper") or {}, cell["model"], cell["row"], cell["setting"], cell["metric"])
        bits, group = _setting_parts(cell["setting"])
        value = float(record["value"])
        rows.append({
            "model": cell["model"], "method": cell["row"], "setting": cell["setting"] or "fp", "bits": bits,
            "group": group, "metric": cell["metric"], "value": value, "paper": paper,
            "delta": None if paper is None else value - paper, "name": cell["name"],
            "protocol": _protocol_text(record),
        })
    return pd.DataFrame(rows)


def _protocol_text(record: dict) -> str:
    p = record.get("protocol", {})
    src = p.get("source", {})
    where = src.get("path", "?") + (f"/{src['name']}" if src.get("name") else "") + f" [{src.get('split', '?')}]"
    if p.get("windows_from") == "documents":
        how = f"{p.get('windows')} random windows of random documents (seed {p.get('seed')})"
    else:
        how = (f"joined with {json.dumps(p.get('join'))}, first {p.get('windows')} of {p.get('windows_available')} "
               "non-overlapping windows")
    return (f"{where}: {how} of {p.get('seqlen')} tokens ({p.get('tokens_scored'):,} scored), "
            f"{p.get('dtype', '?').replace('torch.', '')}")


def format_value(v) -> str:
    if v is None or pd.isna(v):
        return "-"
    if abs(v) >= 1000:
        return f"{v:.3g}".replace("e+0", "e").replace("e+", "e")
    return f"{v:.2f}"


def _delta_text(v, paper) -> str:
    if paper is None or pd.isna(paper):
        return "-"
    sign = "+" if v - paper >= 0 else ""
    return f"{sign}{v - paper:.2f} ({sign}{100 * (v - paper) / paper:.1f}%)"


def render_markdown(df: pd.DataFrame, params: dict) -> str:
    labels = params["row_labels"]
    metric_labels = params.get("metric_labels", {})
    with_paper = df["paper"].notna().any()
    multi_model = df["model"].nunique() > 1
    lines = [f"# {params['title']}", ""]
    if params.get("paper_source"):
        lines += [f"Paper figures: {params['paper_source']}.", ""]
    for metric in dict.fromkeys(df["metric"]):
        for proto in dict.fromkeys(df.loc[df.metric == metric, "protocol"]):
            lines.append(f"- {metric_labels.get(metric, metric)} perplexity: {proto}")
    lines.append("")
    metrics = list(dict.fromkeys(df["metric"]))
    header = (["Model"] if multi_model else []) + ["Method", "Bits", "Group"]
    for m in metrics:
        name = metric_labels.get(m, m)
        header += [f"{name} ↓"] + ([f"{name} paper", "Δ vs paper"] if with_paper else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    order = ["fp", *[s for s in params["settings"]]]
    keyed = df.assign(_s=df["setting"].map({s: i for i, s in enumerate(order)}),
                      _r=df["method"].map({r: i for i, r in enumerate(params["rows"])}))
    for (model, setting, method), g in keyed.sort_values(["model", "_s", "_r"], kind="stable").groupby(
            ["model", "setting", "method"], sort=False):
        first = g.iloc[0]
        cells = ([params["model_labels"].get(model, model)] if multi_model else []) + [
            labels.get(method, method), first["bits"], first["group"]]
        for m in metrics:
            r = g[g.metric == m]
            v = r["value"].iloc[0] if len(r) else None
            p = r["paper"].iloc[0] if len(r) else None
            cells.append(format_value(v))
            if with_paper:
                cells += [format_value(p), _delta_text(v, p) if v is not None else "-"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if not multi_model:
        lines.insert(1, "")
        lines.insert(2, f"Model: {next(iter(params['model_labels'].values()))}.")
    return "\n".join(lines) + "\n"


def write_table(params: dict, out_md, out_csv) -> pd.DataFrame:
    df = collect(params)
    md = render_markdown(df, params)
    with atomic_file(out_md) as tmp:
        tmp.write_text(md)
    with atomic_file(out_csv) as tmp:
        df.to_csv(tmp, index=False)
    return df
