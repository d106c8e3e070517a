"""End-loss gradients of the FP model: the statistic `gradients.G{G}`.

`gradients.G{G}` (GuidedQuant, Kim et al. 2025, section 3; SqueezeLLM, Kim et al. 2024): one forward and backward
pass of the unquantized model per calibration window, the loss the mean cross-entropy of its next-token predictions
(labels = inputs). For every quantized linear it keeps
- `fisher`: the diagonal Fisher information, sum over windows of (dl/dW)^2 (float32, the shape of W);
- `saliency`: per window and token, the squared output gradient (10^3 dl/dz)^2 averaged over G contiguous blocks
  of output channels (bfloat16, (windows, tokens, G)); g blocks for any g dividing G are averages of G/g adjacent
  ones.
Weight gradients are folded into the Fisher accumulators as backward produces them, so beyond the accumulators at
most one layer's gradient is held at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from quantlib.access.adapters import adapter_for, check_row_groups
from quantlib.artifacts.atomic import atomic_dir, versions
from quantlib.artifacts.integrity import rebuild_hint
from quantlib.errors import DataError, NumericalError
from quantlib.stats.artifacts import StatisticReader, block_file

log = logging.getLogger("quantlib")
SALIENCY_SCALE = 1e3  # GuidedQuant's: keeps the squared gradients away from bfloat16's underflow


def tokens_digest(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _out_dims(model) -> dict[str, int]:
    adapter = adapter_for(model)
    block = adapter.block_list(model)[0]
    return {name: lin.out_features for name, lin in adapter.linears(block)}


def check_groups(model, groups: int, what: str) -> None:
    """`check_row_groups` for every quantized layer of a loaded model."""
    for name, d_out in _out_dims(model).items():
        check_row_groups(d_out, groups, name, what)


def capture_gradients(model, tokens: torch.Tensor, out_dir, meta: dict, params: dict, inputs: dict | None = None,
                      device: str = "cpu", progress: bool = True, **_) -> None:
    """Write the `gradients.G{G}` artifact (see the module's docstring)."""
    G = params["G"]
    check_groups(model, G, "the saliency's group count G")
    adapter = adapter_for(model)
    blocks = adapter.block_list(model)
    n, L = tokens.shape
    model.to(device)
    model.requires_grad_(False)
    names = [(i, name, lin) for i, b in enumerate(blocks) for name, lin in adapter.linears(b)]
    fisher = {(i, name): torch.zeros(lin.weight.shape, dtype=torch.float32, device=device) for i, name, lin in names}
    saliency = {(i, name): torch.empty(n, L, G, dtype=torch.bfloat16) for i, name, _ in names}
    window = {"n": 0}
    handles = []
    for i, name, lin in names:
        key = (i, name)
        lin.weight.requires_grad_(True)

        def fold(p, key=key):  # the squared gradient of this window into the Fisher, then free the gradient
            fisher[key].add_(p.grad.float().square())
            p.grad = None

        def keep_output(module, args, out, key=key):
            def saliency_of(grad):
                s = (grad.float() * SALIENCY_SCALE).square().reshape(grad.shape[0], L, G, -1).mean(-1)
                saliency[key][window["n"]] = s[0].to(torch.bfloat16).cpu()
            out.register_hook(saliency_of)

        handles.append(lin.weight.register_post_accumulate_grad_hook(fold))
        handles.append(lin.register_forward_hook(keep_output))
    t0 = time.time()
    losses = []
    try:
        for w in tqdm(range(n), desc="gradients", disable=not progress, mininterval=5):
            window["n"] = w
            ids = tokens[w:w + 1].to(device)
            loss = model(ids, labels=ids, use_cache=False).loss
            if not torch.isfinite(loss):
                raise NumericalError(f"the loss of calibration window {w} is {float(loss)}; check the model's "
                                     "weights and compute dtype")
            loss.backward()
            losses.append(loss.item())
            if (w + 1) % max(1, n // 8) == 0 or w + 1 == n:
                log.info("gradients: window %d/%d, loss %.4f, %.1fs", w + 1, n, losses[-1], time.time() - t0)
    finally:
        for h in handles:
            h.remove()
        model.requires_grad_(False)
    for (i, name), F in fisher.items():
        if not torch.isfinite(F).all():
            raise NumericalError(f"the gradients of layer '{adapter.blocks}.{i}.{name}' contain NaN or Inf")
    with atomic_dir(out_dir, seal=True) as tmp:
        for i in range(len(blocks)):
            part = {}
            for b, name, _ in names:
                if b == i:
                    part[f"{name}.fisher"] = fisher[(b, name)].cpu().contiguous()
                    part[f"{name}.saliency"] = saliency[(b, name)].contiguous()
            save_file(part, str(tmp / block_file(i)))
        manifest = {"stat": "gradients", **meta, "G": G, "scale": SALIENCY_SCALE, "windows": n, "seqlen": L,
                    "tokens_sha256": tokens_digest(tokens), "blocks": len(blocks), "block_path": adapter.blocks,
                    "layers": sorted({name for _, name, _ in names}), "loss": [round(x, 6) for x in losses],
                    "device": device, "dtype": str(next(model.parameters()).dtype),
                    "threads": torch.get_num_threads(), "seconds": round(time.time() - t0, 2), "versions": versions()}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    log.info("gradients: %d windows in %.1fs, mean loss %.4f", n, time.time() - t0, sum(losses) / n)


class Gradients(StatisticReader):
    """Reads a `gradients` artifact: the Fisher rows of a subgroup's layers stacked (handed to the solver as
    `fisher`) and, for the guided objective, each layer's saliency averaged to the spec's g groups (the weights of
    the runner's own Hessian capture)."""

    stat = "gradients"

    def __init__(self, path, expect: dict):
        super().__init__(path, expect)
        self.G = self.manifest["G"]

    def fisher(self, block: int, names) -> torch.Tensor:
        return torch.cat([self.files.get(block, f"{name}.fisher") for name in names])

    def saliency(self, block: int, name: str, g: int) -> torch.Tensor:
        """(windows, tokens, g) float32: the saliency averaged over G/g adjacent blocks."""
        if self.G % g:
            raise DataError(f"{self.path} holds saliency in {self.G} groups, which {g} groups cannot be averaged "
                            f"from; set gradients.groups to a multiple of {g}")
        s = self.files.get(block, f"{name}.saliency").float()
        n, L, G = s.shape
        return s.reshape(n, L, g, G // g).mean(-1)

    def layer_stats(self, block: int, group: tuple[str, ...], spec) -> dict:
        return {"fisher": self.fisher(block, group)}

    def token_weights(self, block: int, name: str, spec) -> torch.Tensor | None:
        g = spec.opt_or("guided_groups", 0)
        return self.saliency(block, name, g) if g else None

    def check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens_digest(tokens) != self.manifest["tokens_sha256"]:
            raise DataError(f"{self.path} was computed on other calibration windows than these; "
                            f"{rebuild_hint(self.path)}")
