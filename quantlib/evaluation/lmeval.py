"""Zero- and few-shot evaluation through lm-eval's own Python API, on a model object we have loaded.

No task is re-implemented here. A task is named as lm-eval names it (`arc_easy`, or a group such as `mmlu`); by
default its data comes from the hub id in lm-eval's own YAML. A local `source` keeps lm-eval's config of the task
(prompt template, target, choices, metrics, few-shot sampler) and changes only where the data is read from: a small
YAML that `include`s the built-in one and overrides `dataset_path`/`dataset_kwargs`/splits, with absolute paths
(lm-eval resolves relative `data_files` against the working directory, not the YAML's folder). `overrides` replaces
further task-config keys for a copy whose fields differ from the hub's (e.g. an already-preprocessed HellaSwag).

lm-eval indexes its ~14,000 built-in YAML files in ~12 s; here only the folders that define the requested names are
indexed (a text search, ~1 s), with the full index as the fallback.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import yaml

from quantlib.errors import ConfigError, DataError

log = logging.getLogger("quantlib")
# `datasets` loader for a local file, by suffix.
LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text", ".arrow": "arrow"}


_SPLIT_KEYS = ("test_split", "validation_split", "training_split", "fewshot_split")


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _tasks_root() -> Path:
    """lm-eval's folder of built-in task YAMLs, found without importing lm-eval (the Snakefile uses it)."""
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("lm-eval is not installed; `pip install -e .` installs it")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def unknown_tasks(names: list[str]) -> list[str]:
    """The names that no built-in YAML file defines as a task, group or tag (a text search, ~1 s; the full index
    of lm-eval, ~12 s, settles the names the search misses). Pure Python unless the index is needed."""
    alternatives = "|".join(re.escape(n) for n in names)
    pattern = re.compile(rf"""^["']?(?:task|group|tag)["']?\s*:\s*["']?({alternatives})["']?\s*(?:#.*)?$""", re.M)
    found = set()
    for path in _tasks_root().rglob("*.yaml"):
        found.update(pattern.findall(path.read_text(errors="ignore")))
    missing = [n for n in names if n not in found]
    if missing:
        index = task_manager(missing, full=True).task_index
        missing = [n for n in missing if n not in index]
    return missing


# ------------------------------------------------------------------------------------------------ built-in configs

def _defining_dirs(names: list[str]) -> list[Path]:
    """Folders of lm-eval's task tree with a YAML file that defines one of `names` as a task or group."""
    alternatives = "|".join(re.escape(n) for n in names)
    pattern = re.compile(rf"""^["']?(?:task|group|tag)["']?\s*:\s*["']?(?:{alternatives})["']?\s*(?:#.*)?$""", re.M)
    dirs = set()
    for path in _tasks_root().rglob("*.yaml"):
        if "__pycache__" not in path.parts and pattern.search(path.read_text(errors="ignore")):
            dirs.add(path.parent)
    # A folder inside another found folder is indexed with it (indexing it twice gives duplicate warnings).
    return sorted(d for d in dirs if not any(o != d and o in d.parents for o in dirs))


def task_manager(names: list[str], extra_dirs=(), full: bool = False):
    """A TaskManager whose index holds the built-in `names`, plus the YAML files in `extra_dirs` (which replace
    built-in definitions of the same names). Unless `full`, only the folders that define the names are indexed."""
    from lm_eval.tasks import TaskManager

    dirs = [] if full else _defining_dirs(names)
    return TaskManager(include_path=[str(d) for d in [*dirs, *extra_dirs]] or None, include_defaults=full)


def builtin_yaml(tm, name: str) -> Path:
    entry = tm.task_index.get(name)
    if entry is None or entry.yaml_path is None:
        raise ConfigError(f"lm-eval {lm_eval_version()} has no built-in task or group '{name}' defined in a YAML "
                          "file; check the name (`lm_eval ls tasks` lists them)")
    return Path(entry.yaml_path)


def _is_group(tm, name: str) -> bool:
    from lm_eval.tasks._index import Kind

    return tm.task_index[name].kind == Kind.GROUP


# ------------------------------------------------------------------------------------------------ local sources

