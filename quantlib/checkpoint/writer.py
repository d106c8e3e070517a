"""Writing a quantized model in Hugging Face layout (read back by `quantlib.checkpoint.reader`).

Layout of `results/quantized/{name}/`:
  config.json        the model config plus `quantization_config` (quant_method "quantlib", the short name, and each
                     quantized layer's format, bits and group size)
  model-{k}-of-{n}.safetensors   Hugging Face's sharded layout, one shard per decoder block and a last one for
                     the embeddings, norms and head, listed by model.safetensors.index.json: unquantized tensors as
                     they are; for each quantized layer its stored tensors under `{layer}.{tensor}` (uniform:
                     `qweight` packed int32, `scales`, `zeros`) instead of `.weight`. Each block's shard is written
                     when the runner is done with the block, so a model larger than memory is never assembled.
  tokenizer files, quant_spec.json (the spec), diagnostics.json (per-layer errors, timings, versions)
Everything is checked for NaN/Inf before the directory is atomically renamed into place. The runner hands each
layer's representation to a `CheckpointWriter`, which packs it (`to_tensors`); loading rebuilds each layer from its
format (`quantlib.formats.load_representation`), whichever module defines it. Checkpoints of one
`model.safetensors` (written before the sharded layout) are read the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path

from quantlib.access.adapters import adapter_for
from quantlib.access.lazy import INDEX, all_finite
from quantlib.access.provenance import TOKENIZER_FILES
from quantlib.artifacts.atomic import atomic_dir, versions
from quantlib.catalog.names import QUANT_METHOD
from quantlib.errors import NumericalError

SHARD = "model-{:05d}-of-{:05d}.safetensors"
# diagnostics.json's fields that measure time and nothing else (at any depth): the only bytes in which two runs of
# the same job differ, a resumed one included (and checksums.json, through diagnostics.json's checksum).
TIMING_FIELDS = frozenset({"seconds", "train_seconds", "total_seconds"})


class CheckpointWriter:
    """Writes a quantized checkpoint in Hugging Face's sharded layout: one shard per decoder block and one for
    everything outside the blocks, listed by `model.safetensors.index.json`. Inside `writing(out_dir, n_blocks)`
    a block's shard is written as soon as the runner is done with it (`write_block`), so the checkpoint is never
    assembled in memory; otherwise every layer is kept until `save` writes them all (a model quantized in memory)."""

    def __init__(self):
        self.meta: dict[str, dict] = {}  # layer -> its format's metadata (every layer added)
        self.stored: dict[str, dict] = {}  # layer -> its stored tensors on the CPU, until its shard is written
        self.weight_map: dict[str, str] = {}
        self._tmp: Path | None = None
        self._n_blocks = 0
        self._written: set[int] = set()

    def add(self, layer: str, rep) -> None:
        self.meta[layer] = rep.meta()
        self.stored[layer] = {k: v.cpu() for k, v in rep.to_tensors().items()}

    @contextlib.contextmanager
    def writing(self, out_dir: str | Path, n_blocks: int, into: str | Path | None = None):
        """Shards go into a temporary beside `out_dir`, renamed into place when the block of code succeeds (after
        `save`); a crash leaves nothing. With `into` (a job's progress folder, `quantlib.stats.progress`), they go
        there and stay when the job fails, for a job started again to keep (`restore_progress`)."""
        with atomic_dir(out_dir, seal=True, into=into) as tmp:
            self._tmp, self._n_blocks, self._written = tmp, n_blocks, set()
            try:
                yield self
            finally:
                self._tmp = None

    def progress_state(self) -> dict:
        """What the writer knows of the shards written so far (JSON), for a job's progress record."""
        return {"meta": self.meta, "weight_map": self.weight_map, "written": sorted(self._written)}

    def restore_progress(self, state: dict) -> None:
        """Take back `progress_state()` of an earlier attempt whose shards are already in the folder written into."""
        if self.stored:
            raise RuntimeError("restore_progress: layers were added before the earlier progress was restored")
        self.meta, self.weight_map, self._written = dict(state["meta"]), dict(state["weight_map"]), set(
            state["written"])

    def _shard(self, k: int) -> str:
        return SHARD.format(k + 1, self._n_blocks + 1)

    def _write(self, k: int, state: dict) -> None:
        from safetensors.torch import save_file

        for key, value in state.items():
            if value.is_floating_point() and not all_finite(value):
                raise NumericalError(f"tensor '{key}' contains NaN or Inf; nothing was saved")
        name = self._shard(k)
        save_file({k: v.contiguous() for k, v in state.items()}, str(self._tmp / name), metadata={"format": "pt"})
        self.weight_map.update({key: name for key in state})

    def write_block(self, i: int, prefix: str, block_state: dict) -> None:
        """Write block `i`'s shard: its unquantized tensors (`block_state`, named relative to the block, whose
        full names start with `prefix`) and the stored tensors of its quantized layers. Outside `writing`, nothing
        (the block is written by `save`)."""
        if self._tmp is None:
            return
        state = {}
        for key, value in block_state.items():
            layer, _, leaf = f"{prefix}.{key}".rpartition(".")
            if not (leaf == "weight" and layer in self.meta):
                state[f"{prefix}.{key}"] = value
        for layer in [name for name in self.stored if name.startswith(f"{prefix}.")]:
            state.update({f"{layer}.{leaf}": v for leaf, v in self.stored.pop(layer).items()})
        self._write(i, state)
        self._written.add(i)

    def save(self, model, spec, report, out_dir: str | Path, tokenizer_dir: str | Path, extra: dict | None = None,
             outer_state: dict | None = None) -> None:
        """Finish the checkpoint of `model`: the blocks not yet written, the tensors outside the blocks
        (`outer_state`, or the model's own), config, tokenizer, spec and diagnostics."""
        if self._tmp is None:
            n_blocks = len(adapter_for(model).block_list(model))
            with self.writing(out_dir, n_blocks):
                self._finish(model, spec, report, tokenizer_dir, extra, outer_state)
        else:
            self._finish(model, spec, report, tokenizer_dir, extra, outer_state)

    def _finish(self, model, spec, report, tokenizer_dir, extra, outer_state) -> None:
        adapter = adapter_for(model)
        blocks = adapter.block_list(model)
        for i, block in enumerate(blocks):
            if i not in self._written:
                self.write_block(i, f"{adapter.blocks}.{i}", block.state_dict())
        if self.stored:
            raise RuntimeError(f"layers {sorted(self.stored)[:3]} lie outside the decoder blocks; nothing was saved")
        if outer_state is None:
            outer_state = {k: v for k, v in model.state_dict().items() if not k.startswith(f"{adapter.blocks}.")}
        outer_state = dict(outer_state)
        if getattr(model.config, "tie_word_embeddings", False):
            outer_state.pop("lm_head.weight", None)
        self._write(self._n_blocks, outer_state)
        tmp = self._tmp
        total = sum((tmp / name).stat().st_size for name in set(self.weight_map.values()))
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": self.weight_map},
                                            indent=1))
        cfg = model.config.to_dict()
        cfg["quantization_config"] = {"quant_method": QUANT_METHOD, "format_version": 1, "spec": spec.short_name(),
                                      "layers": self.meta}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).exists():
                shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        (tmp / "quant_spec.json").write_text(json.dumps(
            {"short_name": spec.short_name(), **dataclasses.asdict(spec)}, indent=2))
        diagnostics = {"short_name": spec.short_name(), "seconds": report.seconds, "versions": versions(),
                       "avg_bits_per_weight": average_bits(report.layers), **(extra or {}), "layers": report.layers}
        if report.blocks:
            diagnostics["blocks"] = report.blocks
        if getattr(report, "preprocess", None):
            diagnostics["preprocess"] = report.preprocess
        (tmp / "diagnostics.json").write_text(json.dumps(diagnostics, indent=2))


def save_quantized(model, spec, report, out_dir: str | Path, tokenizer_dir: str | Path, extra: dict | None = None):
    """Write `model` (quantized in place) with the representations the runner kept in `report.reps`."""
    writer = CheckpointWriter()
    for layer, rep in report.reps.items():
        writer.add(layer, rep)
    writer.save(model, spec, report, out_dir, tokenizer_dir, extra)


def average_bits(layers: dict) -> float:
    """Storage bits per quantized weight over the whole model (grid statistics and outliers included)."""
    sizes = {k: d["shape"][0] * d["shape"][1] for k, d in layers.items()}
    return sum(d["bits_per_weight"] * sizes[k] for k, d in layers.items()) / max(1, sum(sizes.values()))
