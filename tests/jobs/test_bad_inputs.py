"""Bad input, table-driven: each row is an input, a fragment of the message it must produce, and the stage by which
it must fail: `parse` (when a name or config is read), `dag` (`snakemake -n`, before any job) or `job` (the first
job that has the information, within seconds). A new check adds one row."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO
from test_workflow import snakemake, tiny_config, write_config
from quantlib.access.models import load_model
from quantlib.artifacts.integrity import verify
from quantlib.jobs.steps import load_tensor
from quantlib.stats.artifacts import compute_statistic

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
    ("truncated-model", "dag", _truncate_model, "resources/models/tiny/model.safetensors is damaged",
     f"results/quantized/{NAME}"),
    ("truncated-dataset", "dag", _truncate_dataset, "resources/datasets/toytrain.parquet is damaged",
     "results/calibration/tiny.toytrain.n8.L32.pt"),
    ("empty-dataset", "job", _empty_dataset, "empty.jsonl is empty", "results/calibration/tiny.toytrain.n8.L32.pt"),
    ("nan-weights", "job", _nan_weights, "tensor 'model.layers.1.mlp.down_proj.weight' in weights file "
     "model.safetensors", "resources/models/tiny"),  # the fetch's scan, not block 3 of a quantize job
]


# integrity (issue 33: records, remedies): an artifact with files missing or resized, or without its record, is found
# by the scan before any job (stat only), named with the folder to delete; one with other bytes of the same size, by
# the job that reads it.

CALIB = "tiny.toytrain.n8.L32"
STATS = f"results/stats/fp_hessian/{CALIB}"
FPIN_PPL = f"results/ppl/toytest.L32.nw8/{CALIB}.ldlq.w4g32.fpin.json"  # a result that reads STATS


def _no_checkpoint_record(work):
    (work / "results/quantized" / NAME / "checksums.json").unlink()
    shutil.rmtree(work / "results/ppl")


def _fp_hessians(work) -> Path:
    """The statistics artifact the stats job would write (its code, on the fetched model and windows)."""
    compute_statistic("fp_hessian", load_model(work / "resources/models/tiny"),
                      load_tensor(work / f"results/calibration/{CALIB}.pt"), work / STATS, CALIB, "tiny",
                      progress=False)
    return work / STATS


def _no_stats_record(work):
    (_fp_hessians(work) / "checksums.json").unlink()


def _stats_file_deleted(work):
    (_fp_hessians(work) / "block0001.safetensors").unlink()


def _pack_config_only(work):
    """A pack folder holding only config.json (copied by hand, or left by a tool that died)."""
    folder = work / "results/packed/ct" / NAME
    folder.mkdir(parents=True)
    shutil.copy(work / "results/quantized" / NAME / "config.json", folder / "config.json")


ROWS += [  # integrity (issue: records, remedies)
    ("checkpoint-without-record", "dag", _no_checkpoint_record, f"python -m quantlib adopt results/quantized/{NAME}",
     f"results/ppl/toytest.L32.nw8/{NAME}.json"),
    ("stats-without-record", "dag", _no_stats_record, f"{STATS} has no checksum record (checksums.json)", FPIN_PPL),
    ("stats-file-deleted", "dag", _stats_file_deleted,
     f"{STATS}/block0001.safetensors is damaged (the file is missing)", FPIN_PPL),
    ("pack-config-only", "dag", _pack_config_only, f"results/packed/ct/{NAME} has no checksum record",
     f"results/ppl/toytest.L32.nw8/{NAME}.pack-ct.json"),
]


# provenance and fetch (issue 33): a pre-filled resource that its config entry no longer describes stops the DAG;
# the fetch refuses non-finite weights, a data file without rows and a tokenizer that is not there.

def _prefilled_gguf_changed(work):
    """The air-gapped set-up: resources/ filled elsewhere (no Snakemake metadata here), then another GGUF named."""
    shutil.rmtree(work / ".snakemake", ignore_errors=True)
    cfg = _cfg(work)
    cfg["models"]["tiny"]["gguf_file"] = "tiny.Q4_0.gguf"
    write_config(work, cfg)


def _dataset_files_changed(work):
    other = work / "other-train.jsonl"
    shutil.copy(_cfg(work)["datasets"]["toytrain"]["data_files"], other)
    cfg = _cfg(work)
    cfg["datasets"]["toytrain"]["data_files"] = str(other)
    write_config(work, cfg)


def _zero_row_parquet(work):
    import pyarrow as pa
    import pyarrow.parquet as pq

    empty = work / "no-rows.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    cfg = _cfg(work)
    cfg["datasets"]["toytrain"] = {"path": "parquet", "data_files": str(empty)}
    write_config(work, cfg)
    shutil.rmtree(work / "resources/datasets")
    shutil.rmtree(work / "results/calibration")


def _tokenizer_missing(work):
    cfg = _cfg(work)
    cfg["models"]["tiny"]["tokenizer"] = str(work / "no-such-tokenizer")
    write_config(work, cfg)
    shutil.rmtree(work / "resources/models")  # not fetched yet: the fetch would read the tokenizer


ROWS += [  # provenance and fetch (issue 33)
    ("prefilled-gguf-changed", "dag", _prefilled_gguf_changed,
     "models.tiny.gguf_file is 'tiny.Q4_0.gguf' in the config, not set in the record"),
    ("dataset-files-changed", "dag", _dataset_files_changed, "datasets.toytrain.data_files is '"),
    ("zero-row-parquet", "job", _zero_row_parquet, "no-rows.parquet holds no rows",
     "results/calibration/tiny.toytrain.n8.L32.pt"),
    ("tokenizer-missing", "dag", _tokenizer_missing, "no-such-tokenizer' does not exist"),
]


# names and messages (issue 33): a name given as a target gets the shape checks of a config entry (tiny: 64 rows and
# columns, so neither 5 row blocks nor groups of 100 fit); bad pack paths, options, budgets, compare pairs and model
# types are answered with the project's message.

def _unknown_option(work):
    cfg = _cfg(work)
    cfg["methods"][0]["options"] = {"dampp": 0.1}
    write_config(work, cfg)


def _no_memory(work):
    cfg = _cfg(work)
    cfg["compute"] = {"max_memory": -5}
    write_config(work, cfg)


def _compare_self(work):
    cfg = _cfg(work)
    cfg["tables"]["main"]["compare"] = [["ldlq", "ldlq"]]
    write_config(work, cfg)


def _unsupported_type(work):
    f = work / "resources/models/tiny/config.json"
    text = f.read_text()
    assert '"model_type": "llama"' in text
    f.unlink()  # the fetched copy may be a hard link of the source
    f.write_text(text.replace('"model_type": "llama"', '"model_type": "mamba"'))  # same size: only the type differs


ROWS += [  # names and messages (issue 33)
    ("target-gq", "dag", None, "gq 5 does not divide the output size 64 of layer 'self_attn.q_proj' of model 'tiny'",
     "results/quantized/tiny.toytrain.n8.L32.ldlq.w3.gq5"),
    ("target-group-size", "dag", None, "group size 100 does not divide the input dimension 64 of layer "
     "'self_attn.q_proj' of model 'tiny'", "results/quantized/tiny.rtn.w4g100"),
    ("pack-format", "dag", None, "unknown pack format 'zip'; known: ct, gptq, anyprec, bcq",
     f"results/packed/zip/{NAME}"),
    ("pack-fp", "dag", None, "cannot pack 'tiny.fp' as ct: an FP model has nothing to pack",
     "results/packed/ct/tiny.fp"),
    ("option-key", "dag", _unknown_option, "unknown option 'dampp' for ldlq (minmax init); it takes the options: "),
    ("max-memory", "dag", _no_memory, "config compute.max_memory: -5 is no memory budget: give a positive amount"),
    ("compare-self", "dag", _compare_self, "tables.main.compare: [ldlq, ldlq] compares row 'ldlq' with itself"),
    ("model-type", "dag", _unsupported_type, "(model 'tiny', config resources/models/tiny/config.json). Support for "
     "another family is one Adapter entry in quantlib/access/adapters.py"),
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


@pytest.mark.parametrize("change", [_no_checkpoint_record, _corrupt_checkpoint], ids=["no-record", "other-bytes"])
def test_following_the_remedy_literally_rebuilds_the_artifact(change, base_run, tmp_path):
    """The command a message gives (`rm -rf` of the artifact folder, then the same snakemake command) rebuilds the
    artifact: at DAG time (no record) and in the job that reads it (same size, other bytes)."""
    work = tmp_path / "w"
    shutil.copytree(base_run, work, symlinks=True)
    change(work)
    target = f"results/ppl/toytest.L32.nw8/{NAME}.json"
    proc = snakemake(work, "--cores", "2", target)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    folders = set(re.findall(r"rm -rf ([^`\s]+)", out))
    assert folders == {f"results/quantized/{NAME}"}, out[-3000:]
    subprocess.run(["rm", "-rf", *folders], cwd=work, check=True)
    proc = snakemake(work, "--cores", "2", target)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    verify(work / "results/quantized" / NAME)
    assert json.loads((work / target).read_text())["value"] > 1