def _abs(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def _sha256(path: str) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with p.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def local_task_config(task: str, source: dict, base_yaml: Path, is_group: bool) -> dict:
    """The YAML config (as a dict) of `task` reading its data from `source` instead of the hub.

    `source` keys: `data_files` (a file, or {split: file(s)}), `split` (which of the task's splits a single file
    holds; default the split lm-eval evaluates), `path` (the `datasets` loader for data_files - inferred from the
    suffix - or a local copy of the hub dataset repository), `overrides` (task-config keys to replace).
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    base = load_yaml(base_yaml, resolve_func=False)
    cfg: dict[str, Any] = {"include": str(base_yaml)}
    files = source.get("data_files")
    if files is not None:
        if is_group:
            raise ConfigError(f"lm_eval.tasks.{task}.source: '{task}' is a group of tasks; give `path:` (a local copy "
                              "of the hub dataset repository, one configuration per subtask), not data_files")
        if isinstance(files, (str, list)):
            split = source.get("split") or base.get("test_split") or base.get("validation_split")
            files = {split: files}
        elif source.get("split"):
            raise ConfigError(f"lm_eval.tasks.{task}.source: `split` names the split of a single data file; with "
                              "data_files given as {split: file} leave it out")
        files = {s: [_abs(f) for f in v] if isinstance(v, list) else _abs(v) for s, v in files.items()}
        first = next(iter(files.values()))
        first = first[0] if isinstance(first, list) else first
        loader = source.get("path") or LOADERS.get(Path(first).suffix)
        if loader is None:
            raise ConfigError(f"lm_eval.tasks.{task}.source: cannot tell the format of '{first}' from its suffix; set "
                              f"`path:` to a datasets loader ({', '.join(sorted(set(LOADERS.values())))})")
        cfg.update(dataset_path=loader, dataset_name=None, dataset_kwargs={"data_files": files})
        for key in _SPLIT_KEYS:
            if base.get(key) is not None and base[key] not in files:
                cfg[key] = None  # the local copy does not have this split
        if not any(base.get(k) in files for k in ("test_split", "validation_split")):
            raise ConfigError(
                f"lm_eval.tasks.{task}.source: lm-eval evaluates '{task}' on its "
                f"{base.get('test_split') or base.get('validation_split')!r} split, and the local copy holds "
                f"{', '.join(map(repr, files))}; name the file's split with `split:` (the task's splits: "
                f"{', '.join(repr(base[k]) for k in _SPLIT_KEYS if base.get(k))})")
    elif source.get("path"):
        local = Path(source["path"]).expanduser()
        cfg["dataset_path"] = _abs(source["path"]) if local.exists() or source["path"].startswith((".", "/", "~")) \
            else source["path"]
    else:
        raise ConfigError(f"lm_eval.tasks.{task}.source needs `data_files` or `path`")
    overrides = source.get("overrides") or {}
    if overrides:
        from dataclasses import fields

        from lm_eval.config.task import TaskConfig

        known = {f.name for f in fields(TaskConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"lm_eval.tasks.{task}.source.overrides: '{unknown[0]}' is not an lm-eval task-config "
                              f"key; keys: {', '.join(sorted(known))}")
        cfg.update(overrides)
    return cfg


def source_record(task: str, source: dict | None, cfg: dict | None, base_yaml: Path) -> dict:
    """Where the task's data comes from, for the result JSON."""
    rel = base_yaml.relative_to(_tasks_root()) if _tasks_root() in base_yaml.parents else base_yaml
    if not source:
        return {"origin": "hub", "lm_eval_config": str(rel)}
    out = {"origin": "local", "lm_eval_config": str(rel), "dataset_path": cfg.get("dataset_path")}
    if "dataset_kwargs" in cfg:
        files = cfg["dataset_kwargs"]["data_files"]
        out["data_files"] = files
        out["sha256"] = {f: _sha256(f) for v in files.values() for f in (v if isinstance(v, list) else [v])}
    if source.get("overrides"):
        out["overrides"] = source["overrides"]
    return out


# ------------------------------------------------------------------------------------------------ evaluation

class TaskSet:
    """The configured tasks resolved against lm-eval: a TaskManager that knows them (local copies included) and
    the data source of each. Building it touches no data; `check_data` loads every task's data once."""

    def __init__(self, tasks: dict[str, dict], workdir: str | Path):
        """`tasks`: {name: {num_fewshot, limit, source}}; `workdir`: where the local tasks' YAML files are written
        (it must outlive the evaluation)."""
        self.tasks = {t: dict(o or {}) for t, o in tasks.items()}
        names = list(self.tasks)
        full = False
        self.tm = task_manager(names)
        if any(n not in self.tm.task_index for n in names):
            log.info("lm-eval: some tasks are not where a text search finds them; indexing every built-in task")
            full = True
            self.tm = task_manager(names, full=True)
        self.bases = {t: builtin_yaml(self.tm, t) for t in names}
        self.local_cfgs: dict[str, dict] = {}
        for task, opts in self.tasks.items():
            if opts.get("source"):
                self.local_cfgs[task] = local_task_config(task, opts["source"], self.bases[task],
                                                          _is_group(self.tm, task))
        if self.local_cfgs:
            local_dir = Path(workdir) / "local_tasks"
            local_dir.mkdir(parents=True, exist_ok=True)
            for task, cfg in self.local_cfgs.items():
                (local_dir / f"{task}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
            self.tm = task_manager(names, extra_dirs=[local_dir], full=full)
        self.sources = {t: source_record(t, o.get("source"), self.local_cfgs.get(t), self.bases[t])
                        for t, o in self.tasks.items()}

    def check_data(self) -> None:
        """Load every task's data (before the model is loaded): a missing file or an offline hub dataset fails here,
        with a message naming the task."""
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        for task in self.tasks:
            try:
                loaded = self.tm.load([task])
            except Exception as exc:  # datasets raises many kinds (ConnectionError, FileNotFoundError, ValueError)
                hint = (f"the hub is offline (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE) and the datasets cache has no copy; "
                        f"give lm_eval.tasks.{task}.source (local files)" if offline and task not in self.local_cfgs
                        else f"check lm_eval.tasks.{task}.source")
                raise DataError(f"lm-eval task '{task}' could not load its data ({type(exc).__name__}: "
                                f"{str(exc)[:400]}); {hint}") from exc
            leaves = list(loaded["tasks"].values())
            splits = sorted({t.config.test_split if t.has_test_docs() else t.config.validation_split for t in leaves})
            datasets_used = sorted({(t.config.dataset_path, t.config.dataset_name or "") for t in leaves})
            self.sources[task]["eval_split"] = splits[0] if len(splits) == 1 else splits
            if self.sources[task]["origin"] == "hub":
                self.sources[task]["datasets"] = (
                    [{"path": p, "name": n or None} for p, n in datasets_used] if len(datasets_used) <= 3 else
                    {"paths": sorted({p for p, _ in datasets_used}), "configurations": len(datasets_used)})


def _metrics(block: dict) -> dict:
    """lm-eval's `{'acc,none': 0.4, 'acc_stderr,none': 0.05, ...}` as `{'acc': 0.4, 'acc_stderr': 0.05}`; a metric
    under a filter other than 'none' keeps it as `metric:filter`."""
    out = {}
    for key, value in block.items():
        if "," not in key:
            continue
        metric, _, filt = key.partition(",")
        name = metric if filt == "none" else f"{metric}:{filt}"
        out[name] = float(value) if isinstance(value, (int, float)) else None
    return out


def _leaves(res: dict, name: str) -> list[str]:
    children = res.get("group_subtasks", {}).get(name)
    if not children:
        return [name]
    return [leaf for c in children for leaf in _leaves(res, c)]


def summarize(res: dict, task: str) -> dict:
    """The figures of one task (or group) from a simple_evaluate result."""
    block = res["results"].get(task) or res.get("groups", {}).get(task)
    if block is None:
        raise DataError(f"lm-eval returned no result for '{task}' (results for: {', '.join(res['results'])})")
    leaves = _leaves(res, task)
    samples = [res["n-samples"][leaf] for leaf in leaves if leaf in res.get("n-samples", {})]
    metrics = _metrics(block)
    record = {
        "acc": metrics.get("acc"), "acc_stderr": metrics.get("acc_stderr"),
        "acc_norm": metrics.get("acc_norm"), "acc_norm_stderr": metrics.get("acc_norm_stderr"),
        "metrics": metrics,
        "higher_is_better": res.get("higher_is_better", {}).get(task, {}),
        "docs": sum(s["effective"] for s in samples), "docs_available": sum(s["original"] for s in samples),
        "num_fewshot_effective": sorted({res["n-shot"][leaf] for leaf in leaves if leaf in res.get("n-shot", {})}),
        "task_version": res.get("versions", {}).get(task),
    }
    if leaves != [task]:
        record["subtasks"] = {leaf: {**_metrics(res["results"][leaf]), "docs": res["n-samples"][leaf]["effective"]}
                              for leaf in leaves if leaf in res["results"]}
    return record


def evaluate_tasks(model, tokenizer_dir: str | Path, taskset: TaskSet, device: str = "cpu", batch_size: int = 8,
                   bootstrap_iters: int = 1000) -> dict:
    """Run every task of `taskset` on `model` (a loaded transformers model) with lm-eval's HF backend.

    Returns {task: record}; a record holds acc/acc_norm with their standard errors, every metric lm-eval reported,
    the documents evaluated and available, the effective shots and the data source. `limit` takes the first
    `limit` documents of the evaluated split (lm-eval's rule).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if not getattr(model, "hf_device_map", None):  # a model dispatched by accelerate (blocks on disk) stays put
        model.to(device)
    # lm-eval reads the tokenizer from the model's folder itself, as `lm_eval --model hf` does.
    lm = HFLM(pretrained=model, tokenizer=str(tokenizer_dir), batch_size=batch_size, device=device)
    records = {}
    for task, opts in taskset.tasks.items():
        shots, limit = int(opts.get("num_fewshot", 0)), opts.get("limit")
        t0 = time.time()
        res = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=taskset.tm, num_fewshot=shots,
                                      limit=limit, bootstrap_iters=bootstrap_iters, log_samples=False,
                                      batch_size=batch_size, device=device)
        record = summarize(res, task)
        if record["num_fewshot_effective"] != [shots]:
            raise DataError(f"lm-eval ran '{task}' with {record['num_fewshot_effective']} shots, not the {shots} "
                            f"configured (its config pins num_fewshot); change lm_eval.tasks.{task}")
        records[task] = {"task": task, "num_fewshot": shots, "limit": limit, **record,
                         "source": taskset.sources[task], "lm_eval": lm_eval_version(),
                         "seconds": round(time.time() - t0, 2)}
        log.info("%s %d-shot: acc %s acc_norm %s over %d of %d docs", task, shots, record["acc"], record["acc_norm"],
                 record["docs"], record["docs_available"])
    return records
