"""The sequential block runner, shared by every method. One walk over the decoder blocks, in the mode the spec's
catalog entries imply (`QuantSpec.mode`):

- data-free: each linear quantized from its weight alone;
- layer-wise: the linears of each block quantized subgroup by subgroup with their input Hessians, captured from the
  calibration windows (`quantlib.runner.layerwise`) or read from a statistic of the FP model
  (`quantlib.runner.datafree`, which also runs the data-free methods);
- block-wise: a whole block trained at once against the FP block's outputs (`quantlib.runner.blockwise`).

The runner resolves the spec's components once (`LayerSolver`), hands every layer's representation to `on_layer`
(the checkpoint writer packs it) and never packs itself. A job's walk keeps its progress after each block and, run
again after a kill, starts after the last finished block (`quantlib.stats.progress`, shared by the three modes).

When all calibration windows fit in one chunk, one forward pass per block does everything: a pre-forward hook on a
subgroup's first linear accumulates its Hessian from the whole batch, quantizes the subgroup in place and lets the
forward continue with the quantized weights. Otherwise the block is run once per subgroup over all chunks, each
pass stopped at that subgroup's input, then once more to propagate. Both give the same result.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from quantlib.access.adapters import adapter_for, check_group_size
from quantlib.access.blocks import BlockAccess
from quantlib.access.lazy import return_freed_memory
from quantlib.catalog import registry
from quantlib.catalog.contract import forward_settings
from quantlib.errors import ConfigError
from quantlib.runner.blockwise import quantize_blocks
from quantlib.runner.datafree import quantize_without_forward
from quantlib.runner.group import GroupQuantizer, QuantizedModelReport
from quantlib.runner.layerwise import quantize_layerwise
from quantlib.stats.progress import BlockProgress, NoProgress
from quantlib.solvers.contract import LayerSolver
from quantlib.transforms.activations import install as install_forward


def check_shapes(model, spec) -> None:
    """Before any work: every quantized layer must take the spec's group size."""
    adapter = adapter_for(model)
    for i, block in enumerate(adapter.block_list(model)):
        for name, lin in adapter.linears(block):
            check_group_size(lin.in_features, spec.group_size, f"{adapter.blocks}.{i}.{name}")


def transforms_model(spec) -> bool:
    """Whether the spec transforms the whole model before the walk (a model-scope preprocessor: it needs the model
    in memory, not read block by block)."""
    return any(registry.component("preprocess", p).scope == "model" for p in spec.preprocess)


def prepare_forward(model, spec, tokens, access: BlockAccess) -> dict:
    """Before the walk: the spec's model-scope preprocessors (rotations) transform the whole model in memory, and
    its quantized forward (activations, KV cache, online Hadamards: `contract.forward_settings`) is installed, so
    that every Hessian is captured from the model as it will run. The settings land in the model's config, which the
    checkpoint stores. Returns the preprocessors' diagnostics."""
    out = {}
    model_scope = [c for c in (registry.component("preprocess", p) for p in spec.preprocess) if c.scope == "model"]
    if model_scope and access.lazy is not None:  # the rotations mix every block with the embeddings and the head
        raise ConfigError(f"{spec.describe()} transforms the whole model before quantizing; load it in memory "
                          "(not block by block)")
    for comp in model_scope:
        out[comp.name] = comp.load()(model, spec, tokens)
    if model_scope:  # the heap keeps the rotations' freed float64 copies (1.1-1.35x the model) unless told
        return_freed_memory()
    settings = forward_settings(spec)
    if settings is not None:
        install_forward(model, settings)
    return out


def quantized_blocks(model, spec) -> int:
    """How many decoder blocks, from the first, the spec quantizes (its `blocks` setting; 0: all of them)."""
    total = len(adapter_for(model).block_list(model))
    n = spec.opt_or("blocks", 0)
    if n > total:
        raise ConfigError(f"blocks {n}: the model has only {total} decoder blocks; use at most {total} (0: all)")
    return n or total


