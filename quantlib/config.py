"""The workflow configuration: its schema (unknown keys are errors that name the key and the allowed ones) and
its expansion into specs, artifact paths and tables. Pure Python: the Snakefile imports it at parse time.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import methods
from .errors import ConfigError
from .lmeval import is_lower_better
from .spec import (_BITS_RE, DATASET_KEY_RE, MODEL_KEY_RE, TASK_KEY_RE, CalibSpec, QuantSpec, lmeval_protocol_name,
                   ppl_protocol_name)

_DATASET = {
    "type": "object",
    "additionalProperties": False,
    "required": ["path"],
    "properties": {
        "path": {"type": "string", "description": "hub id, local mirror directory, or a loader (json/parquet/text)"},
        "name": {"type": ["string", "null"], "description": "dataset configuration name"},
        "data_files": {"type": ["object", "string", "array", "null"]},
        "split": {"type": "string", "default": "train"},
        "revision": {"type": ["string", "null"]},
        "text_column": {"type": "string", "default": "text"},
        "rows": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 2, "maxItems": 2,
                 "description": "[start, stop) slice of the rows"},
        "join": {"type": "string", "description": "separator joining rows into one text (contiguous windows)"},
        "calibration_sampler": {"enum": ["documents", "concat"], "default": "documents"},
        "eval_windows": {"enum": ["contiguous", "documents"], "default": "contiguous"},
        "nwindows": {"type": "integer", "minimum": 1, "description": "windows drawn in eval_windows: documents"},
        "seed": {"type": "integer", "minimum": 0, "description": "seed of eval_windows: documents"},
        "accept": {"enum": [">=", ">"], "description": "a document is long enough if its length >= or > seqlen"},
        "max_tokens": {"type": "integer", "minimum": 1, "description": "truncate the joined text (GPTQ c4_new)"},
        "label": {"type": "string"},
    },
}

_METHOD = {
    "type": "object",
    "additionalProperties": False,
    "required": ["id", "solver"],
    "properties": {
        "id": {"type": "string", "pattern": "^[a-z][a-z0-9_-]*$", "description": "row key in tables"},
        "label": {"type": "string"},
        "solver": {"type": "string"},
        "init": {"type": "string", "default": "minmax"},
        "preprocess": {"type": "array", "items": {"type": "string"}, "default": []},
        "bits": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
        "group_size": {"type": "array", "items": {"type": "integer"}, "minItems": 1,
                       "description": "with bits: every bits x group_size combination (default [-1])"},
        "settings": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                     "description": "instead of bits/group_size: an explicit list such as [w3g64, w2g64, w3]"},
        "options": {"type": "object", "default": {}},
        "calibration": {"$ref": "#/$defs/calibration"},
    },
}

_TASK_METRICS = {"type": "array", "items": {"type": "string"}, "minItems": 1}

_LMEVAL_TASK = {
    "type": ["object", "null"],
    "additionalProperties": False,
    "properties": {
        "num_fewshot": {"type": "integer", "minimum": 0, "default": 0},
        "limit": {"type": ["integer", "null"], "minimum": 1,
                  "description": "evaluate the first `limit` documents only (CPU runs); recorded in results and tables"},
        "label": {"type": "string", "description": "column name in tables"},
        "source": {
            "type": "object",
            "additionalProperties": False,
            "description": "a local copy of the task's data; lm-eval's own config of the task is kept",
            "properties": {
                "data_files": {"type": ["string", "array", "object"],
                               "description": "the file of the evaluated split, or {split: file(s)}"},
                "split": {"type": "string", "description": "the task's split a single data file holds "
                                                          "(default: the split lm-eval evaluates)"},
                "path": {"type": "string", "description": "datasets loader for data_files (default: from the "
                                                          "suffix), or a local copy of the hub dataset repository"},
                "overrides": {"type": "object", "description": "lm-eval task-config keys to replace, for a copy "
                                                               "whose fields differ from the hub's"},
            },
        },
    },
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["models", "datasets", "run_models", "methods"],
    "$defs": {
        "calibration": {
            "type": "object",
            "additionalProperties": False,
            "required": ["dataset", "nsamples", "seqlen"],
            "properties": {
                "dataset": {"type": "string"},
                "nsamples": {"type": "integer", "minimum": 1},
                "seqlen": {"type": "integer", "minimum": 2},
                "seed": {"type": "integer", "minimum": 0, "default": 0},
            },
        },
    },
    "properties": {
        "resources": {"type": "string", "default": "resources",
                      "description": "folder for downloads; an air-gapped machine points it at a pre-filled copy"},
        "compute": {
            "type": "object",
            "additionalProperties": False,
            "default": {},
            "properties": {
                "device": {"type": "string", "pattern": "^(auto|cpu|cuda(:[0-9]+)?)$", "default": "auto"},
                "dtype": {"enum": ["auto", "float32", "float16", "bfloat16"], "default": "auto"},
                "attn_implementation": {"enum": ["auto", "sdpa", "eager", "flash_attention_2"], "default": "auto"},
                "calib_chunk_tokens": {"type": "integer", "minimum": 1, "default": 65536},
                "seed": {"type": "integer", "minimum": 0, "default": 0},
            },
        },
        "models": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "required": ["source"],
                "properties": {
                    "source": {"type": "string", "description": "hub id or local directory"},
                    "gguf_file": {"type": ["string", "null"]},
                    "revision": {"type": ["string", "null"]},
                    "tokenizer": {"type": ["string", "null"]},
                    "label": {"type": "string"},
                    "params_b": {"type": "number", "exclusiveMinimum": 0,
                                 "description": "parameters in billions, for memory and runtime requests"},
                },
            },
        },
        "datasets": {"type": "object", "additionalProperties": _DATASET},
        "run_models": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "calibration": {"$ref": "#/$defs/calibration"},
        "perplexity": {
            "type": "object",
            "additionalProperties": False,
            "default": {},
            "properties": {
                "seqlen": {"type": "integer", "minimum": 2, "default": 2048},
                "batch_size": {"type": "integer", "minimum": 1, "default": 4},
                "datasets": {
                    "type": "object",
                    "default": {},
                    "additionalProperties": {
                        "type": ["object", "null"],
                        "additionalProperties": False,
                        "properties": {"max_windows": {"type": ["integer", "null"], "minimum": 1}},
                    },
                },
            },
        },
        "lm_eval": {
            "type": "object",
            "additionalProperties": False,
            "default": {},
            "properties": {
                "batch_size": {"type": "integer", "minimum": 1, "default": 8},
                "bootstrap_iters": {"type": "integer", "minimum": 0, "default": 1000,
                                    "description": "bootstrap draws for standard errors without a closed form "
                                                   "(lambada perplexity); accuracies use the closed form"},
                "tasks": {"type": "object", "default": {}, "additionalProperties": _LMEVAL_TASK,
                          "description": "lm-eval task or group names (as `lm_eval ls tasks` prints them)"},
            },
        },
        "methods": {"type": "array", "items": _METHOD, "minItems": 1},
        "tables": {
            "type": "object",
            "default": {},
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "title": {"type": "string"},
                    "default_target": {"type": "boolean", "default": True,
                                       "description": "false: left out of a plain `snakemake` run (for tables that "
                                                      "cost hours); built when results/tables/<key>.md is asked for"},
                    "models": {"type": "array", "items": {"type": "string"}},
                    "rows": {"type": "array", "items": {"type": "string"}},
                    "settings": {"type": "array", "items": {"type": "string"}},
                    "metrics": {"type": "array", "items": {"type": "string"},
                                "description": "columns: perplexity datasets, task metrics `{task}.{metric}` "
                                               "(`{task}.acc_norm|acc`: the first reported), keys of averages"},
                    "averages": {
                        "type": "object",
                        "default": {},
                        "description": "{key: {label, of: [task metrics]}} or the short form {key: [task metrics]}",
                        "additionalProperties": {"oneOf": [
                            {"type": "object", "additionalProperties": False, "required": ["of"],
                             "properties": {"label": {"type": "string"}, "of": _TASK_METRICS}},
                            _TASK_METRICS,
                        ]},
                    },
                    "layout": {"enum": ["long", "wide"], "default": "long",
                               "description": "long: a line per method and setting; wide: a line per method, "
                                              "columns per setting x metric"},
                    "paper_source": {"type": "string"},
                    "paper": {"type": "object", "description": "{model: {'fp' | 'row.setting': {metric: value}}}; "
                                                               "accuracies in percent"},
                },
            },
        },
    },
}


def _where(path) -> str:
    return ".".join(str(p) for p in path) or "the top level"


def _schema_at(path) -> dict:
    """The sub-schema that describes the object at `path` (for listing allowed keys)."""
    node = SCHEMA
    for part in path:
        if "$ref" in node:
            node = SCHEMA["$defs"][node["$ref"].rsplit("/", 1)[1]]
        if isinstance(part, int):
            node = node.get("items", {})
        elif part in node.get("properties", {}):
            node = node["properties"][part]
        else:
            node = node.get("additionalProperties", {})
    if "$ref" in node:
        node = SCHEMA["$defs"][node["$ref"].rsplit("/", 1)[1]]
    return node


def validate(cfg: dict) -> dict:
    """Check `cfg` against the schema; fill defaults; raise ConfigError naming the offending key."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(SCHEMA)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        raise ConfigError(_describe(errors[0]))
    return _fill_defaults(cfg, SCHEMA)


