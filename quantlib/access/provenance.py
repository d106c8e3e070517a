"""Provenance of fetched resources: what a model folder or a dataset file in `resources/` was made from.

`fetch_model` writes `provenance.json` inside the model folder (before it is sealed, so its checksum record covers
it); `fetch_dataset` writes `{dataset}.provenance.json` beside the parquet, in the same atomic write. Before any
job (`check_sources`, at the Snakefile's parse) the config entry is compared with the record, cheaply:

- the config fields that decide the content (a model's source, gguf_file, revision and tokenizer; a dataset's
  path, name, data_files, split, revision, text_column and rows), as written in the config;
- for local sources that still exist: the names and sizes of the files the fetch read, and the SHA-256 of those up
  to 4 MiB (configs, tokenizers, small data files: milliseconds). Big files are compared by size only, since
  hashing gigabytes at every parse would cost seconds; mtimes are not compared, because a copy or a checkout
  changes them without changing a byte.

A folder without a record (a `resources/` filled by hand on a connected machine) is adopted: the record is written
from the current config, and later changes are compared with that. Pure Python (no torch): the Snakefile imports it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from quantlib.artifacts.atomic import versions, write_json
from quantlib.errors import ConfigError

MODEL_RECORD = "provenance.json"
MODEL_FIELDS = ("source", "gguf_file", "revision", "tokenizer")
DATASET_FIELDS = ("path", "name", "data_files", "split", "revision", "text_column", "rows")
SMALL = 4 << 20  # files up to this size are hashed at parse time too (a few ms each)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")
# What a local Hugging Face model directory contributes to the fetched copy (fetch_model copies exactly these).
COPIED_SUFFIXES = (".safetensors", ".json", ".bin", ".model", ".txt", ".jinja")


# ------------------------------------------------------------------------------------------------ records

def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_record(path: Path, hash_limit: int | None = None) -> dict:
    """Size, and SHA-256 unless the file is larger than `hash_limit` (None: always)."""
    size = Path(path).stat().st_size
    if hash_limit is not None and size > hash_limit:
        return {"size": size}
    return {"size": size, "sha256": sha256(path)}


def model_fields(cfg: dict) -> dict:
    return {k: cfg.get(k) for k in MODEL_FIELDS}


def dataset_fields(cfg: dict) -> dict:
    """The config fields that decide a dataset artifact's rows, with the schema's defaults filled in (the API may
    pass a bare entry)."""
    out = {k: cfg.get(k) for k in DATASET_FIELDS}
    out["split"] = out["split"] or "train"
    out["text_column"] = out["text_column"] or "text"
    out["rows"] = list(out["rows"]) if out["rows"] else None
    return out


def dataset_record_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".provenance.json")


def looks_local(spec: str) -> bool:
    """A source or tokenizer given as a path (rather than a hub id): written as one, or an existing path."""
    return spec.startswith((".", "/", "~")) or Path(spec).expanduser().exists()


def local_model_inputs(source: str, gguf_file: str | None, tokenizer: str | None) -> dict[str, dict[str, Path]]:
    """The local files a model fetch reads: {"source": {name: path}, "tokenizer": {name: path}} (empty for hub ids
    and for paths that do not exist)."""
    out = {"source": {}, "tokenizer": {}}
    src = Path(source).expanduser()
    if src.is_dir():
        if gguf_file:
            out["source"] = {n: src / n for n in (gguf_file, *TOKENIZER_FILES) if (src / n).is_file()}
        else:
            out["source"] = {p.name: p for p in sorted(src.iterdir())
                             if p.is_file() and p.suffix in COPIED_SUFFIXES}
    if tokenizer and Path(tokenizer).expanduser().is_dir():
        tok = Path(tokenizer).expanduser()
        out["tokenizer"] = {n: tok / n for n in TOKENIZER_FILES if (tok / n).is_file()}
    return out


def dataset_local_files(cfg: dict) -> list[str]:
    """The local data files of a dataset entry, as written in the config (glob patterns left out)."""
    files = cfg.get("data_files")
    if not files:
        return []
    flat = files.values() if isinstance(files, dict) else ([files] if isinstance(files, str) else files)
    return [f for v in flat for f in (v if isinstance(v, list) else [v]) if not any(ch in f for ch in "*?[")]


def model_record(cfg: dict, key: str | None, known: dict | None = None, weights: dict | None = None,
                 extra: dict | None = None, hash_limit: int | None = None) -> dict:
    """The provenance record of a model folder made from the config entry `cfg`. `known` maps source file names to
    records already computed (the weights' hashes from the finiteness scan, which reads every byte anyway)."""
    inputs = local_model_inputs(cfg["source"], cfg.get("gguf_file"), cfg.get("tokenizer"))
    known = known or {}
    files = {section: {n: known.get(n) if section == "source" and n in known else file_record(p, hash_limit)
                       for n, p in paths.items()} for section, paths in inputs.items()}
    return {"kind": "model", "key": key, "config": model_fields(cfg), "source_files": files["source"],
            "tokenizer_files": files["tokenizer"], "weights": weights, **(extra or {}),
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions()}


def dataset_record(cfg: dict, key: str | None, rows: int | None, hash_limit: int | None = None) -> dict:
    files = {f: file_record(Path(f).expanduser(), hash_limit) for f in dataset_local_files(cfg)
             if Path(f).expanduser().is_file()}
    return {"kind": "dataset", "key": key, "config": dataset_fields(cfg), "local_files": files, "rows": rows,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions()}


# ------------------------------------------------------------------------------------------------ checks

def check_model(key: str, cfg: dict, folder: str | Path) -> None:
    """Compare an existing model folder's record with its config entry `models.{key}`; adopt a folder without one.
    Raises ConfigError naming each config key that differs, both values and the folder to delete."""
    folder = Path(folder)
    record_path = folder / MODEL_RECORD
    if not record_path.exists():
        if (folder / "config.json").exists():  # a folder without config.json is no model: its reader says so
            _adopt_model(key, cfg, folder, record_path)
        return
    record = _read(record_path, folder)
    diffs = _field_diffs(f"models.{key}", record["config"], model_fields(cfg))
    fields_differ = bool(diffs)
    if not diffs:
        inputs = local_model_inputs(cfg["source"], cfg.get("gguf_file"), cfg.get("tokenizer"))
        for setting in ("source", "tokenizer"):
            # Only sources still on this machine: an air-gapped copy may have the folder and nothing else.
            if cfg.get(setting) and Path(cfg[setting]).expanduser().is_dir():
                diffs += _file_diffs(f"models.{key}.{setting}", repr(cfg[setting]),
                                     record.get(f"{setting}_files") or {}, inputs[setting])
    if diffs:
        raise ConfigError(_stale_message(folder, record_path, diffs, files=not fields_differ))


def check_dataset(key: str, cfg: dict, path: str | Path) -> None:
    """The same for a dataset artifact and its `datasets.{key}` entry."""
    path = Path(path)
    record_path = dataset_record_path(path)
    if not record_path.exists():
        _adopt_dataset(key, cfg, path, record_path)
        return
    record = _read(record_path, path)
    diffs = _field_diffs(f"datasets.{key}", record["config"], dataset_fields(cfg))
    fields_differ = bool(diffs)
    if not diffs:
        current = {f: Path(f).expanduser() for f in dataset_local_files(cfg) if Path(f).expanduser().is_file()}
        recorded = record.get("local_files") or {}
        if current:  # only files still on this machine (an air-gapped copy may have the parquet alone)
            diffs += _file_diffs(f"datasets.{key}.data_files", "the data files", recorded, current)
    if diffs:
        raise ConfigError(_stale_message(path, record_path, diffs, files=not fields_differ))


def _read(record_path: Path, artifact: Path) -> dict:
    try:
        record = json.loads(record_path.read_text())
        if not isinstance(record.get("config"), dict):
            raise KeyError("config")
        return record
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{record_path}, the record of what {artifact} was made from, is unreadable "
                          f"({type(exc).__name__}: {exc}); delete {artifact} and {record_path} to fetch it again"
                          ) from None


