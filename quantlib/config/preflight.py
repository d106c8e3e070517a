"""Checks of the configuration's sources before any job: local paths exist, offline runs have what they need, and
each model's architecture and shapes (from its config.json, when on disk) fit every spec."""

from __future__ import annotations

import os
from pathlib import Path

from quantlib.access.provenance import check_dataset as check_dataset_provenance
from quantlib.access.provenance import check_model as check_model_provenance
from quantlib.access.provenance import looks_local
from quantlib.config.experiment import Experiment
from quantlib.errors import ConfigError


def check_sources(exp: Experiment, offline: bool | None = None) -> None:
    """Before any job: local paths must exist, and offline runs need local sources or a pre-filled resources folder;
    an existing model folder or dataset file must still match its config entry (its provenance record; one without
    a record is adopted). Raises ConfigError naming the model or dataset and what to do."""
    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    used_models = exp.cfg["run_models"]
    used_datasets = set(exp.cfg["perplexity"]["datasets"])
    for spec in exp.all_specs():
        for calib in (spec.calib, spec.distill.calib if spec.distill else None):
            if calib:
                used_datasets.update(exp.calibration_datasets(calib.dataset))
    for key in used_models:  # shapes first, against each config.json on disk (the messages name the file)
        exp.check_model_shapes(key)
    for key in used_models:
        m = exp.cfg["models"][key]
        if Path(exp.model_path(key)).exists():
            check_model_provenance(key, m, exp.model_path(key))  # a pre-fill that the config no longer describes
            continue
        src = Path(m["source"]).expanduser()
        local = looks_local(m["source"])
        if local and not src.exists():
            raise ConfigError(f"model '{key}': local source '{m['source']}' does not exist")
        if local and m.get("gguf_file") and not (src / m["gguf_file"]).exists():
            raise ConfigError(f"model '{key}': GGUF file '{m['gguf_file']}' not found in '{m['source']}'")
        if local and not m.get("gguf_file"):
            cfg_path = src / "config.json"
            if not cfg_path.exists():
                raise ConfigError(f"model '{key}': '{m['source']}' has no config.json")
        if not local and offline and not _hub_cached("model", m["source"]):
            raise ConfigError(f"model '{key}': '{m['source']}' is no local directory (relative paths are read from "
                              f"{Path.cwd()}), and as a hub id it needs the hub, which is offline (HF_HUB_OFFLINE=1), "
                              f"while {exp.model_path(key)} is not pre-filled; set models.{key}.source to a local "
                              "directory")
        _check_tokenizer(key, m, offline)
    for key in sorted(used_datasets):
        d = exp.cfg["datasets"][key]
        if Path(exp.dataset_path(key)).exists():
            check_dataset_provenance(key, d, exp.dataset_path(key))
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
            raise ConfigError(f"dataset '{key}': '{d['path']}' is no local path (relative paths are read from "
                              f"{Path.cwd()}), and as a hub id it needs the hub, which is offline "
                              f"(HF_DATASETS_OFFLINE=1), while {exp.dataset_path(key)} is not pre-filled; set "
                              f"datasets.{key}.path/data_files to local files")


    _check_task_sources(exp)
    _check_task_names(exp)


def _check_tokenizer(key: str, m: dict, offline: bool) -> None:
    """A model entry's `tokenizer:` is read by the fetch job like `source:`: a local path must exist and hold a
    tokenizer; a hub id needs the hub (or its cache) when offline."""
    tok = m.get("tokenizer")
    if not tok:
        return
    path = Path(tok).expanduser()
    if looks_local(tok):
        if not path.exists():
            raise ConfigError(f"model '{key}': local tokenizer '{tok}' does not exist (relative paths are read from "
                              f"{Path.cwd()}); set models.{key}.tokenizer to a tokenizer directory or hub id")
        if not path.is_dir() or not any((path / n).exists() for n in ("tokenizer.json", "tokenizer.model",
                                                                      "vocab.json")):
            raise ConfigError(f"model '{key}': tokenizer '{tok}' is no tokenizer directory (no tokenizer.json, "
                              f"tokenizer.model or vocab.json in it); set models.{key}.tokenizer to one")
    elif offline and not _hub_cached("model", tok):
        raise ConfigError(f"model '{key}': tokenizer '{tok}' is no local directory (relative paths are read from "
                          f"{Path.cwd()}), and as a hub id it needs the hub, which is offline (HF_HUB_OFFLINE=1); "
                          f"set models.{key}.tokenizer to a local directory")


def _check_task_names(exp: Experiment) -> None:
    """Every lm-eval task a table reads must exist in the installed lm-eval: a misspelt name stops here, before any
    job, rather than inside an evaluation job."""
    used = exp.used_tasks()
    if not used:
        return
    # Only when a table reads lm-eval tasks: importing lm-eval takes seconds and loads torch (the Snakefile runs this).
    from quantlib.evaluation.lmeval import lm_eval_version, unknown_tasks

    missing = unknown_tasks(used)
    if missing:
        raise ConfigError(f"lm_eval.tasks: {', '.join(repr(t) for t in missing)} is no task, group or tag of the "
                          f"installed lm-eval ({lm_eval_version()}); check the spelling (`lm_eval ls tasks` lists "
                          "them)")


def _check_task_sources(exp: Experiment) -> None:
    """Local copies of lm-eval task data must exist. Tasks that read the hub are not refused here, offline or not:
    whether lm-eval's datasets cache holds them is only known to lm-eval, and a dry run or a run whose lm-eval
    results are up to date needs no data. The lm-eval job checks every task's data before it loads the model and
    fails with a message naming the task (quantlib.evaluation.lmeval.TaskSet.check_data)."""
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


def check_config_files(paths) -> None:
    """The files given with --configfile, as Snakemake merged them (later files replace earlier keys): a key
    written twice in one file (YAML keeps the last silently) and an overlay given before the config it changes are
    refused, naming the file."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"{path}: key '{key}' is written twice (lines {seen[key] + 1} and "
                                  f"{key_node.start_mark.line + 1}); YAML would silently keep the second")
            seen[key] = key_node.start_mark.line
        return loader.construct_mapping(node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    complete = []
    for path in map(Path, paths):
        try:
            data = yaml.load(path.read_text(), Loader=StrictLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark
            raise ConfigError(f"{path}, line {mark.line + 1}: {exc.problem}") from None
        complete.append(isinstance(data, dict) and {"models", "datasets", "run_models", "methods"} <= set(data))
    # An overlay (a file that changes part of an experiment) before a whole config is overwritten by it.
    for i, (path, whole) in enumerate(zip(paths, complete)):
        later = [p for p, w in zip(paths[i + 1:], complete[i + 1:]) if w]
        if not whole and later:
            order = " ".join(str(p) for p in [later[-1], *(p for p in paths if p != later[-1])])
            raise ConfigError(f"{path} changes part of an experiment but comes before {later[-1]}, a whole config "
                              f"that replaces its keys; give the whole config first: --configfile {order}")


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
            f"{kind} '{key}': '{source}' is no local path (relative paths are read from {Path.cwd()}), and as a hub "
            "id it needs the Hugging Face hub, which cannot be reached from this machine. "
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

