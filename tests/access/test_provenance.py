"""Provenance of fetched resources (quantlib.access.provenance): what a model folder or dataset file was made from is
recorded at fetch; before any job, a config entry that no longer matches stops the run naming the key, both values
and what to delete; a folder without a record is adopted. And what the fetch refuses: non-finite weights (naming
the tensor), a data file without rows, a tokenizer path that is not there."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from quantlib.access.datasets import fetch_dataset
from quantlib.access.models import fetch_model, scan_safetensors
from quantlib.access.provenance import MODEL_RECORD, dataset_record_path
from quantlib.artifacts.integrity import CHECKSUMS, verify
from quantlib.config.experiment import Experiment
from quantlib.config.preflight import check_sources
from quantlib.errors import ConfigError, DataError


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _config(tmp_path: Path, source: Path, data: Path, **model) -> dict:
    return {
        "resources": str(tmp_path / "resources"),
        "models": {"tiny": {"source": str(source), **model}},
        "datasets": {"toy": {"path": "json", "data_files": str(data)}},
        "run_models": ["tiny"],
        "perplexity": {"seqlen": 32, "datasets": {"toy": {}}},
        "methods": [{"id": "rtn", "solver": "rtn", "bits": [4], "group_size": [32]}],
    }


@pytest.fixture
def fetched(tmp_path, tiny_dir, text_files):
    """A copy of the tiny model and of a text file as sources, fetched into resources/ as the workflow does."""
    src = tmp_path / "src"
    shutil.copytree(tiny_dir, src)
    data = tmp_path / "train.jsonl"
    shutil.copy(text_files["train"], data)
    cfg = _config(tmp_path, src, data)
    exp = Experiment(cfg)
    fetch_model(str(src), exp.model_path("tiny"), model_key="tiny")
    fetch_dataset(exp.dataset_cfg("toy"), exp.dataset_path("toy"), key="toy")
    return cfg


def test_fetch_records_a_local_models_provenance(fetched, tmp_path):
    folder = tmp_path / "resources/models/tiny"
    record = json.loads((folder / MODEL_RECORD).read_text())
    src = tmp_path / "src"
    assert record["config"] == {"source": str(src), "gguf_file": None, "revision": None, "tokenizer": None}
    assert record["source_files"]["model.safetensors"] == {"size": (src / "model.safetensors").stat().st_size,
                                                           "sha256": _sha(src / "model.safetensors")}
    assert record["source_files"]["tokenizer.json"]["sha256"] == _sha(src / "tokenizer.json")
    weights = record["weights"]
    assert weights["nonfinite"] == 0 and weights["tensors"] > 10 and weights["elements"] > 10_000
    # Written before the folder was sealed: its checksum record covers it.
    assert MODEL_RECORD in json.loads((folder / CHECKSUMS).read_text())["files"]
    verify(folder)


def test_fetch_records_a_local_datasets_provenance(fetched, tmp_path):
    record = json.loads(dataset_record_path(tmp_path / "resources/datasets/toy.parquet").read_text())
    data = tmp_path / "train.jsonl"
    assert (tmp_path / "resources/datasets/toy.provenance.json").exists()
    assert record["config"]["data_files"] == str(data) and record["config"]["split"] == "train"
    assert record["local_files"][str(data)] == {"size": data.stat().st_size, "sha256": _sha(data)}
    assert record["rows"] == 400


def _replace(path: Path, data: bytes) -> None:
    path.unlink()  # the fetched copy is a hard link of the source: replace, do not overwrite
    path.write_bytes(data)


@pytest.mark.parametrize("change,message", [
    (lambda cfg, tmp: cfg["models"]["tiny"].update(gguf_file="other.gguf"),
     "models.tiny.gguf_file is 'other.gguf' in the config, not set in the record"),
    (lambda cfg, tmp: cfg["models"]["tiny"].update(revision="v2"),
     "models.tiny.revision is 'v2' in the config, not set in the record"),
    (lambda cfg, tmp: (shutil.copytree(tmp / "src", tmp / "src2"),
                       cfg["models"]["tiny"].update(source=str(tmp / "src2"))),
     "models.tiny.source is '{tmp}/src2' in the config, '{tmp}/src' in the record"),
    (lambda cfg, tmp: _replace(tmp / "src/model.safetensors", (tmp / "src/model.safetensors").read_bytes()[:-4096]),
     "models.tiny.source: 'model.safetensors' is"),
    (lambda cfg, tmp: _replace(tmp / "src/tokenizer_config.json",
                               (tmp / "src/tokenizer_config.json").read_bytes().replace(b"<s>", b"<S>")),
     "models.tiny.source: 'tokenizer_config.json' has other bytes now"),
])
def test_a_changed_model_entry_stops_the_run(fetched, tmp_path, change, message):
    change(fetched, tmp_path)
    folder = tmp_path / "resources/models/tiny"
    with pytest.raises(ConfigError) as err:
        check_sources(Experiment(fetched), offline=True)
    text = str(err.value)
    assert message.format(tmp=tmp_path) in text
    assert f"Delete {folder} to fetch it again" in text and f"{folder}/{MODEL_RECORD}" in text


@pytest.mark.parametrize("change,message", [
    (lambda cfg, tmp: (shutil.copy(tmp / "train.jsonl", tmp / "other.jsonl"),
                       cfg["datasets"]["toy"].update(data_files=str(tmp / "other.jsonl"))),
     "datasets.toy.data_files is '{tmp}/other.jsonl' in the config, '{tmp}/train.jsonl' in the record"),
    (lambda cfg, tmp: cfg["datasets"]["toy"].update(rows=[0, 10]),
     "datasets.toy.rows is [0, 10] in the config, not set in the record"),
    (lambda cfg, tmp: (tmp / "train.jsonl").write_text((tmp / "train.jsonl").read_text()[:-200]),
     "datasets.toy.data_files: '{tmp}/train.jsonl' is"),
])
def test_a_changed_dataset_entry_stops_the_run(fetched, tmp_path, change, message):
    change(fetched, tmp_path)
    with pytest.raises(ConfigError) as err:
        check_sources(Experiment(fetched), offline=True)
    text = str(err.value)
    assert message.format(tmp=tmp_path) in text
    assert f"Delete {tmp_path}/resources/datasets/toy.parquet to fetch it again" in text


def test_an_unchanged_entry_passes_and_the_remedy_works(fetched, tmp_path):
    check_sources(Experiment(fetched), offline=True)
    fetched["models"]["tiny"]["revision"] = "v2"
    with pytest.raises(ConfigError, match="models.tiny.revision"):
        check_sources(Experiment(fetched), offline=True)
    shutil.rmtree(tmp_path / "resources/models/tiny")  # as the message says: the folder goes, the check passes
    check_sources(Experiment(fetched), offline=True)


def test_a_folder_without_record_is_adopted(tmp_path, tiny_dir, text_files, capsys):
    """A resources folder filled by hand (copied from a connected machine): adopted on first use, saying so; later
    changes of its entry are refused like those of a fetched one. Adopting changes no mtime Snakemake reads."""
    cfg = _config(tmp_path, tmp_path / "gone-source", text_files["train"])
    folder, parquet = tmp_path / "resources/models/tiny", tmp_path / "resources/datasets/toy.parquet"
    shutil.copytree(tiny_dir, folder)
    fetch_dataset({"path": "json", "data_files": str(text_files["train"])}, parquet, "toy")
    dataset_record_path(parquet).unlink()
    os.utime(folder, (1_000_000, 1_000_000))
    check_sources(Experiment(cfg), offline=True)
    err = capsys.readouterr().err
    assert re.search(rf"{folder} has no provenance record .*adopted as models.tiny", err)
    assert re.search(rf"{parquet} has no provenance record .*adopted as datasets.toy", err)
    record = json.loads((folder / MODEL_RECORD).read_text())
    assert record["adopted"] and record["config"]["source"] == str(tmp_path / "gone-source")
    assert folder.stat().st_mtime == 1_000_000
    check_sources(Experiment(cfg), offline=True)
    assert "adopted" not in capsys.readouterr().err  # once
    cfg["models"]["tiny"]["gguf_file"] = "model.gguf"
    with pytest.raises(ConfigError, match="models.tiny.gguf_file is 'model.gguf' in the config, not set in the record"):
        check_sources(Experiment(cfg), offline=True)


def test_non_finite_weights_stop_the_fetch_naming_the_tensor(tmp_path, tiny_dir):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(tiny_dir, src)
    state = load_file(str(src / "model.safetensors"))
    state["model.layers.1.mlp.down_proj.weight"][3, 5] = float("inf")
    state["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    (src / "model.safetensors").unlink()
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DataError, match="tensor 'model.layers.1.mlp.down_proj.weight' in weights file "
                                        "model.safetensors of model .* holds 2 NaN or Inf values"):
        fetch_model(str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float64])
def test_the_scan_reads_in_chunks_and_hashes_the_file(tmp_path, dtype):
    """A tensor larger than a chunk, after an integer tensor: every value is seen, and the SHA-256 is the file's."""
    from safetensors.torch import save_file

    big = torch.randn(100, 37).to(dtype)
    path = tmp_path / "w.safetensors"
    save_file({"a.ids": torch.arange(7), "b.weight": big}, str(path))
    summary = scan_safetensors(path, "m", hash_file=True, chunk=256)
    assert summary == {"size": path.stat().st_size, "tensors": 2, "elements": 3700, "sha256": _sha(path)}
    big[99, 36] = float("nan")  # the very last value, in the last chunk
    save_file({"a.ids": torch.arange(7), "b.weight": big}, str(path))
    with pytest.raises(DataError, match="tensor 'b.weight' in weights file w.safetensors of model 'm' holds 1 NaN"):
        scan_safetensors(path, "m", chunk=256)


