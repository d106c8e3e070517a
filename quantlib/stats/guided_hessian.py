"""GuidedQuant's saliency-weighted Hessians (Kim et al. 2025, section 3), the statistic `guided_hessian.g{g}`: per
linear and block k of its output rows, H_k = (1/N) sum_t s_tk x_t x_t^T over the N calibration tokens, x the layer's
inputs in the FP model (GuidedQuant propagates FP activations) and s the saliency of the `gradients` statistic
averaged to g blocks; plus each subgroup's plain Hessian (for the plain layer error)."""

from __future__ import annotations

import json
import logging
import time

import torch
from safetensors.torch import save_file

from quantlib.access.adapters import adapter_for
from quantlib.artifacts.atomic import atomic_dir, versions
from quantlib.stats import capture
from quantlib.stats.artifacts import StatisticReader, block_file, fp_blocks
from quantlib.stats.gradients import Gradients, check_groups
from quantlib.stats.hessian import GuidedHessian

log = logging.getLogger("quantlib")


def capture_guided_hessians(model, tokens: torch.Tensor, out_dir, meta: dict, params: dict, inputs: dict,
                            device: str = "cpu", chunk_tokens: int = 65536, progress: bool = True, access=None,
                            resume=None, **_) -> None:
    """Write the `guided_hessian.g{g}` artifact from the FP model's inputs and the `gradients` artifact."""
    g = params["g"]
    check_groups(model, g, "the guided objective's group count g")
    grads = Gradients(inputs["gradients"], {"model": meta["model"], "calib": meta["calib"]})
    grads.check_tokens(tokens)
    adapter = adapter_for(model)
    blocks = adapter.block_list(model)
    t0 = time.time()
    with atomic_dir(out_dir, seal=True, into=getattr(resume, "checkpoint", None)) as tmp:
        for i, block, states, chunk in fp_blocks(model, tokens, device, chunk_tokens, progress, "guided hessians",
                                                 access, resume):
            weights = {name: grads.saliency(i, name, g) for group in adapter.subgroups for name in group}
            found = capture.hessians(block, adapter.subgroups, states, device, stop=False, weights=weights,
                                     chunk=chunk)
            part = {}
            for group, gh in zip(adapter.subgroups, found):
                part[group[0]] = gh.plain.cpu().contiguous()
                for name, Hs in gh.per_linear.items():
                    part[f"{name}.guided"] = Hs.cpu().contiguous()
            save_file(part, str(tmp / block_file(i)))
        manifest = {"stat": "guided_hessian", **meta, "g": g, "G": grads.G, "blocks": len(blocks),
                    "tokens": int(tokens.numel()), "subgroups": [list(s) for s in adapter.subgroups],
                    "seconds": round(time.time() - t0, 2), "versions": versions()}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    log.info("guided_hessian.g%d: %d blocks in %.1fs", g, len(blocks), time.time() - t0)


class GuidedHessians(StatisticReader):
    """Reads a `guided_hessian` artifact one block at a time: the runner's Hessian source for the guided objective."""

    stat = "guided_hessian"

    def hessian(self, block: int, group: tuple[str, ...]) -> GuidedHessian:
        return GuidedHessian(self.files.get(block, group[0]),
                             {name: self.files.get(block, f"{name}.guided") for name in group})
