"""The statistic `fp_hessian`: the input Hessian of every quantized layer, H = mean of x x^T over the calibration
tokens, with the inputs propagated through the *unquantized* model (GuidedQuant's convention; the runner's default
instead takes them from the already quantized prefix)."""

from __future__ import annotations

import json
import logging
import time

import torch
from safetensors.torch import save_file

from quantlib.access.adapters import adapter_for
from quantlib.artifacts.atomic import atomic_dir, versions
from quantlib.errors import DataError
from quantlib.stats import capture
from quantlib.stats.artifacts import StatisticReader, block_file, fp_blocks

log = logging.getLogger("quantlib")


def capture_fp_hessians(model, tokens: torch.Tensor, out_dir, meta: dict, params: dict | None = None,
                        inputs: dict | None = None, device: str = "cpu", chunk_tokens: int = 65536,
                        progress: bool = True, access=None, resume=None) -> None:
    """Write the `fp_hessian` artifact: per block, the Hessian of each subgroup's input (keyed by the subgroup's
    first layer), the block's outputs from its unquantized weights going on to the next block."""
    adapter = adapter_for(model)
    blocks = adapter.block_list(model)
    t0 = time.time()
    with atomic_dir(out_dir, seal=True, into=getattr(resume, "checkpoint", None)) as tmp:
        for i, block, states, _ in fp_blocks(model, tokens, device, chunk_tokens, progress, "fp hessians", access,
                                             resume):
            found = capture.hessians(block, adapter.subgroups, states, device, stop=False)
            save_file({group[0]: H.cpu().contiguous() for group, H in zip(adapter.subgroups, found)},
                      str(tmp / block_file(i)))
        manifest = {"stat": "fp_hessian", **meta, "blocks": len(blocks), "tokens": int(tokens.numel()),
                    "subgroups": [list(g) for g in adapter.subgroups], "block_path": adapter.blocks,
                    "seconds": round(time.time() - t0, 2), "versions": versions()}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    log.info("fp_hessian: %d blocks in %.1fs", len(blocks), time.time() - t0)


class FPHessians(StatisticReader):
    """Reads an `fp_hessian` artifact one block at a time: the runner's Hessian source."""

    stat = "fp_hessian"

    def hessian(self, block: int, group: tuple[str, ...]) -> torch.Tensor:
        tensors = self.files.block(block)
        if group[0] not in tensors:
            raise DataError(f"{self.path}: no Hessian for layers {'+'.join(group)} of block {block}; the artifact "
                            f"holds {sorted(tensors)} (a model of another family?)")
        return tensors[group[0]]
