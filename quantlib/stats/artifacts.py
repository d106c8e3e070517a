"""Statistics of the unquantized model: computed once per model and calibration (rule `stats`, artifacts under
`results/stats/{stat}/{model}.{calibration}/`) and shared by every method that needs them. Each statistic is a
catalog entry (`quantlib.catalog.registry.STATISTICS`) naming a compute function and a reader.

An artifact is a folder with `manifest.json` (the statistic, model, calibration, what else it holds) and one
safetensors file per decoder block, so a reader holds one block at a time.

`fp_hessian`: the input Hessian of every quantized layer, H = mean of x x^T over the calibration tokens, with the
inputs propagated through the *unquantized* model (GuidedQuant's convention; the runner's default instead takes
them from the already quantized prefix).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from quantlib.access.adapters import adapter_for
from quantlib.access.blocks import BlockAccess
from quantlib.artifacts.integrity import verify
from quantlib.catalog import registry
from quantlib.catalog.names import stats_path
from quantlib.errors import ConfigError, DataError
from quantlib.stats import capture

log = logging.getLogger("quantlib")


def block_file(i: int) -> str:
    return f"block{i:04d}.safetensors"


def fp_blocks(model, tokens: torch.Tensor, device: str, chunk_tokens: int, progress: bool, desc: str, access=None):
    """Walk the decoder blocks of the unquantized model: yields (index, block, states), the block on the device and
    `states` its inputs per chunk of windows (as `capture.block_inputs` gives them, `chunk` windows each); after each
    step the block's outputs become the next block's inputs. `access` is the runner's `BlockAccess` (lazy: each
    block read from disk and freed after)."""
    adapter = adapter_for(model)
    blocks = adapter.block_list(model)
    access = access or BlockAccess(model)
    chunk = max(1, min(len(tokens), chunk_tokens // tokens.shape[1]))
    with torch.no_grad():
        with access.outer(device):
            states = capture.States(capture.block_inputs(model, blocks, tokens, chunk, device), "memory", None,
                                    device)
        for i in tqdm(range(len(blocks)), desc=desc, disable=not progress, mininterval=5):
            block = access.open(i, device)
            t0 = time.time()
            yield i, block, states, chunk
            states = states.through(block)
            log.info("%s: block %d/%d in %.1fs", desc, i + 1, len(blocks), time.time() - t0)
            access.close(i, block)


class BlockFiles:
    """The one reader of statistics stored per block: one block's tensors of an artifact at a time."""

    def __init__(self, path: Path):
        self.path = path
        self._block, self._tensors = None, None

    def block(self, i: int) -> dict:
        from safetensors.torch import load_file

        if i != self._block:
            self._tensors, self._block = load_file(str(self.path / block_file(i))), i
        return self._tensors

    def get(self, i: int, key: str) -> torch.Tensor:
        tensors = self.block(i)
        if key not in tensors:
            raise DataError(f"{self.path}: block {i} holds no '{key}' (the artifact is of another model family?)")
        return tensors[key]


def read_manifest(path: Path, stat: str, expect: dict) -> dict:
    """The manifest of a statistics artifact, checked against what the spec asks for (statistic, model,
    calibration): a mismatch names the artifact and the remedy."""
    file = Path(path) / "manifest.json"
    if Path(path).exists():
        verify(path)
    if not file.exists():
        raise DataError(f"{path} is not a statistics artifact (no manifest.json); delete it and rerun to rebuild it")
    manifest = json.loads(file.read_text())
    for key, want in {"stat": stat, **expect}.items():
        if manifest.get(key) != want:
            raise DataError(f"statistics artifact {path} was made for {key} '{manifest.get(key)}', not '{want}'; "
                            "delete it and rerun to rebuild it")
    return manifest


def open_statistic(stat: str, path, spec):
    """Open the artifact of statistic `stat` (a catalog key) for `spec`, checked against the spec's model and
    calibration (and, for guided Hessians, its group count)."""
    reader = registry.load_impl(registry.STATISTICS[stat].reader)
    expect = {"model": spec.model, "calib": spec.calib_name()}
    if stat == "guided_hessian":
        expect["g"] = spec.opt("guided_groups")
    return reader(path, expect)


def stat_dependencies(name: str, calib_name: str, gradient_groups: int = 4) -> dict[str, str]:
    """{statistic: artifact path} of the statistics that artifact `name` is computed from."""
    stat, params = registry.parse_stat_name(name)
    out = {}
    for need in registry.STATISTICS[stat].needs:
        if need == "gradients":
            g = params.get("g", 1)
            if gradient_groups % g:
                raise ConfigError(f"{name}: gradients.groups ({gradient_groups}) is not a multiple of g = {g}; set "
                                  f"gradients.groups in the config to a multiple of {g}")
            out[need] = stats_path(registry.stat_name(need, G=gradient_groups), calib_name)
        else:
            out[need] = stats_path(need, calib_name)
    return out


def compute_statistic(name: str, model, tokens: torch.Tensor, out_dir, calib_name: str, model_key: str,
                      inputs: dict | None = None, device: str = "cpu", chunk_tokens: int = 65536,
                      progress: bool = True, access=None) -> None:
    """Compute the statistics artifact `name` (a statistic and its parameters, e.g. `guided_hessian.g4`); `inputs`
    maps each statistic it is computed from to its artifact. `access`: the blocks of a model read lazily (only for
    a statistic whose catalog entry is `block_by_block`)."""
    stat, params = registry.parse_stat_name(name)
    missing = [n for n in registry.STATISTICS[stat].needs if n not in (inputs or {})]
    if missing:
        raise ValueError(f"{name} is computed from {missing}, which were not given")
    if access is not None and not registry.STATISTICS[stat].block_by_block:
        raise ValueError(f"{name} is not computed block by block: it needs the whole model in memory")
    compute = registry.load_impl(registry.STATISTICS[stat].impl)
    compute(model, tokens, out_dir, {"model": model_key, "calib": calib_name}, params=params, inputs=inputs or {},
            device=device, chunk_tokens=chunk_tokens, progress=progress, access=access)
