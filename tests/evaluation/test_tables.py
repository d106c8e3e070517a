"""Paper tables from result JSONs: perplexity and lm-eval columns, averages, ours | paper | difference, Markdown, CSV,
LaTeX and the plot; a broken result file is an error that names it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest

from quantlib.config.experiment import Experiment
from quantlib.errors import ConfigError, DataError
from quantlib.artifacts.atomic import write_json
from quantlib.evaluation.tables import collect, load_result, render_latex, render_markdown, write_table

CFG = {
    "models": {"m": {"source": "/nowhere", "label": "Model M"}},
    "datasets": {"wiki": {"path": "json", "data_files": "/nowhere.jsonl", "label": "WikiText-2"}},
    "run_models": ["m"],
    "perplexity": {"seqlen": 32, "datasets": {"wiki": {"max_windows": 4}}},
    "lm_eval": {"tasks": {"arc_easy": {"limit": 25, "label": "ARC-e"}, "winogrande": {"limit": 25}}},
    "methods": [{"id": "rtn", "label": "RTN", "solver": "rtn", "bits": [4, 3], "group_size": [32]}],
    "tables": {"t": {
        "title": "Test table", "rows": ["fp", "rtn"],
        "metrics": ["wiki", "arc_easy.acc_norm", "winogrande.acc_norm|acc", "avg"],
        "averages": {"avg": {"label": "Avg (2 tasks)", "of": ["arc_easy.acc_norm", "winogrande.acc"]}},
        "paper_source": "A paper, Table 1",
        "paper": {"m": {"fp": {"wiki": 10.0, "avg": 60.0}, "rtn.w4g32": {"wiki": 12.0, "arc_easy.acc_norm": 50.0}}},
    }},
}

# ppl, arc_easy acc_norm, winogrande acc per spec name
FIGURES = {"m.fp": (11.0, 0.56, 0.60), "m.rtn.w4g32": (12.5, 0.48, 0.52), "m.rtn.w3g32": (40.0, 0.32, 0.48)}


def _ppl_record(value):
    return {"value": value, "protocol": {"source": {"path": "json", "split": "train",
                                                    "data_files": "/data/wikitext-2-raw-v1/test.jsonl"},
                                         "seqlen": 32, "windows": 4,
                                         "windows_available": 9, "join": "\n\n", "tokens_scored": 124,
                                         "dtype": "torch.float32"}}


def _task_record(task, **metrics):
    return {"task": task, "num_fewshot": 0, "limit": 25, "docs": 25, "docs_available": 2376,
            "metrics": {**metrics, **{f"{k}_stderr": 0.1 for k in metrics}}, "lm_eval": "0.4.13",
            "source": {"origin": "local", "data_files": {"test": f"/data/{task}.jsonl"}, "eval_split": "test"}}


def fill_results(root: Path, exp: Experiment, key: str = "t") -> dict:
    params = exp.table_params(key)
    for cell in params["cells"]:
        ppl, arc, wino = FIGURES[cell["name"]]
        metric = cell["metric"]
        record = (_ppl_record(ppl) if metric == "wiki" else
                  _task_record("arc_easy", acc=arc - 0.04, acc_norm=arc) if metric.startswith("arc_easy") else
                  _task_record("winogrande", acc=wino))
        cell["path"] = str(root / cell["path"])
        write_json(cell["path"], record)
    return params


@pytest.fixture
def exp():
    return Experiment(copy.deepcopy(CFG))


def test_table_has_ours_paper_and_difference(tmp_path, exp):
    params = fill_results(tmp_path, exp)
    assert {c["path"].split("/results/")[1].split("/")[1] for c in params["cells"]} == {
        "wiki.L32.nw4", "arc_easy.0shot.lim25", "winogrande.0shot.lim25"}
    out = {ext: tmp_path / f"t.{ext}" for ext in ("md", "csv", "tex", "png")}
    df = write_table(params, out["md"], out["csv"], out["tex"], out["png"])
    md = out["md"].read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Method"))
    assert header.split(" | ")[3] == "Bits/w"  # storage bits per weight, from the result (missing here: "-")
    assert header.split(" | ")[4:] == ["WikiText-2 ↓", "WikiText-2 paper", "Δ vs paper", "ARC-e acc_norm ↑",
                                       "ARC-e acc_norm paper", "Δ vs paper", "winogrande acc ↑",
                                       "Avg (2 tasks) ↑", "Avg (2 tasks) paper", "Δ vs paper |"]
    rows = {line.split(" | ")[0] + line.split(" | ")[1]: line.split(" | ") for line in md.splitlines()
            if line.startswith("| ") and "Method" not in line}
    fp, w4 = rows["| FP (unquantized)FP"], rows["| RTN4"]
    # FP: the evaluation dtype's bits (float32 here), not a storage width it was never evaluated in
    assert fp[3] == "32" and w4[3] == "-"
    # A local file is named as such: `json [train]` (the loader and its split label) would read as training data.
    assert "local file test.jsonl" in md and "[train]" not in md
    assert fp[4:8] == ["11.00", "10.00", "+1.00 (+10.0%)", "56.00"]
    assert fp[-3:] == ["58.00", "60.00", "-2.00 |"]  # mean of 56 and 60, difference in points
    assert w4[4:10] == ["12.50", "12.00", "+0.50 (+4.2%)", "48.00", "50.00", "-2.00"]
    assert w4[10] == "52.00"  # winogrande has no acc_norm: acc is taken
    assert "first 25 of 2,376 documents of the test split, local copy arc_easy.jsonl" in md
    assert "Paper figures: A paper, Table 1." in md and "Model: Model M." in md
    avg = df[(df.metric == "avg") & (df.setting == "w3g32")]["value"].iloc[0]
    assert avg == pytest.approx((32 + 48) / 2)
    csv = pd.read_csv(out["csv"])
    assert list(csv.columns[:9]) == ["model", "method", "setting", "bits", "group", "metric", "value", "paper", "delta"]
    assert set(csv["unit"]) == {"ppl", "%"}
    tex = out["tex"].read_text()
    assert r"\toprule" in tex and r"ARC-e acc\_norm $\uparrow$" in tex and r"$\Delta$ vs paper" in tex
    assert tex.count(r"\\") == 1 + 3  # header and three rows
    png = out["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_wide_layout_puts_settings_in_the_columns(tmp_path, exp):
    params = {**fill_results(tmp_path, exp), "layout": "wide"}
    md = render_markdown(collect(params), params)
    header = next(line for line in md.splitlines() if line.startswith("| Method"))
    assert "w4g32 WikiText-2 ↓" in header and "w3g32 ARC-e acc_norm ↑" in header
    body = [line for line in md.splitlines() if line.startswith("| ") and "Method" not in line]
    assert len(body) == 2  # FP and RTN
    assert "40.00" in body[1] and "12.50" in body[1]


def test_broken_results_are_named(tmp_path, exp):
    params = fill_results(tmp_path, exp)
    cell = next(c for c in params["cells"] if c["metric"] == "arc_easy.acc_norm")
    Path(cell["path"]).write_text('{"metrics": {"acc": 0.4')
    with pytest.raises(DataError, match=f"result file {cell['path']} is not valid JSON"):
        collect(params)
    Path(cell["path"]).unlink()
    with pytest.raises(DataError, match=f"result file {cell['path']} is missing"):
        collect(params)
    write_json(cell["path"], {"metrics": {"acc": 0.4}})
    with pytest.raises(DataError, match=f"result file {cell['path']} has no acc_norm for task 'arc_easy' \\(it has: acc\\)"):
        collect(params)
    write_json(cell["path"], {"value": 3.0})
    with pytest.raises(DataError, match="has no 'metrics' of an lm-eval task"):
        load_result(cell["path"], "arc_easy.acc_norm")


@pytest.mark.parametrize("change,message", [
    (lambda t: t.update(metrics=["wiki", "piqa.acc"]), "'piqa.acc' names no task of lm_eval.tasks"),
    (lambda t: t.update(metrics=["c4"]), "'c4' is neither a perplexity dataset"),
    (lambda t: t["averages"].update(bad={"of": ["wiki"]}), "'wiki' is not a task metric"),
    (lambda t: t["averages"].update(bad={"of": ["arc_easy.acc", "arc_easy.perplexity"]}), "mixes accuracies"),
    (lambda t: t.update(layout="tall"), "'tall' is not one of: long, wide"),
])
def test_bad_table_settings(change, message):
    cfg = copy.deepcopy(CFG)
    change(cfg["tables"]["t"])
    with pytest.raises(ConfigError, match=message):
        Experiment(cfg)


def test_latex_escapes_specials():
    params = {"key": "k_1", "title": "50% of A & B", "row_labels": {"fp": "FP"}, "model_labels": {"m": "M#1"},
              "rows": ["fp"], "settings": [], "columns": ["x.acc"], "metric_labels": {"x.acc": "x_task acc"}}
    df = pd.DataFrame([{"model": "m", "method": "fp", "setting": "fp", "bits": "FP", "group": "-", "metric": "x.acc",
                        "value": 50.0, "paper": None, "delta": None, "unit": "%", "field": "acc", "name": "m.fp",
                        "protocol": "p"}])
    tex = render_latex(df, params)
    assert r"50\% of A \& B" in tex and r"x\_task acc $\uparrow$" in tex and r"M\#1" in tex
    assert json.dumps(tex)  # plain text


def test_only_the_tasks_a_table_reads_are_evaluated():
    cfg = copy.deepcopy(CFG)
    # an overlay's local source for a task that no table names (tests/offline.yaml gives six)
    cfg["lm_eval"]["tasks"]["piqa"] = {"source": {"data_files": "/nowhere/piqa.jsonl"}}
    exp = Experiment(cfg)
    assert exp.used_tasks() == ["arc_easy", "winogrande"]
    assert exp.lmeval_protocols() == ["arc_easy.0shot.lim25", "winogrande.0shot.lim25"]
    assert set(exp.lmeval_params()["tasks"]) == {"arc_easy", "winogrande"}
    # a perplexity-only table (the schema before zero-shot columns) needs no lm-eval run
    cfg["tables"] = {"ppl": {"rows": ["fp", "rtn"], "metrics": ["wiki"]}}
    exp = Experiment(cfg)
    assert exp.lmeval_protocols() == [] and {c["path"].split("/")[1] for c in exp.table_cells("ppl")} == {"ppl"}


def test_average_short_form():
    cfg = copy.deepcopy(CFG)
    cfg["tables"]["t"]["averages"] = {"avg": ["arc_easy.acc_norm", "winogrande.acc"]}
    t = Experiment(cfg).tables["t"]
    assert t.averages == {"avg": {"of": ["arc_easy.acc_norm", "winogrande.acc"]}}
    assert t.result_metrics() == ["wiki", "arc_easy.acc_norm", "winogrande.acc_norm|acc", "winogrande.acc"]
    cfg["tables"]["t"]["averages"] = {"avg": "arc_easy.acc"}
    with pytest.raises(ConfigError, match="tables.t.averages.avg"):
        Experiment(cfg)


def test_a_trellis_row_names_its_tiles_not_a_group(tmp_path):
    """QTIP's layers have one scale per layer (or row block) and codes per tile: 'per-channel' would misdescribe them."""
    cfg = copy.deepcopy(CFG)
    cfg["methods"].append({"id": "qtip", "label": "QTIP", "solver": "qtip", "settings": ["w2"],
                           "options": {"trellis_L": 8, "code_1mad": True},
                           "calibration": {"dataset": "wiki", "nsamples": 4, "seqlen": 32}})
    cfg["tables"]["t"] = {"title": "Vector", "rows": ["rtn", "qtip"], "metrics": ["wiki"]}
    cfg["methods"][0]["group_size"] = [32, -1]
    params = Experiment(cfg).table_params("t")
    for cell in params["cells"]:
        cell["path"] = str(tmp_path / cell["name"])
        write_json(cell["path"], _ppl_record(12.0))
    df = collect(params)
    groups = dict(zip(df["name"], df["group"]))
    assert groups == {"m.rtn.w4g32": "32", "m.rtn.w3g32": "32", "m.rtn.w4": "per-channel", "m.rtn.w3": "per-channel",
                      "m.wiki.n4.L32.qtip.w2.1mad.tl8": "16x16 tiles"}