def _describe(err) -> str:
    where = _where(err.absolute_path)
    if err.validator == "additionalProperties":
        node = _schema_at(list(err.absolute_path))
        allowed = sorted(node.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        return (f"unknown config key '{extra[0]}' in {where}; allowed keys: {', '.join(allowed)}"
                if extra else f"{where}: {err.message}")
    if err.validator == "enum":
        return f"config {where}: {err.instance!r} is not one of: {', '.join(map(str, err.validator_value))}"
    if err.validator == "oneOf":
        parent = _schema_at(list(err.absolute_path)[:-1])
        return f"config {where}: {err.instance!r} has the wrong form; expected {parent.get('description', err.message)}"
    if err.validator == "required":
        return f"config {where}: missing required key ({err.message})"
    return f"config {where}: {err.message}"


def _fill_defaults(value, schema):
    if "$ref" in schema:
        schema = SCHEMA["$defs"][schema["$ref"].rsplit("/", 1)[1]]
    if isinstance(value, dict):
        out = dict(value)
        for key, sub in schema.get("properties", {}).items():
            if key not in out and "default" in sub:
                out[key] = _copy(sub["default"])
            if key in out:
                out[key] = _fill_defaults(out[key], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in out:
                if key not in schema.get("properties", {}):
                    out[key] = _fill_defaults(out[key], extra)
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_fill_defaults(v, schema["items"]) for v in value]
    return value


def _copy(v):
    import copy
    return copy.deepcopy(v)


def setting_name(bits: int, group_size: int) -> str:
    return f"w{bits}" + (f"g{group_size}" if group_size > 0 else "")


@dataclass
class MethodEntry:
    id: str
    label: str
    cfg: dict

    def settings(self) -> list[tuple[int, int]]:
        """(bits, group_size) of every setting this method runs: an explicit `settings` list, or the product
        bits x group_size."""
        m = self.cfg
        if "settings" in m:
            if "bits" in m or "group_size" in m:
                raise ConfigError(f"methods entry '{self.id}': give either `settings` or `bits`/`group_size`, "
                                  "not both")
            try:
                return list(dict.fromkeys(_parse_setting(s) for s in m["settings"]))
            except ConfigError as exc:
                raise ConfigError(f"methods entry '{self.id}': {exc}") from None
        if "bits" not in m:
            raise ConfigError(f"methods entry '{self.id}' needs `bits` (with an optional `group_size`) or "
                              "`settings` (e.g. [w3g64, w2g64, w3])")
        return [(b, g) for b in m["bits"] for g in m.get("group_size", [-1])]


@dataclass
class TableDef:
    key: str
    title: str
    models: list[str]
    rows: list[str]
    settings: list[str]
    metrics: list[str]
    paper: dict
    paper_source: str | None
    averages: dict[str, dict] = None
    layout: str = "long"
    default_target: bool = True

    @property
    def columns(self) -> list[str]:
        """Displayed columns: the metrics in order, then the averages not named among them."""
        return self.metrics + [a for a in (self.averages or {}) if a not in self.metrics]

    def result_metrics(self) -> list[str]:
        """Every metric read from result files: the displayed ones and the parts of the averages."""
        avg = self.averages or {}
        return list(dict.fromkeys([m for m in self.metrics if m not in avg] + [p for a in avg.values()
                                                                                 for p in a["of"]]))


class Experiment:
    """The validated config, expanded: which specs exist, which files each table reads."""

    def __init__(self, cfg: dict):
        self.cfg = validate(cfg)
        c = self.cfg
        self.resources = c["resources"]
        for key in c["models"]:
            if not _fullmatch(MODEL_KEY_RE, key) or key.split(".")[-1] == "fp":
                raise ConfigError(f"model key '{key}' must match {MODEL_KEY_RE} and not end in '.fp'")
            if any(t in methods.SOLVERS or t in methods.PREPROCESSORS for t in key.split(".")):
                raise ConfigError(f"model key '{key}' contains a method name; rename it")
        for key in c["datasets"]:
            if not _fullmatch(DATASET_KEY_RE, key):
                raise ConfigError(f"dataset key '{key}' must match {DATASET_KEY_RE} (no dots)")
        for m in c["run_models"]:
            self._need_model(m, "run_models")
        self.calibration = self._calib(c.get("calibration"), "calibration") if c.get("calibration") else None
        self.methods: dict[str, MethodEntry] = {}
        for i, m in enumerate(c["methods"]):
            if m["id"] in self.methods or m["id"] == "fp":
                raise ConfigError(f"methods[{i}]: id '{m['id']}' is used twice (or is the reserved 'fp')")
            self.methods[m["id"]] = MethodEntry(m["id"], m.get("label", m["id"]), m)
            for model in c["run_models"]:
                for bits, gs in self.methods[m["id"]].settings():
                    self.spec(model, m["id"], bits, gs)  # validates solver, bits, options, calibration
        ppl = c["perplexity"]
        for key in ppl["datasets"]:
            self._need_dataset(key, "perplexity.datasets")
        self.lmeval_tasks: dict[str, dict] = {}
        for task, opts in c["lm_eval"]["tasks"].items():
            if not _fullmatch(TASK_KEY_RE, task):
                raise ConfigError(f"lm_eval.tasks: '{task}' must match {TASK_KEY_RE} (no dots)")
            self.lmeval_tasks[task] = {"num_fewshot": 0, "limit": None, **(opts or {})}
        self.tables = {key: self._table(key, t) for key, t in c["tables"].items()}

    # ------------------------------------------------------------------ lookups
    def _need_model(self, key: str, where: str) -> dict:
        if key not in self.cfg["models"]:
            raise ConfigError(f"{where}: unknown model '{key}'; models in the config: {', '.join(self.cfg['models'])}")
        return self.cfg["models"][key]

    def _need_dataset(self, key: str, where: str) -> dict:
        if key not in self.cfg["datasets"]:
            raise ConfigError(f"{where}: unknown dataset '{key}'; datasets in the config: "
                              f"{', '.join(self.cfg['datasets']) or 'none'}")
        return self.cfg["datasets"][key]

    def _calib(self, cal: dict, where: str) -> CalibSpec:
        self._need_dataset(cal["dataset"], f"{where}.dataset")
        return CalibSpec(cal["dataset"], cal["nsamples"], cal["seqlen"], cal.get("seed", 0))

    def model_cfg(self, key: str) -> dict:
        return self._need_model(key, "model")

    def dataset_cfg(self, key: str) -> dict:
        return self._need_dataset(key, "dataset")

    def model_label(self, key: str) -> str:
        return self.cfg["models"][key].get("label", key)

    # ------------------------------------------------------------------ specs and paths
    def spec(self, model: str, method_id: str, bits: int | None = None, group_size: int = -1) -> QuantSpec:
        if method_id == "fp":
            return QuantSpec.build(model)
        entry = self.methods[method_id]
        m = entry.cfg
        calib = self._calib(m["calibration"], f"methods.{method_id}.calibration") if m.get("calibration") \
            else self.calibration
        try:
            spec = QuantSpec.build(model, m["solver"], bits, group_size, m.get("init", "minmax"),
                                   m.get("preprocess", []), calib, m.get("options", {}))
        except ConfigError as exc:
            raise ConfigError(f"methods entry '{method_id}': {exc}") from None
        if spec.needs_hessian and calib is None:
            raise ConfigError(f"methods entry '{method_id}' needs calibration data: add a top-level "
                              "`calibration:` or one in the entry")
        return spec

    def all_specs(self) -> list[QuantSpec]:
        out = []
        for model in self.cfg["run_models"]:
            out.append(self.spec(model, "fp"))
            for mid, entry in self.methods.items():
                out.extend(self.spec(model, mid, b, g) for b, g in entry.settings())
        return list(dict.fromkeys(out))

    def ppl_protocols(self) -> list[str]:
        ppl = self.cfg["perplexity"]
        return [ppl_protocol_name(key, ppl["seqlen"], (opts or {}).get("max_windows"))
                for key, opts in ppl["datasets"].items()]

    def ppl_protocol(self, dataset: str) -> str:
        ppl = self.cfg["perplexity"]
        if dataset not in ppl["datasets"]:
            raise ConfigError(f"metric '{dataset}' is not a perplexity dataset of this config "
                              f"(perplexity.datasets: {', '.join(ppl['datasets'])})")
        return ppl_protocol_name(dataset, ppl["seqlen"], (ppl["datasets"][dataset] or {}).get("max_windows"))

    def used_tasks(self) -> list[str]:
        """The tasks of lm_eval.tasks that some table reads, in config order. Only these are evaluated: a task that
        an overlay only gives a local source for (tests/offline.yaml) costs nothing unless a table names it."""
        used = {m.partition(".")[0] for t in self.tables.values() for m in t.result_metrics() if "." in m}
        return [task for task in self.lmeval_tasks if task in used]

    def lmeval_protocols(self) -> list[str]:
        return [self.lmeval_protocol(task) for task in self.used_tasks()]

    def lmeval_protocol(self, task: str) -> str:
        if task not in self.lmeval_tasks:
            raise ConfigError(f"'{task}' is not a task of lm_eval.tasks ({', '.join(self.lmeval_tasks) or 'none'})")
        opts = self.lmeval_tasks[task]
        return lmeval_protocol_name(task, opts["num_fewshot"], opts["limit"])

    def lmeval_params(self) -> dict:
        """What the lm-eval rule needs: {task: {num_fewshot, limit, source}} and the harness settings."""
        cfg = self.cfg["lm_eval"]
        return {"tasks": {t: {k: v for k, v in self.lmeval_tasks[t].items() if k != "label"} for t in self.used_tasks()},
                "batch_size": cfg["batch_size"], "bootstrap_iters": cfg["bootstrap_iters"]}

    def result_path(self, spec: QuantSpec, metric: str) -> str:
        """A perplexity dataset's result, or an lm-eval task's for a metric `{task}.{field}`."""
        if "." in metric:
            return f"results/lmeval/{self.lmeval_protocol(metric.partition('.')[0])}/{spec.short_name()}.json"
        return f"results/ppl/{self.ppl_protocol(metric)}/{spec.short_name()}.json"

    def metric_label(self, metric: str) -> str:
        if "." in metric:
            task, _, field = metric.partition(".")
            return f"{self.lmeval_tasks[task].get('label', task)} {field.replace('|', ' or ')}"
        return self.cfg["datasets"][metric].get("label", metric)

    def quantized_path(self, spec: QuantSpec) -> str:
        return f"results/quantized/{spec.short_name()}"

    def model_path(self, model: str) -> str:
        return f"{self.resources}/models/{model}"

    def dataset_path(self, dataset: str) -> str:
        return f"{self.resources}/datasets/{dataset}.parquet"

    # ------------------------------------------------------------------ tables
    def _table(self, key: str, t: dict) -> TableDef:
        models = t.get("models") or list(self.cfg["run_models"])
        for m in models:
            if m not in self.cfg["run_models"]:
                raise ConfigError(f"tables.{key}.models: '{m}' is not in run_models")
        rows = t.get("rows") or ["fp", *self.methods]
        for r in rows:
            if r != "fp" and r not in self.methods:
                raise ConfigError(f"tables.{key}.rows: unknown method id '{r}'; ids: fp, {', '.join(self.methods)}")
        all_settings = list(dict.fromkeys(setting_name(b, g) for r in rows if r != "fp"
                                          for b, g in self.methods[r].settings()))
        settings = t.get("settings") or all_settings
        for s in settings:
            if s not in all_settings:
                raise ConfigError(f"tables.{key}.settings: '{s}' is not produced by any row; produced: "
                                  f"{', '.join(all_settings)}")
        averages = {a: {"of": v} if isinstance(v, list) else v for a, v in (t.get("averages") or {}).items()}
        metrics = t.get("metrics") or list(self.cfg["perplexity"]["datasets"])
        for avg, spec in averages.items():
            if avg in self.cfg["perplexity"]["datasets"] or "." in avg:
                raise ConfigError(f"tables.{key}.averages: '{avg}' must differ from the perplexity datasets and "
                                  "contain no dot")
            for part in spec["of"]:
                if "." not in part:
                    raise ConfigError(f"tables.{key}.averages.{avg}: '{part}' is not a task metric "
                                      "`{task}.{metric}`; averages are over lm-eval task metrics")
                self._check_metric(key, part)
            if len({is_lower_better(p) for p in spec["of"]}) > 1:
                raise ConfigError(f"tables.{key}.averages.{avg} mixes accuracies with perplexities")
        for metric in metrics:
            if metric not in averages:
                self._check_metric(key, metric)
        return TableDef(key, t.get("title", key), models, rows, settings, metrics, t.get("paper", {}),
                        t.get("paper_source"), averages, t.get("layout", "long"), t.get("default_target", True))

    def _check_metric(self, table: str, metric: str) -> None:
        if "." in metric:
            task, _, field = metric.partition(".")
            if task not in self.lmeval_tasks or not field or "." in field:
                raise ConfigError(
                    f"tables.{table}.metrics: '{metric}' names no task of lm_eval.tasks "
                    f"({', '.join(self.lmeval_tasks) or 'none'}); a task metric is `{{task}}.{{metric}}`, e.g. "
                    "arc_easy.acc_norm")
        elif metric not in self.cfg["perplexity"]["datasets"]:
            raise ConfigError(
                f"tables.{table}.metrics: '{metric}' is neither a perplexity dataset (perplexity.datasets: "
                f"{', '.join(self.cfg['perplexity']['datasets']) or 'none'}), a task metric `{{task}}.{{metric}}` of "
                "lm_eval.tasks, nor a key of the table's averages")

    def default_tables(self) -> list[str]:
        """Keys of the tables a plain `snakemake` run builds: all but those marked `default_target: false`."""
        return [key for key, t in self.tables.items() if t.default_target]

    def table_cells(self, key: str) -> list[dict]:
        """One entry per table cell: model, row, setting, metric, spec name and result path (None if the row does
        not produce that setting)."""
        t = self.tables[key]
        cells = []
        for model in t.models:
            for row in t.rows:
                settings = [None] if row == "fp" else [
                    s for s in t.settings if s in {setting_name(b, g) for b, g in self.methods[row].settings()}]
                for s in settings:
                    bits, gs = _parse_setting(s) if s else (None, -1)
                    spec = self.spec(model, row, bits, gs)
                    for metric in t.result_metrics():
                        cells.append({"model": model, "row": row, "setting": s, "metric": metric,
                                      "name": spec.short_name(), "path": self.result_path(spec, metric)})
        return cells

    def table_inputs(self, key: str) -> list[str]:
        return sorted({c["path"] for c in self.table_cells(key)})

    def table_params(self, key: str) -> dict:
        """Everything the table script needs, as plain data."""
        t = self.tables[key]
        ppl = self.cfg["perplexity"]
        return {
            "key": key, "title": t.title, "cells": self.table_cells(key),
            "row_labels": {"fp": "FP (unquantized)", **{m: e.label for m, e in self.methods.items()}},
            "model_labels": {m: self.model_label(m) for m in t.models},
            "metric_labels": {**{m: self.metric_label(m) for m in t.result_metrics()},
                              **{a: v.get("label", a) for a, v in t.averages.items()}},
            "task_labels": {task: o.get("label", task) for task, o in self.lmeval_tasks.items()},
            "columns": t.columns, "averages": {a: v["of"] for a, v in t.averages.items()}, "layout": t.layout,
            "rows": t.rows, "settings": t.settings, "paper": t.paper, "paper_source": t.paper_source,
            "seqlen": ppl["seqlen"],
        }


def _parse_setting(s: str) -> tuple[int, int]:
    m = _BITS_RE.fullmatch(s)
    if not m:
        raise ConfigError(f"'{s}' is not a setting (w{{bits}} or w{{bits}}g{{group}})")
    return int(m.group(1)), int(m.group(2)) if m.group(2) else -1


def _fullmatch(pattern: str, text: str) -> bool:
    import re
    return re.fullmatch(pattern, text) is not None


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
    from .adapters import check_group_size_fits, get_adapter

    for folder in (Path(exp.model_path(key)), Path(exp.cfg["models"][key]["source"]).expanduser()):
        cfg_path = folder / "config.json"
        if cfg_path.exists():
            import json
            model_cfg = json.loads(cfg_path.read_text())
            get_adapter(model_cfg.get("model_type", "?"))
            for spec in exp.all_specs():
                if spec.model == key and not spec.is_fp:
                    check_group_size_fits(model_cfg, spec.group_size, key)
            return


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
