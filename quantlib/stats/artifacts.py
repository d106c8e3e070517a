"""Statistics of the unquantized model: computed once per model and calibration (rule `stats`, artifacts under
`results/stats/{stat}/{model}.{calibration}/`) and shared by every method that needs them. Each statistic is a
catalog entry (`quantlib.catalog.statistics`) naming a compute function and a reader; this module holds what they
share: the walk over the FP model's blocks, the artifact's manifest, the one-block reader and the reader interface
through which the runner hands a statistic to the solvers.

An artifact is a folder with `manifest.json` (the statistic, model, calibration, what else it holds) and one
safetensors file per decoder block, so a reader holds one block at a time.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from quantlib.access.adapters import adapter_for
from quantlib.access.blocks import BlockAccess
from quantlib.artifacts.integrity import rebuild_hint, verify
from quantlib.catalog import registry
from quantlib.errors import DataError
from quantlib.stats import capture

log = logging.getLogger("quantlib")


def block_file(i: int) -> str:
    return f"block{i:04d}.safetensors"


def fp_blocks(model, tokens: torch.Tensor, device: str, chunk_tokens: int, progress: bool, desc: str, access=None,
              resume=None):
    """Walk the decoder blocks of the unquantized model: yields (index, block, states), the block on the device and
    `states` its inputs per chunk of windows (as `capture.block_inputs` gives them, `chunk` windows each); after each
    step the block's outputs become the next block's inputs. `access` is the runner's `BlockAccess` (lazy: each
    block read from disk and freed after). `resume` (a `quantlib.stats.progress.BlockProgress`, made by the job)
    keeps the walk's state after each block, the caller's block files written into `resume.checkpoint`: a walk
    started again skips the blocks an earlier attempt finished."""
    adapter = adapter_for(model)
    blocks = adapter.block_list(model)
    access = access or BlockAccess(model)
    chunk = max(1, min(len(tokens), chunk_tokens // tokens.shape[1]))
    done = SimpleNamespace(layers={}, blocks=[])  # what the progress record keeps besides the streams: nothing
    start = resume.begin(len(blocks), done) if resume is not None else 0
    with torch.no_grad():
        with access.outer(device):  # block 0's inputs: cheap, and they give every chunk's keyword arguments
            states = capture.States(capture.block_inputs(model, blocks, tokens, chunk, device), "memory", None,
                                    device)
        restored = resume.restore("memory", None, device) if resume is not None else None
        if restored is not None:
            states.hidden = restored["fp"]
        for i in tqdm(range(start, len(blocks)), desc=desc, disable=not progress, mininterval=5, initial=start,
                      total=len(blocks)):
            block = access.open(i, device)
            t0 = time.time()
            yield i, block, states, chunk
            states = states.through(block)
            log.info("%s: block %d/%d in %.1fs", desc, i + 1, len(blocks), time.time() - t0)
            access.close(i, block)
            if resume is not None:
                resume.finished(i, done, {"fp": states.hidden})


class BlockFiles:
    """The one reader of statistics stored per block: one block's tensors of an artifact at a time."""

    def __init__(self, path: Path):
        self.path = path
        self._block, self._tensors = None, None

    def block(self, i: int) -> dict:
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
        raise DataError(f"{path} is not a statistics artifact (no manifest.json); {rebuild_hint(path)}")
    manifest = json.loads(file.read_text())
    for key, want in {"stat": stat, **expect}.items():
        if manifest.get(key) != want:
            raise DataError(f"statistics artifact {path} was made for {key} '{manifest.get(key)}', not '{want}'; "
                            f"{rebuild_hint(path)}")
    return manifest


class StatisticReader:
    """An opened statistics artifact, as the runner reads it. A subclass sets `stat` (its catalog name) and implements
    what its catalog entry `hands` the solver; the defaults hand nothing.

    - `hessian(block, group)`: the Hessian of a subgroup's shared input (a tensor, or a `GuidedHessian`), in place of
      the runner's own capture;
    - `layer_stats(block, group, spec)`: per-weight tensors of the subgroup's layers stacked by rows ({key: (rows,
      d_in)}), merged into the layer task's `stats` (a solver reads them with `task.stat(key)`);
    - `token_weights(block, name, spec)`: per-token weights (windows, tokens, g) of layer `name`'s inputs in the
      runner's own Hessian capture, or None;
    - `check_tokens(tokens)`: refuse calibration windows other than those the artifact was computed on.
    """

    stat = ""

    def __init__(self, path, expect: dict):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, self.stat, expect)
        self.files = BlockFiles(self.path)

    def hessian(self, block: int, group: tuple[str, ...]):
        raise NotImplementedError(f"{self.stat} hands no Hessians")

    def layer_stats(self, block: int, group: tuple[str, ...], spec) -> dict:
        return {}

    def token_weights(self, block: int, name: str, spec) -> torch.Tensor | None:
        return None

    def check_tokens(self, tokens: torch.Tensor) -> None:
        pass


def open_statistic(stat: str, path, spec) -> StatisticReader:
    """Open the artifact of statistic `stat` (a catalog key) for `spec`, checked against the spec's model and
    calibration and the parameters the spec decides (e.g. the guided Hessians' group count)."""
    reader = registry.load_impl(registry.STATISTICS[stat].reader)
    expect = {"model": spec.model, "calib": spec.calib_name(), **registry.statistic_params(stat, spec, None)}
    return reader(path, expect)


def compute_statistic(name: str, model, tokens: torch.Tensor, out_dir, calib_name: str, model_key: str,
                      inputs: dict | None = None, device: str = "cpu", chunk_tokens: int = 65536,
                      progress: bool = True, access=None, streams: str = "memory", resume=None) -> None:
    """Compute the statistics artifact `name` (a statistic and its parameters, as `{stat}.g4`); `inputs`
    maps each statistic it is computed from to its artifact. `access`: the blocks of a model read lazily (only for
    a statistic whose catalog entry is `block_by_block`); `streams`: where a statistic computed with a streamed
    backward keeps its activations (`memory` or `disk`); `resume`: the job's progress (a block-by-block statistic
    started again goes on after the last block an earlier attempt finished)."""
    stat, params = registry.parse_stat_name(name)
    missing = [n for n in registry.STATISTICS[stat].needs if n not in (inputs or {})]
    if missing:
        raise ValueError(f"{name} is computed from {missing}, which were not given")
    if access is not None and not registry.STATISTICS[stat].block_by_block:
        raise ValueError(f"{name} is not computed block by block: it needs the whole model in memory")
    compute = registry.load_impl(registry.STATISTICS[stat].impl)
    extra = {"streams": streams} if registry.STATISTICS[stat].backward else {}
    if resume is not None and "resume" in inspect.signature(compute).parameters:  # a plugin's may not take it
        extra["resume"] = resume
    compute(model, tokens, out_dir, {"model": model_key, "calib": calib_name}, params=params, inputs=inputs or {},
            device=device, chunk_tokens=chunk_tokens, progress=progress, access=access, **extra)
