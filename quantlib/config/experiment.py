"""The validated configuration expanded: which specs exist, which artifacts each table reads. Pure Python (the
Snakefile imports it at parse time)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from quantlib.catalog import names, registry
from quantlib.catalog.kd import DistillSpec
from quantlib.catalog.names import (
    DATASET_KEY_RE,
    MODEL_KEY_RE,
    TASK_KEY_RE,
    CalibSpec,
    lmeval_protocol_name,
    mixture_counts,
    ppl_protocol_name,
)
from quantlib.catalog.pack_formats import packable
from quantlib.catalog.spec import QuantSpec
from quantlib.config.plugins import load_plugins
from quantlib.config.schema import validate
from quantlib.config.shapes import ModelShapes, spec_shape_checks
from quantlib.config.tabledefs import TableDef, table_def
from quantlib.errors import ConfigError


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
                return list(dict.fromkeys(names.require_setting(s) for s in m["settings"]))
            except ConfigError as exc:
                raise ConfigError(f"methods entry '{self.id}': {exc}") from None
        if "bits" not in m:
            raise ConfigError(f"methods entry '{self.id}' needs `bits` (with an optional `group_size`) or "
                              "`settings` (e.g. [w3g64, w2g64, w3])")
        return [(b, g) for b in m["bits"] for g in m.get("group_size", [-1])]


class Experiment:
    """The validated config, expanded: which specs exist, which files each table reads."""

    def __init__(self, cfg: dict):
        # Plugins first: they may add methods, statistics and formats that the rest of the config names.
        load_plugins(cfg.get("plugins", []) if isinstance(cfg, dict) else [])
        self.cfg = validate(cfg)
        c = self.cfg
        self.resources = c["resources"]
        self.model_shapes = ModelShapes(c["models"], self.resources)
        # The settings of the statistics ({statistic: {key: value}}), from the config's key of each statistic.
        self.stat_settings = {name: c[name] for name in registry.STATISTICS if name in c}
        for key in c["models"]:
            if not _fullmatch(MODEL_KEY_RE, key) or key.split(".")[-1] == "fp":
                raise ConfigError(f"model key '{key}' must match {MODEL_KEY_RE} and not end in '.fp'")
            if any(t in registry.SOLVERS or t in registry.PREPROCESSORS for t in key.split(".")):
                raise ConfigError(f"model key '{key}' contains a method name; rename it")
        for key in [*c["datasets"], *c["mixtures"]]:
            if not _fullmatch(DATASET_KEY_RE, key):
                raise ConfigError(f"dataset or mixture key '{key}' must match {DATASET_KEY_RE} (no dots)")
        for key, mix in c["mixtures"].items():
            if key in c["datasets"]:
                raise ConfigError(f"mixtures.{key}: '{key}' is also a dataset key; a calibration names one of them")
            for part in mix["parts"]:
                self._need_dataset(part, f"mixtures.{key}.parts")
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
        self.tables = {key: table_def(key, t, self) for key, t in c["tables"].items()}

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
        if cal["dataset"] in self.cfg["mixtures"]:
            counts = mixture_counts(self.cfg["mixtures"][cal["dataset"]]["parts"], cal["nsamples"])
            if not all(counts.values()):
                raise ConfigError(f"{where}: {cal['nsamples']} windows give mixture '{cal['dataset']}' parts no "
                                  f"windows ({counts}); raise nsamples or those parts' weights")
        else:
            self._need_dataset(cal["dataset"], f"{where}.dataset (a dataset or a mixture)")
        return CalibSpec(cal["dataset"], cal["nsamples"], cal["seqlen"], cal.get("seed", 0))

    def calibration_source(self, key: str) -> dict:
        """What the calibration job samples from: a dataset's config, or a mixture with its parts' configs."""
        if key not in self.cfg["mixtures"]:
            return self.dataset_cfg(key)
        mix = self.cfg["mixtures"][key]
        return {**mix, "datasets": {k: self.dataset_cfg(k) for k in mix["parts"]}}

    def calibration_datasets(self, key: str) -> list[str]:
        """The datasets a calibration on `key` reads, in its parts' order."""
        return list(self.cfg["mixtures"][key]["parts"]) if key in self.cfg["mixtures"] else [key]

    def model_cfg(self, key: str) -> dict:
        return self._need_model(key, "model")

    def dataset_cfg(self, key: str) -> dict:
        return self._need_dataset(key, "dataset")

    def model_label(self, key: str) -> str:
        return self.cfg["models"][key].get("label", key)

    # ------------------------------------------------------------------ specs and paths
    def spec(self, model: str, method_id: str, bits: int | None = None, group_size: int = -1,
             seed: int | None = None) -> QuantSpec:
        """The spec of a method at a setting; `seed` replaces its calibration's seed (a replicate)."""
        if method_id == "fp":
            return QuantSpec.build(model)
        entry = self.methods[method_id]
        m = entry.cfg
        calib = self._calib(m["calibration"], f"methods.{method_id}.calibration") if m.get("calibration") \
            else self.calibration
        if seed is not None and calib is not None:
            calib = CalibSpec(calib.dataset, calib.nsamples, calib.seqlen, seed)
        try:
            distill = self._distill(m["distill"], calib, method_id) if m.get("distill") is not None else None
            spec = QuantSpec.build(model, m["solver"], bits, group_size, m.get("init", "minmax"),
                                   m.get("preprocess", []), calib, m.get("options", {}), distill)
        except ConfigError as exc:
            raise ConfigError(f"methods entry '{method_id}': {exc}") from None
        if spec.uses_calibration and calib is None:
            raise ConfigError(f"methods entry '{method_id}' needs calibration data: add a top-level "
                              "`calibration:` or one in the entry")
        try:
            spec.statistics(self.stat_settings)  # each statistic's entry checks its parameters
        except ConfigError as exc:
            raise ConfigError(f"methods entry '{method_id}': {exc}") from None
        return spec

    def _distill(self, d: dict, calib: CalibSpec | None, method_id: str) -> DistillSpec:
        """A method's `distill:` with the defaults NeUQI's recipe implies: the calibration's dataset, window length
        and seed, and twice its windows (its first ones are the calibration windows)."""
        if calib is None and not {"dataset", "nsamples", "seqlen"} <= set(d):
            raise ConfigError("distill needs dataset, nsamples and seqlen when the method has no calibration")
        window = self._calib({"dataset": d.get("dataset", calib.dataset if calib else None),
                              "nsamples": d.get("nsamples", 2 * calib.nsamples if calib else 0),
                              "seqlen": d.get("seqlen", calib.seqlen if calib else 0),
                              "seed": d.get("seed", calib.seed if calib else 0)}, f"methods.{method_id}.distill")
        options = {k: d[k] for k in ("lr", "epochs", "batch", "train_zero", "train_norm") if k in d}
        return DistillSpec.build(window, options)

    def all_specs(self) -> list[QuantSpec]:
        out = []
        for model in self.cfg["run_models"]:
            out.append(self.spec(model, "fp"))
            for mid, entry in self.methods.items():
                for seed in entry.cfg.get("seeds") or [None]:
                    out.extend(self.spec(model, mid, b, g, seed) for b, g in entry.settings())
        for t in self.tables.values() if hasattr(self, "tables") else []:
            out.extend(self.spec(c_model, c_row, *names.require_setting(c_set), c_seed)
                       for c_model, c_row, c_set, c_seed in self._replicates(t) if c_row != "fp")
        return list(dict.fromkeys(out))

    def _replicates(self, t: TableDef) -> list[tuple]:
        """(model, row, setting, seed) of every replicate a table reads; a row without calibration data has one."""
        out = []
        for model in t.models:
            for row in t.rows:
                if row == "fp":
                    out.append((model, row, None, None))
                    continue
                made = {names.setting_token(b, g) for b, g in self.methods[row].settings()}
                seeds = t.seeds or self.methods[row].cfg.get("seeds") or [None]
                for s in [s for s in t.settings if s in made]:
                    bits, gs = names.require_setting(s)
                    if self.spec(model, row, bits, gs).calib is None:
                        out.append((model, row, s, None))
                    else:
                        out.extend((model, row, s, seed) for seed in seeds)
        return out

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
            return names.lmeval_path(self.lmeval_protocol(metric.partition('.')[0]), spec.short_name())
        return names.ppl_path(self.ppl_protocol(metric), spec.short_name())

    def metric_label(self, metric: str) -> str:
        if "." in metric:
            task, _, field = metric.partition(".")
            return f"{self.lmeval_tasks[task].get('label', task)} {field.replace('|', ' or ')}"
        return self.cfg["datasets"][metric].get("label", metric)

    # Settings that make a job's result what it is; the rest of `compute` (chunk sizes, where streams are kept) only
    # changes how it runs, so editing them reruns nothing (rules pass these as params, rerun triggers).
    _RESULT_COMPUTE = {"quantize": ("device", "dtype", "attn_implementation", "seed"),
                       "stats": ("device", "dtype", "attn_implementation"),
                       "evaluate": ("device", "dtype", "attn_implementation")}

    def compute_params(self, job: str) -> dict:
        """The `compute` settings that a job of this kind (quantize, stats, evaluate) depends on."""
        return {k: self.cfg["compute"][k] for k in self._RESULT_COMPUTE[job]}

    def shape_checks(self, model: str) -> dict:
        """The group sizes and GuidedQuant row-block counts the specs of `model` need its layers to take."""
        return spec_shape_checks(s for s in self.all_specs() if s.model == model)

    def check_model_shapes(self, model: str, specs=None) -> bool:
        """The model type, and the group sizes and gq of `specs` (None: the config's specs of `model`), against the
        model's config.json when it is on disk (quantlib.config.shapes); False when it is not yet."""
        checks = self.shape_checks(model) if specs is None else spec_shape_checks(specs)
        return self.model_shapes.check(model, **checks)

    def check_name(self, spec: QuantSpec) -> bool:
        """What a config entry's spec is checked for, for a name from anywhere (a target, a wildcard): shapes first
        (no other setting makes a misfit fit), then the parameters of the statistics it reads. False when the
        model's config.json is not on disk yet (its jobs check the shapes)."""
        checked = self.check_model_shapes(spec.model, [spec])
        spec.statistics(self.stat_settings)
        return checked

    def ppl_dataset_cfgs(self) -> dict:
        """The configs of the perplexity datasets only: a calibration-only dataset is no input of perplexity."""
        return {key: self.cfg["datasets"][key] for key in self.cfg["perplexity"]["datasets"]}

    def quantized_path(self, spec: QuantSpec) -> str:
        return names.quantized_path(spec.short_name())

    def checkpoint_path(self, spec: QuantSpec) -> str:
        """What evaluating `spec` reads: the FP model, its quantlib checkpoint, or its packed checkpoint."""
        if spec.is_fp:
            return self.model_path(spec.model)
        if spec.pack is not None:
            return names.packed_path(spec.pack, spec.unpacked().short_name())
        return self.quantized_path(spec)

    def pack_params(self) -> dict:
        return {k: self.cfg["pack"][k] for k in ("dtype", "stat_dtype")}

    def pack_targets(self) -> list[str]:
        """For every quantized model of the tables a plain run builds and every `pack.formats` entry that can hold
        it, the packed checkpoint (and, with `pack.perplexity`, its perplexity results)."""
        out = []
        table_specs = [self.spec(m, row, *names.require_setting(st), seed) for key in self.default_tables()
                       for m, row, st, seed in self._replicates(self.tables[key]) if row != "fp"]
        for spec in dict.fromkeys(table_specs):
            for fmt in self.cfg["pack"]["formats"]:
                if packable(spec, fmt) is None:
                    packed = dataclasses.replace(spec, pack=fmt)
                    out.append(self.checkpoint_path(packed))
                    if self.cfg["pack"]["perplexity"]:
                        out.extend(names.ppl_path(p, packed.short_name()) for p in self.ppl_protocols())
        return out

    def model_path(self, model: str) -> str:
        return names.model_path(self.resources, model)

    def dataset_path(self, dataset: str) -> str:
        return names.dataset_path(self.resources, dataset)

    # ------------------------------------------------------------------ tables
    def default_tables(self) -> list[str]:
        """Keys of the tables a plain `snakemake` run builds: all but those marked `default_target: false`."""
        return [key for key, t in self.tables.items() if t.default_target]

    def table_cells(self, key: str) -> list[dict]:
        """One entry per table cell: model, row, setting, metric, spec name and result path (None if the row does
        not produce that setting)."""
        t = self.tables[key]
        cells = []
        for model, row, s, seed in self._replicates(t):
            bits, gs = names.require_setting(s) if s else (None, -1)
            spec = self.spec(model, row, bits, gs, seed)
            for metric in t.result_metrics():
                cells.append({"model": model, "row": row, "setting": s, "metric": metric, "seed": seed,
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
            "row_labels": {r: "FP (unquantized)" if r == "fp" else self.methods[r].label for r in t.rows},
            "model_labels": {m: self.model_label(m) for m in t.models},
            "metric_labels": {**{m: self.metric_label(m) for m in t.result_metrics()},
                              **{a: v.get("label", a) for a, v in t.averages.items()}},
            "task_labels": {task: o.get("label", task) for task, o in self.lmeval_tasks.items()
                            if any(m.partition(".")[0] == task for m in t.result_metrics())},
            "columns": t.columns, "averages": {a: v["of"] for a, v in t.averages.items()}, "layout": t.layout,
            "rows": t.rows, "settings": t.settings, "paper": t.paper, "paper_source": t.paper_source,
            "seqlen": ppl["seqlen"], "compare": t.compare or [],
        }


def _fullmatch(pattern: str, text: str) -> bool:
    return re.fullmatch(pattern, text) is not None