def _show(value) -> str:
    if value is None:
        return "not set"
    return repr(value) if isinstance(value, str) else json.dumps(value)


def _field_diffs(prefix: str, recorded: dict, configured: dict) -> list[str]:
    return [f"{prefix}.{k} is {_show(configured.get(k))} in the config, {_show(recorded.get(k))} in the record"
            for k in configured if recorded.get(k) != configured.get(k)]


def _file_diffs(setting: str, where: str, recorded: dict, current: dict[str, Path]) -> list[str]:
    """Names, sizes (and hashes of small files) of the local files now, against the record."""
    diffs = []
    for name in sorted(set(recorded) - set(current)):
        diffs.append(f"{setting}: '{name}' was read from {where} when the record was written and is gone now")
    for name in sorted(set(current) - set(recorded)):
        diffs.append(f"{setting}: '{name}' in {where} is new since the record was written")
    for name in sorted(set(recorded) & set(current)):
        want, path = recorded[name] or {}, current[name]
        size = path.stat().st_size
        if "size" in want and size != want["size"]:
            diffs.append(f"{setting}: '{name}' is {size:,} bytes now, {want['size']:,} in the record")
        elif "sha256" in want and size <= SMALL and sha256(path) != want["sha256"]:
            diffs.append(f"{setting}: '{name}' has other bytes now than in the record (SHA-256 differs)")
    return diffs


