"""A model's shapes against the names that quantize it, before any job: the one lookup of the model's config.json
on disk (the pre-filled resources folder, a local source, or the hub's cache) and the one check of a model type,
group sizes and GuidedQuant's row blocks, for the config's entries and for names given as targets alike. Pure
Python (the Snakefile calls it at parse time and for every name it is asked to build)."""

from __future__ import annotations

import json
from pathlib import Path

from quantlib.access.adapters import check_model_shapes
from quantlib.catalog import names
from quantlib.errors import ConfigError


def spec_shape_checks(specs) -> dict:
    """The group sizes and GuidedQuant row-block counts that `specs` (QuantSpecs of one model) need its layers to
    take, as keyword arguments of `check_model_shapes`."""
    specs = [s for s in specs if not s.is_fp]
    return {"group_sizes": sorted({s.group_size for s in specs if s.group_size != -1}),
            "row_groups": sorted({s.opt_or("guided_groups", 0) for s in specs} - {0})}


class ModelShapes:
    """Each model's config.json, looked up and read once per model, and the checks it already passed: Snakemake asks
    for a name's spec many times while it builds the DAG, so a repeated check costs a set lookup."""

    def __init__(self, models: dict, resources: str):
        self.models = models  # the config's `models`
        self.resources = resources
        self._configs: dict[str, tuple[Path, dict] | None] = {}
        self._passed: set[tuple] = set()

    def config_file(self, key: str) -> Path | None:
        """The model's config.json on disk: the pre-filled (or fetched) resources folder, a local source, or a hub
        id's copy in the Hugging Face cache. None before the model is fetched (then the fetch checks it)."""
        m = self.models[key]
        source = Path(m["source"]).expanduser()
        for path in (Path(names.model_path(self.resources, key)) / "config.json", source / "config.json"):
            if path.is_file():
                return path
        # A GGUF's config.json is made when it is converted; a hub id's may already be in the cache.
        if not m.get("gguf_file") and "/" in m["source"] and not source.exists():
            return _hub_cached_config(m["source"], m.get("revision"))
        return None

    def check(self, key: str, group_sizes=(), row_groups=()) -> bool:
        """Refuse (ConfigError, UnsupportedArchitecture) a model type without an adapter, and a group size or a
        `gq` that does not divide every quantized layer of `key`. False when its config.json is not on disk yet."""
        if key not in self.models:
            raise ConfigError(f"unknown model '{key}'; models in the config: {', '.join(self.models)}")
        if key not in self._configs:
            path = self.config_file(key)
            self._configs[key] = None if path is None else (path, _read_json(path))
        if self._configs[key] is None:
            return False
        todo = (key, tuple(group_sizes), tuple(row_groups))
        if todo not in self._passed:
            path, cfg = self._configs[key]
            check_model_shapes(cfg, key, group_sizes, row_groups, where=path)
            self._passed.add(todo)
        return True


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read as a model's config.json ({exc}); replace it, or delete the "
                          "folder that holds it if the workflow fetched it") from None


def _hub_cached_config(repo_id: str, revision: str | None) -> Path | None:
    # huggingface_hub only for a hub id (a fresh hub cache answers None); it is installed with transformers.
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # a malformed repo id: the download job reports it
        return None
    return Path(cached) if isinstance(cached, str) else None
