"""Replicates over calibration seeds: their expansion into specs and the DAG, mean +- standard deviation in the
tables, every replicate in the CSV, error bars in the plot, paired comparisons, and refusals."""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest

from quantlib.config.experiment import Experiment
from quantlib.errors import ConfigError
from quantlib.artifacts.atomic import write_json
from quantlib.evaluation.tables import comparisons, write_table

CFG = {
    "models": {"m": {"source": "/nowhere", "label": "Model M"}},
    "datasets": {"wiki": {"path": "json", "data_files": "/nowhere.jsonl", "label": "WikiText-2"},
                 "c4": {"path": "json", "data_files": "/nowhere.jsonl"}},
    "run_models": ["m"],
    "calibration": {"dataset": "c4", "nsamples": 8, "seqlen": 32},
    "perplexity": {"seqlen": 32, "datasets": {"wiki": {"max_windows": 4}}},
    "methods": [{"id": "rtn", "label": "RTN", "solver": "rtn", "settings": ["w3g32"]},
                {"id": "ldlq", "label": "LDLQ", "solver": "ldlq", "settings": ["w3g32"]},
                {"id": "gptq", "label": "GPTQ", "solver": "ldlq", "settings": ["w3g32"],
                 "options": {"act_order": False}}],
    "tables": {"t": {"title": "Seeds", "rows": ["fp", "rtn", "ldlq", "gptq"], "seeds": [0, 1, 2],
                     "compare": [["ldlq", "rtn"], ["ldlq", "gptq"]]}},
}
# WikiText-2 perplexity per name: LDLQ below RTN on every seed; LDLQ and GPTQ change places on seed 2.
FIGURES = {"m.fp": 10.0, "m.rtn.w3g32": 40.0,
           "m.c4.n8.L32.ldlq.w3g32": 20.0, "m.c4.n8.L32.s1.ldlq.w3g32": 22.0, "m.c4.n8.L32.s2.ldlq.w3g32": 24.0,
           "m.c4.n8.L32.ldlq.w3g32.noreorder": 21.0, "m.c4.n8.L32.s1.ldlq.w3g32.noreorder": 23.0,
           "m.c4.n8.L32.s2.ldlq.w3g32.noreorder": 23.0}


def _fill(root: Path, exp: Experiment) -> dict:
    params = exp.table_params("t")
    for cell in params["cells"]:
        cell["path"] = str(root / cell["path"])
        write_json(cell["path"], {"value": FIGURES[cell["name"]], "protocol": {
            "source": {"path": "json", "split": "train"}, "seqlen": 32, "windows": 4, "windows_available": 9,
            "join": "\n\n", "tokens_scored": 124, "dtype": "torch.float32"}})
    return params


def test_replicates_expand_per_seed_and_data_free_rows_stay_single():
    exp = Experiment(copy.deepcopy(CFG))
    names = sorted({c["name"] for c in exp.table_cells("t")})
    assert names == sorted(FIGURES)
    assert {s.short_name() for s in exp.all_specs()} >= set(FIGURES)


def test_mean_and_spread_in_markdown_csv_and_plot(tmp_path, monkeypatch):
    import matplotlib.axes

    calls = []
    real = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", lambda self, *a, **k: calls.append(k) or real(self, *a, **k))
    params = _fill(tmp_path, Experiment(copy.deepcopy(CFG)))
    out = {ext: tmp_path / f"t.{ext}" for ext in ("md", "csv", "tex", "png")}
    write_table(params, out["md"], out["csv"], out["tex"], out["png"])
    md = out["md"].read_text()
    assert "| LDLQ | 3 | 32 | - | 22.00 ± 2.00 (n=3) |" in md  # mean and sample standard deviation of 20, 22, 24
    assert "| RTN | 3 | 32 | - | 40.00 |" in md  # data-free: one replicate
    assert "mean and standard deviation over k calibration seeds" in md
    csv = pd.read_csv(out["csv"], dtype={"seed": str})
    ldlq = csv[csv.method == "ldlq"]
    assert sorted(ldlq["seed"]) == sorted(["0", "1", "2", "mean", "std", "min", "max"])
    assert ldlq.set_index("seed")["value"].to_dict() == {"0": 20.0, "1": 22.0, "2": 24.0, "mean": 22.0, "std": 2.0,
                                                          "min": 20.0, "max": 24.0}
    assert calls  # error bars were drawn for the replicated rows
    assert r"22.00 ± 2.00 (n=3)" in out["tex"].read_text()


def test_paired_comparison_has_the_known_answer(tmp_path):
    params = _fill(tmp_path, Experiment(copy.deepcopy(CFG)))
    md_lines = comparisons(pd.DataFrame(_rows(params)), params)
    # LDLQ / RTN: (20 + 22 + 24) / 40 / 3 = 0.55, lower on every seed; LDLQ / GPTQ: 20/21, 22/23, 24/23
    assert md_lines[0] == "LDLQ / RTN, w3g32 WikiText-2: mean ratio 0.550 over 3 seeds (every seed agrees)"
    mean = (20 / 21 + 22 / 23 + 24 / 23) / 3
    assert md_lines[1] == f"LDLQ / GPTQ, w3g32 WikiText-2: mean ratio {mean:.3f} over 3 seeds (the seeds disagree)"


def _rows(params):
    from quantlib.evaluation.tables import collect

    return collect(params).to_dict("records")


@pytest.mark.parametrize("change,message", [
    (lambda c: c["tables"]["t"].update(seeds=[]), "should be non-empty|is too short"),
    (lambda c: c["tables"]["t"].update(seeds=[0, 0]), "non-unique elements|has non-unique"),
    (lambda c: c["tables"]["t"].update(seeds=[-1]), "less than the minimum of 0"),
    (lambda c: c["methods"][1].update(seeds=[]), "should be non-empty|is too short"),
    (lambda c: c["tables"]["t"].update(compare=[["ldlq", "quantease"]]), "'quantease' is not a row of the table"),
])
def test_bad_replicate_settings_are_refused(change, message):
    cfg = copy.deepcopy(CFG)
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        Experiment(cfg)
