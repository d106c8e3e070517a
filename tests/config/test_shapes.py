"""One check for a name, wherever it comes from: names given as targets get the shape checks of config entries (the
model's config.json found on disk the same way), and the small refusals of issue 33 (compare of a row with itself,
memory budgets of nothing, options answered with config keys)."""

import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import yaml

import quantlib.config.shapes as shapes
from quantlib.catalog.spec import QuantSpec
from quantlib.config.experiment import Experiment
from quantlib.errors import ConfigError, UnsupportedArchitecture
from quantlib.jobs.memory import parse_memory

REPO = Path(__file__).resolve().parents[2]
KEY = "smollm2-135m"
# SmolLM2-135M's shapes: 576 rows and columns in attention, 192 in k/v, 1536 in the MLP.
SMOL = {"model_type": "llama", "hidden_size": 576, "num_attention_heads": 9, "head_dim": 64, "num_key_value_heads": 3,
        "intermediate_size": 1536, "num_hidden_layers": 30, "vocab_size": 49152}


@pytest.fixture
def cfg(tmp_path):
    c = yaml.safe_load((REPO / "config.yaml").read_text())
    c["resources"] = str(tmp_path / "resources")
    return c


def _prefill(cfg, config=SMOL) -> Path:
    path = Path(cfg["resources"]) / "models" / KEY / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return path


def _refusal(call) -> str:
    with pytest.raises(ConfigError) as err:
        call()
    return str(err.value)


@pytest.mark.parametrize("name,solver,setting,options,message", [
    (f"{KEY}.rtn.w4g100", "rtn", "w4g100", {}, "group size 100 does not divide the input dimension 576 of layer "
                                               f"'self_attn.q_proj' of model '{KEY}'"),
    (f"{KEY}.c4.n32.L512.ldlq.w3.gq5", "ldlq", "w3", {"guided_groups": 5}, "gq 5 does not divide the output size 576"),
])
def test_a_target_name_gets_the_message_of_the_config_entry(cfg, name, solver, setting, options, message):
    _prefill(cfg)
    exp = Experiment(cfg)
    assert exp.check_model_shapes(KEY)  # the config's own names fit
    from_target = _refusal(lambda: exp.check_name(QuantSpec.parse(name)))
    assert message in from_target
    cfg["methods"].append({"id": "x", "solver": solver, "settings": [setting], "options": options})
    cfg["gradients"] = {"groups": 20}  # the saliency's groups fit gq5: the shapes are what is left to refuse
    assert _refusal(lambda: Experiment(cfg).check_model_shapes(KEY)) == from_target


def test_shapes_come_before_the_statistics_and_both_are_checked(cfg):
    _prefill(cfg)
    exp = Experiment(cfg)
    # 576, 192 and 1536 split in 3, but the saliency (gradients.groups 4 by default) does not
    assert "needs the saliency in a multiple of 3 groups" in _refusal(
        lambda: exp.check_name(QuantSpec.parse(f"{KEY}.c4.n32.L512.ldlq.w3.gq3")))


def test_config_json_is_looked_up_in_resources_then_the_source_then_the_hub_cache(cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    shapes_of = Experiment(cfg).model_shapes
    assert shapes_of.config_file(KEY) is None
    # a hub id's snapshot in the Hugging Face cache
    repo = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text(json.dumps(SMOL))
    assert shapes_of.config_file(KEY) == repo / "snapshots" / "abc123" / "config.json"
    # a local source
    local = tmp_path / "local-model"
    local.mkdir()
    (local / "config.json").write_text(json.dumps(SMOL))
    cfg["models"][KEY]["source"] = str(local)
    assert Experiment(cfg).model_shapes.config_file(KEY) == local / "config.json"
    # the pre-filled (or fetched) resources folder before either
    prefilled = _prefill(cfg)
    assert Experiment(cfg).model_shapes.config_file(KEY) == prefilled


def test_a_name_is_not_refused_before_the_config_json_is_on_disk(cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    exp = Experiment(cfg)
    assert exp.check_name(QuantSpec.parse(f"{KEY}.rtn.w4g100")) is False  # the jobs check it (spec_of says so)
    assert exp.check_model_shapes(KEY) is False


def test_each_model_config_is_read_once(cfg, monkeypatch):
    _prefill(cfg)
    reads = []
    monkeypatch.setattr(shapes, "_read_json", lambda path: reads.append(path) or SMOL)
    exp = Experiment(cfg)
    for _ in range(3):
        assert exp.check_name(QuantSpec.parse(f"{KEY}.rtn.w4g64"))
        assert exp.check_model_shapes(KEY)
    assert len(reads) == 1


def test_unsupported_model_type_names_the_key_the_file_and_the_module(cfg):
    path = _prefill(cfg, {**SMOL, "model_type": "mamba"})
    with pytest.raises(UnsupportedArchitecture) as err:
        Experiment(cfg).check_model_shapes(KEY)
    message = str(err.value)
    assert "model type 'mamba' is not supported; supported model types: " in message
    assert f"model '{KEY}', config {path}" in message and "quantlib/access/adapters.py" in message


def test_a_damaged_config_json_is_named(cfg):
    path = _prefill(cfg)
    path.write_text("{not json")
    message = _refusal(lambda: Experiment(cfg).check_model_shapes(KEY))
    assert f"{path} cannot be read as a model's config.json" in message


def test_a_name_of_a_model_not_in_the_config_is_refused(cfg):
    assert "unknown model 'llama-9b'; models in the config: " in _refusal(
        lambda: Experiment(cfg).check_name(QuantSpec.parse("llama-9b.rtn.w4g64")))


def test_compare_of_a_row_with_itself_is_refused(cfg):
    cfg["tables"]["main_seeds"]["compare"] = [["ldlq", "ldlq"]]
    assert "tables.main_seeds.compare: [ldlq, ldlq] compares row 'ldlq' with itself" in _refusal(
        lambda: Experiment(cfg))


@pytest.mark.parametrize("budget", [-5, 0, "-5", "0GB", "0.0MB", "lots", 1.5])
def test_memory_budgets_of_nothing_are_refused(cfg, budget):
    cfg["compute"]["max_memory"] = budget
    assert f"config compute.max_memory: {budget!r} is no memory budget: give a positive amount" in _refusal(
        lambda: Experiment(cfg))


def test_memory_budgets(cfg):
    for budget in (800, "24GB", "0.5GB", None):
        cfg["compute"]["max_memory"] = budget
        Experiment(cfg)
    assert parse_memory("0.5GB") == 512 << 20 and parse_memory(None) is None
    for budget in (-5, 0, "0MB"):  # the reader refuses them too (a config not validated by the schema)
        with pytest.raises(ConfigError, match="is no memory budget: give a positive amount"):
            parse_memory(budget)


def test_unknown_options_of_a_config_entry_are_answered_with_config_keys(cfg):
    cfg["methods"].append({"id": "x", "solver": "uniquanf", "settings": ["w3"], "options": {"alpha_lrr": 0.1}})
    message = _refusal(lambda: Experiment(cfg))
    assert "methods entry 'x': unknown option 'alpha_lrr' for uniquanf; it takes the options: alpha_lr, " in message
    assert "<number>" not in message and "blr" not in message
