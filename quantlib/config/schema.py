"""The workflow configuration's schema: unknown keys are errors that name the key and the allowed ones; defaults
are filled in. Pure Python."""

from __future__ import annotations

from typing import Any

from quantlib.catalog.pack_formats import DTYPES, PACK_FORMATS
from quantlib.errors import ConfigError

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
        "calibration_sampler": {"enum": ["documents", "concat", "chunks"], "default": "documents",
                                "description": "documents: GPTQ's random window of a random long-enough document; "
                                               "concat: random windows of the joined text; chunks: the first "
                                               "windows of documents concatenated in batches of 1000 (run_clm)"},
        "eval_windows": {"enum": ["contiguous", "documents"], "default": "contiguous"},
        "nwindows": {"type": "integer", "minimum": 1, "description": "windows drawn in eval_windows: documents"},
        "seed": {"type": "integer", "minimum": 0, "description": "seed of eval_windows: documents"},
        "accept": {"enum": [">=", ">"], "description": "a document is long enough if its length >= or > seqlen"},
        "max_tokens": {"type": "integer", "minimum": 1, "description": "truncate the joined text (GPTQ c4_new)"},
        "label": {"type": "string"},
    },
}

_MIXTURE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["parts"],
    "properties": {
        "parts": {"type": "object", "minProperties": 1,
                  "additionalProperties": {"type": "number", "exclusiveMinimum": 0},
                  "description": "{dataset key: weight}: each part's share of the windows is its weight's share"},
        "chat_template": {"type": "boolean", "default": False,
                          "description": "format each document as a user turn of the tokenizer's chat template"},
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
        "seeds": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1, "uniqueItems": True,
                  "description": "calibration seeds: each its own draw, quantized model and evaluations (replicates)"},
        "distill": {
            "type": "object",
            "additionalProperties": False,
            "description": "lightweight distillation after quantization (NeUQI); defaults: the calibration's dataset, "
                           "seqlen and seed, twice its nsamples",
            "properties": {
                "dataset": {"type": "string"},
                "nsamples": {"type": "integer", "minimum": 1},
                "seqlen": {"type": "integer", "minimum": 2},
                "seed": {"type": "integer", "minimum": 0},
                "lr": {"type": "number", "exclusiveMinimum": 0},
                "epochs": {"type": "integer", "minimum": 1},
                "batch": {"type": "integer", "minimum": 1},
                "train_zero": {"type": "boolean"},
                "train_norm": {"type": "boolean"},
            },
        },
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
        "plugins": {"type": "array", "default": [], "uniqueItems": True,
                    "items": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"},
                    "description": "Python modules imported before the config is read (on PYTHONPATH): each registers "
                                   "methods, statistics or formats of its own in the catalog "
                                   "(docs/adding-a-method.md, \"A worked example, as a plugin\")"},
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
                "calib_chunk_tokens": {"type": "integer", "minimum": 1, "default": 65536,
                                       "description": "calibration tokens per forward (memory; not part of any "
                                                      "result's identity)"},
                "block_streams": {"enum": ["auto", "memory", "disk"], "default": "auto",
                                  "description": "where the calibration activations are kept between blocks; auto: "
                                                 "in memory unless that makes the job's estimated peak more than "
                                                 "1.5 times the peak with them on disk (not part of any result's "
                                                 "identity)"},
                "seed": {"type": "integer", "minimum": 0, "default": 0},
                # A positive amount: an integer (MB) above 0, or a string with a non-zero digit and a unit (the
                # form quantlib.jobs.memory.parse_memory reads).
                "max_memory": {"type": ["string", "integer", "null"], "default": None, "exclusiveMinimum": 0,
                               "pattern": r"^\s*(?=[0-9.]*[1-9])[0-9]*\.?[0-9]+\s*(?i:MB|MiB|GB|GiB|M|G)\s*$",
                               "refusal": "is no memory budget: give a positive amount, e.g. 800MB or 24GB (an "
                                          "integer is MB), or leave it out for no budget",
                               "description": "host memory budget of a quantize job (e.g. 24GB; an integer is MB): "
                                              "chunk sizes and stream placement are chosen to stay under it, and a "
                                              "budget below one block and its statistics fails before any work"},
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
        "mixtures": {"type": "object", "default": {}, "additionalProperties": _MIXTURE,
                     "description": "calibration sets made of datasets (a calibration's or distillation's `dataset` "
                                    "may name one): windows drawn from each part in proportion, optionally in the "
                                    "chat template"},
        "run_models": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "calibration": {"$ref": "#/$defs/calibration"},
        "gradients": {
            "type": "object",
            "additionalProperties": False,
            "default": {},
            "properties": {
                "groups": {"type": "integer", "minimum": 1, "default": 4,
                           "description": "blocks of output channels the saliency is averaged over (GuidedQuant's "
                                          "G); every method's `gq` must divide it"},
            },
        },
        "pack": {
            "type": "object",
            "additionalProperties": False,
            "default": {},
            "description": "external checkpoint layouts (rules/pack.smk, docs/packing.md)",
            "properties": {
                "formats": {"type": "array", "default": [], "uniqueItems": True,
                            "items": {"enum": list(PACK_FORMATS)},
                            "description": "every table model that a format can hold is packed in it"},
                "dtype": {"enum": list(DTYPES), "default": "float16",
                          "description": "dtype of the unquantized tensors (embeddings, norms, head)"},
                "stat_dtype": {"enum": list(DTYPES), "default": "float16",
                               "description": "dtype of scales, zero points and lookup tables"},
                "perplexity": {"type": "boolean", "default": True,
                               "description": "also evaluate each packed model's perplexity (name + .pack-{format})"},
            },
        },
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
                    "seeds": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1,
                              "uniqueItems": True,
                              "description": "calibration seeds of every row that reads calibration data: each its "
                                             "own replicate; cells show mean +- standard deviation"},
                    "compare": {"type": "array", "items": {"type": "array", "items": {"type": "string"},
                                                           "minItems": 2, "maxItems": 2},
                                "description": "pairs of rows [a, b]: the mean ratio a / b over the seeds and whether "
                                               "every seed orders them the same way, under the table"},
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

    # The catalog's pack formats as they are now: a plugin (`plugins`) may have registered one since the import.
    SCHEMA["properties"]["pack"]["properties"]["formats"]["items"]["enum"] = list(PACK_FORMATS)
    validator = jsonschema.Draft202012Validator(SCHEMA)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        raise ConfigError(_describe(errors[0]))
    return _fill_defaults(cfg, SCHEMA)


def _describe(err) -> str:
    where = _where(err.absolute_path)
    refusal = _schema_at(list(err.absolute_path)).get("refusal")  # a key's own words for a value it refuses
    if refusal and err.validator not in ("additionalProperties", "required"):
        return f"config {where}: {err.instance!r} {refusal}"
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


