"""Checks of the configuration's sources before any job: local paths exist, offline runs have what they need, and
each model's architecture and shapes (from its config.json, when on disk) fit every spec."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ConfigError
from .experiment import Experiment


def check_sources(exp: Experiment, offline: bool | None = None) -> None:
    """Before any job: local paths must exist, and offline runs need local sources or a pre-filled resources folder.
    Raises ConfigError naming the model or dataset and what to do."""
    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    used_models = exp.cfg["run_models"]
    used_datasets = set(exp.cfg["perplexity"]["datasets"])
    for spec in exp.all_specs():
        if spec.calib:
            used_datasets.add(spec.calib.dataset)
    for key in used_models:
        m = exp.cfg["models"][key]
        _check_model_shapes(exp, key)
        if Path(exp.model_path(key)).exists():
            continue
        src = Path(m["source"]).expanduser()
        looks_local = m["source"].startswith((".", "/", "~")) or src.exists()
        if looks_local and not src.exists():
            raise ConfigError(f"model '{key}': local source '{m['source']}' does not exist")
        if looks_local and m.get("gguf_file") and not (src / m["gguf_file"]).exists():
            raise ConfigError(f"model '{key}': GGUF file '{m['gguf_file']}' not found in '{m['source']}'")
        if looks_local and not m.get("gguf_file"):
            cfg_path = src / "config.json"
            if not cfg_path.exists():
                raise ConfigError(f"model '{key}': '{m['source']}' has no config.json")
        if not looks_local and offline and not _hub_cached("model", m["source"]):
            raise ConfigError(f"model '{key}': '{m['source']}' is a hub id, the hub is offline (HF_HUB_OFFLINE=1) "
                              f"and {exp.model_path(key)} is not pre-filled; set models.{key}.source to a local "
                              "directory")
    for key in sorted(used_datasets):
        d = exp.cfg["datasets"][key]
        if Path(exp.dataset_path(key)).exists():
            continue
        files = d.get("data_files")
        if files:
            flat = files.values() if isinstance(files, dict) else ([files] if isinstance(files, str) else files)
            flat = [f for v in flat for f in (v if isinstance(v, list) else [v])]
            if d["path"] in ("json", "parquet", "text", "csv", "arrow"):
                for f in flat:
                    if not any(ch in f for ch in "*?[") and not Path(f).expanduser().exists():
                        raise ConfigError(f"dataset '{key}': data file '{f}' does not exist")
                continue
        local = Path(d["path"]).expanduser()
        if d["path"].startswith((".", "/", "~")) and not local.exists():
            raise ConfigError(f"dataset '{key}': local path '{d['path']}' does not exist")
        if not local.exists() and offline and not _hub_cached("dataset", d["path"]):
            raise ConfigError(f"dataset '{key}': '{d['path']}' is a hub id, the hub is offline "
                              f"(HF_DATASETS_OFFLINE=1) and {exp.dataset_path(key)} is not pre-filled; set "
                              f"datasets.{key}.path/data_files to local files")


    _check_task_sources(exp)


def _check_task_sources(exp: Experiment) -> None:
    """Local copies of lm-eval task data must exist. Tasks that read the hub are not refused here, offline or not:
    whether lm-eval's datasets cache holds them is only known to lm-eval, and a dry run or a run whose lm-eval
    results are up to date needs no data. The lm-eval job checks every task's data before it loads the model and
    fails with a message naming the task (quantlib.lmeval.TaskSet.check_data)."""
    for task, opts in exp.lmeval_tasks.items():
        src = opts.get("source") or {}
        files = src.get("data_files")
        if files:
            flat = files.values() if isinstance(files, dict) else ([files] if isinstance(files, str) else files)
            for f in [f for v in flat for f in (v if isinstance(v, list) else [v])]:
                if not any(ch in f for ch in "*?[") and not Path(f).expanduser().exists():
                    raise ConfigError(f"lm_eval.tasks.{task}.source: data file '{f}' does not exist")
        elif src.get("path", "").startswith((".", "/", "~")) and not Path(src["path"]).expanduser().exists():
            raise ConfigError(f"lm_eval.tasks.{task}.source: local path '{src['path']}' does not exist")


def _check_model_shapes(exp: Experiment, key: str) -> None:
    """When the model's config.json is on disk (pre-filled resources or a local source): supported architecture,
    and every group size divides every quantized layer's input size."""
    from ..adapters import check_group_size_fits, check_row_groups_fit, get_adapter

    for folder in (Path(exp.model_path(key)), Path(exp.cfg["models"][key]["source"]).expanduser()):
        cfg_path = folder / "config.json"
        if cfg_path.exists():
            model_cfg = json.loads(cfg_path.read_text())
            get_adapter(model_cfg.get("model_type", "?"))
            for spec in exp.all_specs():
                if spec.model == key and not spec.is_fp:
                    check_group_size_fits(model_cfg, spec.group_size, key)
                    check_row_groups_fit(model_cfg, spec.opt_or("guided_groups", 0), key, "gq")
            return


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub's host accepts a connection (seconds, not a download's retries)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


_HUB = {}


def check_hub_for_download(exp: Experiment, kind: str, key: str) -> None:
    """Before a download job runs: a hub id (not pre-filled, not cached) needs the hub. Fails in seconds when the
    hub cannot be reached, naming the ways around it."""
    if kind == "model":
        source = exp.cfg["models"][key]["source"]
        local = Path(source).expanduser().exists() or source.startswith((".", "/", "~"))
        where, setting = exp.model_path(key), f"models.{key}.source"
    else:
        d = exp.cfg["datasets"][key]
        source = d["path"]
        local = (d["path"] in ("json", "parquet", "text", "csv", "arrow") or Path(source).expanduser().exists()
                 or source.startswith((".", "/", "~")))
        where, setting = exp.dataset_path(key), f"datasets.{key}.path/data_files"
    if local or Path(where).exists() or _hub_cached(kind, source):
        return
    if "ok" not in _HUB:
        _HUB["ok"] = hub_reachable()
    if not _HUB["ok"]:
        raise ConfigError(
            f"{kind} '{key}' is the hub id '{source}', and the Hugging Face hub cannot be reached from this machine. "
            f"Use local copies instead: point {setting} at local files, or pre-fill {where} (the `resources:` "
            "folder) on a connected machine, or run the same pipeline on the assets staged beside this repository "
            "with `snakemake --cores 2 --configfile config.yaml tests/offline.yaml`.")


def _hub_cached(kind: str, repo_id: str) -> bool:
    """Whether a hub id has a local copy in the Hugging Face caches (then an offline run can still use it)."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser()
    if kind == "model":
        hub = Path(os.environ.get("HF_HUB_CACHE", home / "hub"))
        return (hub / f"models--{repo_id.replace('/', '--')}").exists()
    cache = Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets"))
    hub = Path(os.environ.get("HF_HUB_CACHE", home / "hub"))
    return ((cache / repo_id.replace("/", "___")).exists() or (cache / repo_id.split("/")[-1]).exists()
            or (hub / f"datasets--{repo_id.replace('/', '--')}").exists())