class StatisticsHandoff:
    """What the runner hands the solvers from the opened statistics, as each one's catalog entry declares (`hands`):
    a Hessian source in place of the runner's own capture, per-weight tensors merged into each layer task, per-token
    weights of the runner's capture. No statistic is known here by name."""

    def __init__(self, spec, statistics: dict):
        missing = [s for s in spec.statistic_kinds() if s not in statistics]
        if missing:
            raise ValueError(f"{spec.describe()} needs the statistics {missing}")
        self.spec = spec
        self.readers = {name: statistics[name] for name in spec.statistic_kinds()}
        hands = {name: registry.STATISTICS[name].hands for name in self.readers}
        sources = [r for name, r in self.readers.items() if "hessian" in hands[name]]
        if len(sources) > 1:
            raise ValueError(f"{spec.describe()} reads Hessians from several statistics: {sorted(self.readers)}")
        self.source = sources[0] if sources else None
        self.per_layer = [r for name, r in self.readers.items() if "layer_stats" in hands[name]]
        self.weighting = [r for name, r in self.readers.items() if "token_weights" in hands[name]]

    def check_tokens(self, tokens: torch.Tensor | None) -> None:
        if tokens is not None:
            for reader in self.readers.values():
                reader.check_tokens(tokens)

    def layer_stats(self, block: int, group: tuple[str, ...]) -> dict:
        out = {}
        for reader in self.per_layer:
            out.update(reader.layer_stats(block, group, self.spec))
        return out

    def token_weights(self, adapter, block: int) -> dict | None:
        out = {}
        for reader in self.weighting:
            for group in adapter.subgroups:
                for name in group:
                    w = reader.token_weights(block, name, self.spec)
                    if w is not None:
                        out[name] = w
        return out or None


def quantize_model(model, spec, tokens: torch.Tensor | None = None, device: str = "cpu", chunk_tokens: int = 65536,
                   progress: bool = True, statistics: dict | None = None,
                   on_layer: Callable | None = None, seed: int = 0, streams: str = "memory",
                   access: BlockAccess | None = None, resume: BlockProgress | None = None) -> QuantizedModelReport:
    """Quantize every decoder linear of `model` in place according to `spec`.

    `tokens` (n, seqlen) are the calibration windows (None when the spec reads none); `statistics` maps each
    statistic the spec needs to its opened artifact (`quantlib.stats.artifacts.open_statistic`). Each layer's
    representation goes to `on_layer(name, rep)`, or into the report's `reps`. `seed` is for block-wise methods;
    `streams` (`memory` or `disk`) is where the calibration activations are kept between blocks. `access` reaches
    the blocks (default: all in memory; `BlockAccess(model, lazy=...)` reads each from disk and frees it when done).
    With `resume` (`quantlib.stats.progress.BlockProgress`, the job's progress beside its output), the state after
    each block is kept, and the walk starts after the last block an earlier attempt finished (those blocks are not
    touched: their layers went to `on_layer`'s checkpoint then). Returns per-layer diagnostics.
    """
    adapter = adapter_for(model)
    access = access or BlockAccess(model)
    check_shapes(model, spec)
    handoff = StatisticsHandoff(spec, statistics or {})
    handoff.check_tokens(tokens)
    report = QuantizedModelReport()
    sink = on_layer or report.reps.__setitem__
    t0 = time.time()
    report.preprocess = prepare_forward(model, spec, tokens, access)
    mode = spec.mode
    if mode != "data_free" and spec.needs_tokens and tokens is None:
        raise ValueError(f"{spec.describe()} needs calibration tokens")
    n_blocks = quantized_blocks(model, spec)
    if resume is not None and on_layer is None:
        raise ValueError("resuming needs `on_layer` (a checkpoint writer): the finished blocks' layers are on disk")
    resume = resume or NoProgress()
    resume.begin(n_blocks, report)
    if mode == "block":
        quantize_blocks(model, adapter, spec, tokens, device, report, sink, progress, seed, streams, access, n_blocks,
                        resume)
    else:
        quant = GroupQuantizer(LayerSolver(spec), report, sink, handoff.layer_stats if handoff.per_layer else None)
        if mode == "data_free" or not spec.needs_tokens:
            quantize_without_forward(model, adapter, device, progress, access, quant, handoff.source, n_blocks,
                                     resume)
        else:
            quantize_layerwise(model, adapter, spec, tokens, device, chunk_tokens, progress, streams, access, quant,
                               lambda i: handoff.token_weights(adapter, i), n_blocks, resume)
    for i in range(n_blocks, len(adapter.block_list(model))):  # left unquantized (`blocks`): passed on as they are
        access.close(i, access.open(i, "cpu"))
    report.seconds = time.time() - t0
    return report
