"""The config schema and its expansion: bad input is an error that names the problem."""

import copy
from pathlib import Path

import pytest
import yaml

from quantlib.config.experiment import Experiment

from quantlib.config.preflight import check_sources
from quantlib.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cfg():
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_default_config_expands(cfg):
    exp = Experiment(cfg)
    names = [s.short_name() for s in exp.all_specs()]
    assert "smollm2-135m.fp" in names
    assert "smollm2-135m.rtn.w4g64" in names
    assert "smollm2-135m.c4.n32.L512.ldlq.w3" in names
    assert {c["row"] for c in exp.table_cells("main")} == {"fp", "rtn", "ldlq"}
    cells = exp.table_cells("quantease")
    assert {"fp", "rtn", "ldlq", "gptq", "quantease", "gptq_quantease", "quantease_ol1"} == {c["row"] for c in cells}
    assert {c.get("setting") for c in cells if c["row"] != "fp"} <= {"w3g64", "w3"}
    assert "smollm2-135m.c4.n32.L512.quantease.w3.ol0p01" in names
    assert "results/ppl/wikitext2.L512.nw40/smollm2-135m.c4.n32.L512.ldlq.w3.json" in exp.table_inputs("main")


def test_unknown_keys_are_named_with_the_allowed_ones(cfg):
    bad = copy.deepcopy(cfg)
    bad["calibraton"] = {}
    with pytest.raises(ConfigError, match="unknown config key 'calibraton' in the top level; allowed keys: .*calibration"):
        Experiment(bad)
    bad = copy.deepcopy(cfg)
    bad["methods"][0]["group"] = [64]
    with pytest.raises(ConfigError, match="unknown config key 'group' in methods.0; allowed keys: .*group_size"):
        Experiment(bad)
    bad = copy.deepcopy(cfg)
    bad["perplexity"]["datasets"]["wikitext2"]["windows"] = 3
    with pytest.raises(ConfigError, match="unknown config key 'windows' in perplexity.datasets.wikitext2"):
        Experiment(bad)


@pytest.mark.parametrize("change,message", [
    (lambda c: c["methods"][0].update(solver="awq"), "unknown solver 'awq'; known: .*ldlq"),
    (lambda c: c["methods"][0].update(bits=[1]), "bits must be between 2 and 8, got 1"),
    (lambda c: c["methods"][1].update(options={"iters": 3}), "unknown option 'iters'"),
    (lambda c: c.update(run_models=["llama-9b"]), "unknown model 'llama-9b'"),
    (lambda c: c["calibration"].update(dataset="pile"), "unknown dataset 'pile'"),
    (lambda c: c["tables"]["main"].update(rows=["fp", "awq"]), "unknown method id 'awq'"),
    (lambda c: c["compute"].update(dtype="fp8"), "'fp8' is not one of"),
    (lambda c: c.pop("calibration"), "needs calibration data"),
])
def test_bad_values(cfg, change, message):
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        Experiment(cfg)