@pytest.mark.parametrize("name,write", [
    ("empty.parquet", lambda p: __import__("pyarrow.parquet").parquet.write_table(
        __import__("pyarrow").table({"text": __import__("pyarrow").array([], __import__("pyarrow").string())}), p)),
    ("blank.jsonl", lambda p: p.write_text("\n\n  \n")),
])
def test_a_data_file_without_rows_says_so(tmp_path, name, write):
    path = tmp_path / name
    write(path)
    loader = "parquet" if name.endswith(".parquet") else "json"
    with pytest.raises(DataError, match=f"dataset 'toy': .*{name} holds no rows .*point `datasets.toy.data_files` at "
                                        "a file with text rows"):
        fetch_dataset({"path": loader, "data_files": str(path)}, tmp_path / "out.parquet", "toy")
    assert not (tmp_path / "out.parquet").exists() and not dataset_record_path(tmp_path / "out.parquet").exists()


def test_a_tokenizer_path_is_checked_like_the_source(tmp_path, tiny_dir, text_files):
    cfg = _config(tmp_path, tiny_dir, text_files["train"], tokenizer=str(tmp_path / "no-tokenizer"))
    with pytest.raises(ConfigError, match="model 'tiny': local tokenizer '.*no-tokenizer' does not exist"):
        check_sources(Experiment(cfg), offline=False)
    (tmp_path / "no-tokenizer").mkdir()
    with pytest.raises(ConfigError, match="tokenizer '.*no-tokenizer' is no tokenizer directory"):
        check_sources(Experiment(cfg), offline=False)
    cfg["models"]["tiny"]["tokenizer"] = "someone/tokenizer"
    with pytest.raises(ConfigError, match="tokenizer 'someone/tokenizer' is no local directory .* offline"):
        check_sources(Experiment(cfg), offline=True)
    cfg["models"]["tiny"]["tokenizer"] = str(tiny_dir)  # a real one: accepted, fetched and recorded
    check_sources(Experiment(cfg), offline=True)
    with pytest.raises(DataError, match="local tokenizer '.*nowhere' is no directory"):
        fetch_model(str(tiny_dir), tmp_path / "out", tokenizer=str(tmp_path / "nowhere"))
    fetch_model(str(tiny_dir), tmp_path / "out", tokenizer=str(tiny_dir))
    record = json.loads((tmp_path / "out" / MODEL_RECORD).read_text())
    assert record["tokenizer_files"]["tokenizer.json"]["sha256"] == _sha(tiny_dir / "tokenizer.json")


def test_a_read_only_prefill_is_used_saying_what_goes_unchecked(tmp_path, tiny_dir, text_files, capsys, monkeypatch):
    import quantlib.access.provenance as provenance

    def refuse(path, obj):
        raise PermissionError(13, "Permission denied", str(path))

    cfg = _config(tmp_path, tiny_dir, text_files["train"])
    shutil.copytree(tiny_dir, tmp_path / "resources/models/tiny")
    monkeypatch.setattr(provenance, "write_json", refuse)
    check_sources(Experiment(cfg), offline=True)
    assert "has no provenance record and none can be written (PermissionError" in capsys.readouterr().err
    assert not (tmp_path / "resources/models/tiny" / MODEL_RECORD).exists()