def _stale_message(artifact: Path, record_path: Path, diffs: list[str], files: bool) -> str:
    back = "restore the source's files" if files else "set the config back to the recorded value"
    return (f"{artifact} no longer matches its config entry (what it was made from is recorded in {record_path}): "
            f"{'; '.join(diffs)}. The workflow would use the old copy under the new config. Delete {artifact} to "
            f"fetch it again from the config, or {back}.")


def _adopt_model(key: str, cfg: dict, folder: Path, record_path: Path) -> None:
    record = model_record(cfg, key, hash_limit=SMALL,
                          extra={"adopted": "written from the config when this folder was first used; the folder "
                                            "itself was not fetched by this workflow on this machine"})
    stat = folder.stat()
    if not _write_record(record_path, record, folder):
        return
    # A new file changes the folder's mtime, which Snakemake reads as a newer model: keep the old one, so adopting
    # reruns nothing downstream.
    os.utime(folder, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    _say(f"{folder} has no provenance record (filled by hand?): adopted as models.{key} "
         f"(source {_show(cfg['source'])}, gguf_file {_show(cfg.get('gguf_file'))}) in {record_path}; later changes "
         "of that entry stop the run")


def _adopt_dataset(key: str, cfg: dict, path: Path, record_path: Path) -> None:
    record = dict(dataset_record(cfg, key, rows=None, hash_limit=SMALL),
                  adopted="written from the config when this file was first used; the file itself was not fetched "
                          "by this workflow on this machine")
    if not _write_record(record_path, record, path):
        return
    _say(f"{path} has no provenance record (filled by hand?): adopted as datasets.{key} "
         f"(path {_show(cfg['path'])}, data_files {_show(cfg.get('data_files'))}) in {record_path}; later changes "
         "of that entry stop the run")


def _write_record(record_path: Path, record: dict, artifact: Path) -> bool:
    """Write an adopted record; a read-only pre-fill (a shared copy) is used as it is, saying what goes unchecked."""
    try:
        write_json(record_path, record)
        return True
    except OSError as exc:
        _say(f"{artifact} has no provenance record and none can be written ({type(exc).__name__}: {exc}): changes of "
             f"its config entry are not noticed; make {record_path.parent} writable once to record it")
        return False


def _say(line: str) -> None:
    print(line, file=sys.stderr)