def test_sources_checked_before_any_job(cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    for var in ("HF_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    cfg["resources"] = str(tmp_path / "resources")
    exp = Experiment(cfg)
    check_sources(exp, offline=False)  # hub ids are fine online
    with pytest.raises(ConfigError, match="model 'smollm2-135m': 'HuggingFaceTB/SmolLM2-135M' is no local directory .* needs the hub, which is offline"):
        check_sources(exp, offline=True)
    cfg["models"]["smollm2-135m"]["source"] = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="local source .*nowhere' does not exist"):
        check_sources(Experiment(cfg), offline=False)
    cfg["models"]["smollm2-135m"]["source"] = "HuggingFaceTB/SmolLM2-135M"
    cfg["datasets"]["wikitext2"] = {"path": "json", "data_files": str(tmp_path / "missing.jsonl")}
    with pytest.raises(ConfigError, match="dataset 'wikitext2': data file .*missing.jsonl' does not exist"):
        check_sources(Experiment(cfg), offline=False)
    cfg["datasets"]["wikitext2"] = {"path": "Salesforce/wikitext", "name": "wikitext-2-raw-v1"}
    (tmp_path / "resources" / "models" / "smollm2-135m").mkdir(parents=True)  # pre-filled model
    with pytest.raises(ConfigError, match="dataset 'c4': 'allenai/c4' is no local path .* needs the hub, which is offline"):
        check_sources(Experiment(cfg), offline=True)


def test_tokenizer_checked_like_the_source(cfg, tmp_path, monkeypatch):
    """`tokenizer:` is read by the fetch like `source:`: a local path that is not there stops the run before any job,
    in the same words; a pre-filled model needs neither."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    cfg["resources"] = str(tmp_path / "resources")
    cfg["models"]["smollm2-135m"]["tokenizer"] = "./no-such-tokenizer"
    with pytest.raises(ConfigError, match="model 'smollm2-135m': local tokenizer './no-such-tokenizer' does not exist"):
        check_sources(Experiment(cfg), offline=False)
    cfg["models"]["smollm2-135m"]["tokenizer"] = "HuggingFaceTB/SmolLM2-135M"
    check_sources(Experiment(cfg), offline=False)  # a hub id is fine online (offline: tests/access/test_provenance.py)


def test_table_left_out_of_the_default_run(cfg):
    exp = Experiment(cfg)
    # NeUQI's, GuidedQuant's (scalar and vector), the distillation, UniQuanF, outlier, calibration-set and
    # weight-and-activation tables take ten minutes to hours on a CPU
    left_out = {"init", "guidedquant", "guidedquant_w2_n128", "distill", "uniquanf", "main_seeds", "noise",
                "outliers_vs_spqr", "calibration_sets", "guidedquant_vector", "weight_activation"}
    assert exp.default_tables() == [key for key in exp.tables if key not in left_out]
    cfg["tables"]["init"]["default_target"] = "no"
    with pytest.raises(ConfigError, match="tables.init.default_target"):
        Experiment(cfg)


def test_method_settings_list(cfg):
    exp = Experiment(cfg)
    assert exp.methods["ldlq_neuqi"].settings() == [(3, 64), (2, 64), (3, -1)]
    names = {c["name"] for c in exp.table_cells("init")}
    assert "smollm2-135m.c4.n32.L512.ldlq.neuqi.w2g64" in names
    assert "smollm2-135m.c4.n32.L512.magr.ldlq.w3g64" in names
    assert not any(n.endswith(".w2") for n in names)  # no product with per-channel 2-bit
    # the shared w3 rows are the same files as the main table's
    assert "smollm2-135m.c4.n32.L512.ldlq.w3g64" in names


@pytest.mark.parametrize("entry,message", [
    ({"settings": ["w3g64"], "bits": [3]}, "either `settings` or `bits`/`group_size`, not both"),
    ({"settings": ["w3g64"], "group_size": [64]}, "either `settings` or `bits`/`group_size`, not both"),
    ({"settings": ["3bit"]}, "'3bit' is not a setting"),
    ({}, "needs `bits`"),
])
def test_method_settings_errors(cfg, entry, message):
    cfg["methods"].append({"id": "x", "solver": "ldlq", **entry})
    with pytest.raises(ConfigError, match=message):
        Experiment(cfg)


def test_the_config_and_catalog_import_neither_torch_nor_lm_eval():
    """The Snakefile imports them at parse time: they stay pure Python."""
    import subprocess
    import sys

    code = ("import sys, quantlib.config, quantlib.catalog.registry, quantlib.catalog.spec, quantlib.catalog.names\n"
            "import quantlib.config.schema, quantlib.catalog.pack_formats\n"
            "print(sorted(m for m in sys.modules if m in ('torch', 'lm_eval') or m.startswith('quantlib.evaluation.lmeval')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
