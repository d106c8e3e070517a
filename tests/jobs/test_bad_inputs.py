"""Bad input, table-driven: each row is an input, a fragment of the message it must produce, and the stage by which
it must fail: `parse` (when a name or config is read), `dag` (`snakemake -n`, before any job) or `job` (the first
job that has the information, within seconds). A new check adds one row."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO
from test_workflow import snakemake, tiny_config, write_config

NAME = "tiny.toytrain.n8.L32.ldlq.w4g32"


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_dir, text_files):
    """A finished tiny workflow (fetched model and data, one quantized model and its perplexity)."""
    work = tmp_path_factory.mktemp("bad-inputs")
    cfg = tiny_config(tiny_dir, text_files)
    cfg["methods"] = [{"id": "ldlq", "solver": "ldlq", "bits": [4], "group_size": [32]}]
    write_config(work, cfg)
    proc = snakemake(work, "--cores", "2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return work


def _cfg(work: Path) -> dict:
    return yaml.safe_load((work / "config.yaml").read_text())


# ------------------------------------------------------------------------------------------------ the table
# (id, stage, change, expected message fragment[, target]). `change(work)` breaks a copy of the finished workflow.

def _dup_key(work):
    text = (work / "config.yaml").read_text()
    (work / "config.yaml").write_text(text + "\nresources: resources\n")


def _overlay(work):
    (work / "overlay.yaml").write_text(yaml.safe_dump({"compute": {"seed": 0}}))
    return ["--configfile", str(work / "overlay.yaml"), str(work / "config.yaml")]


def _unknown_task(work):
    cfg = _cfg(work)
    cfg["lm_eval"] = {"tasks": {"arc_esay": {"limit": 4}}}
    cfg["tables"]["zs"] = {"rows": ["fp"], "metrics": ["arc_esay.acc"]}
    write_config(work, cfg)


def _group_size(work):
    cfg = _cfg(work)
    cfg["methods"][0]["group_size"] = [48]
    write_config(work, cfg)


def _gq(work):
    cfg = _cfg(work)
    cfg["methods"].append({"id": "lnq", "solver": "lnq", "bits": [2], "options": {"guided_groups": 3}})
    cfg["gradients"] = {"groups": 3}
    write_config(work, cfg)


def _corrupt_checkpoint(work):
    """Zeros over a stretch of the checkpoint's weights: the same size, other bytes."""
    f = work / "results/quantized" / NAME / "model-00001-of-00003.safetensors"
    data = bytearray(f.read_bytes())
    data[-4096:-2048] = bytes(2048)
    f.unlink()  # the fetched copy may be a hard link of the source
    f.write_bytes(bytes(data))
    shutil.rmtree(work / "results/ppl")


def _truncate_model(work):
    f = work / "resources/models/tiny/model.safetensors"
    data = f.read_bytes()
    f.unlink()
    f.write_bytes(data[: len(data) // 2])
    shutil.rmtree(work / "results/quantized")


def _truncate_dataset(work):
    f = work / "resources/datasets/toytrain.parquet"
    f.write_bytes(f.read_bytes()[:100])
    for p in (work / "results/calibration").iterdir():
        p.unlink()


def _empty_dataset(work):
    empty = work / "empty.jsonl"
    empty.write_text("")
    cfg = _cfg(work)
    cfg["datasets"]["toytrain"]["data_files"] = str(empty)
    write_config(work, cfg)
    shutil.rmtree(work / "resources/datasets")
    shutil.rmtree(work / "results/calibration")


def _nan_weights(work):
    from safetensors.torch import load_file, save_file

    src = work / "nan-model"
    shutil.copytree(_cfg(work)["models"]["tiny"]["source"], src)
    state = load_file(str(src / "model.safetensors"))
    state["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    cfg = _cfg(work)
    cfg["models"]["tiny"]["source"] = str(src)
    write_config(work, cfg)
    shutil.rmtree(work / "resources/models")
    shutil.rmtree(work / "results/quantized")


ROWS = [
    ("duplicated-key", "dag", _dup_key, "key 'resources' is written twice"),
    ("overlay-first", "dag", _overlay, "give the whole config first"),
    ("unknown-task", "dag", _unknown_task, "'arc_esay' is no task, group or tag of the installed lm-eval"),
    ("group-size", "dag", _group_size, "group size 48 does not divide the input dimension 64"),
    ("guided-groups", "dag", _gq, "gq 3 does not divide the output size 64"),
    ("refused-name", "dag", None, "'sym' (symmetric grid) does not apply to spqr",
     "results/quantized/tiny.toytrain.n8.L32.spqr.w3g16.sym"),
    ("corrupt-checkpoint", "job", _corrupt_checkpoint, f"results/quantized/{NAME}/model-00001-of-00003.safetensors is damaged",
     f"results/ppl/toytest.L32.nw8/{NAME}.json"),
    ("truncated-model", "job", _truncate_model, "resources/models/tiny/model.safetensors is damaged",
     f"results/quantized/{NAME}"),
    ("truncated-dataset", "job", _truncate_dataset, "resources/datasets/toytrain.parquet is damaged",
     "results/calibration/tiny.toytrain.n8.L32.pt"),
    ("empty-dataset", "job", _empty_dataset, "empty.jsonl is empty", "results/calibration/tiny.toytrain.n8.L32.pt"),
    ("nan-weights", "job", _nan_weights, "tensor 'model.layers.1.mlp.down_proj.weight'", f"results/quantized/{NAME}"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_fails_at_its_stage_naming_the_problem(row, base_run, tmp_path):
    name, stage, change, message, *target = row
    work = tmp_path / "w"
    shutil.copytree(base_run, work, symlinks=True)
    extra = (change(work) if change else None) or []
    args = ["--cores", "2", *target, *extra]
    if stage == "dag":
        args = ["-n", *args]
    t0 = time.time()
    proc = snakemake(work, *args)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert message in out, out[-3000:]
    assert "Traceback" not in out
    if stage == "dag":
        assert "rule " not in proc.stdout.split("Building DAG of jobs...")[-1].split(message)[0]
    else:  # the first seconds of the job that has the information: no model was quantized or evaluated
        assert time.time() - t0 < 120
        assert not (work / target[0]).exists()  # nothing half-written in its place
        assert not list((work / "results").rglob(".*.tmp-*"))


def test_parse_stage_rows():
    """Names and config entries refused when read (more in tests/catalog/test_spec.py and tests/solvers/test_guidedquant.py)."""
    from quantlib.errors import ConfigError
    from quantlib.catalog.spec import QuantSpec

    for name, message in [("m.rtn.w4g64.damp0p1", "does not apply to rtn"),
                          ("m.c4.n8.L32.ldlq.neuqii.w4g64", "'neuqii' is not an init"),
                          ("m.c4.n8.L32.lsq.w3g32.bs16", "batch (16) is larger than the 8 calibration windows")]:
        with pytest.raises(ConfigError, match=message.replace("(", ".").replace(")", ".")):
            QuantSpec.parse(name)
