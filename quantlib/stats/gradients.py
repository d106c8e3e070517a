"""End-loss gradients of the FP model: the statistic `gradients.G{G}`.

`gradients.G{G}` (GuidedQuant, Kim et al. 2025, section 3; SqueezeLLM, Kim et al. 2024): one forward and backward
pass of the unquantized model per calibration window, the loss the mean cross-entropy of its next-token predictions
(labels = inputs). For every quantized linear it keeps
- `fisher`: the diagonal Fisher information, sum over windows of (dl/dW)^2 (float32, the shape of W);
- `saliency`: per window and token, the squared output gradient (10^3 dl/dz)^2 averaged over G contiguous blocks
  of output channels (bfloat16, (windows, tokens, G)); g blocks for any g dividing G are averages of G/g adjacent
  ones.

The model is read block by block (`quantlib.stats.streamed.BlockChain`): every window goes forward through the
blocks with each block's inputs kept; the loss's gradient w.r.t. the final states is taken per window (the model's
own final norm and head, a few hundred tokens' logits at a time); then the windows go back through one block at a
time, last to first, its forward recomputed from its kept inputs. The windows are the inner loop of each block's
backward, so only that block's Fisher sums are held: each window's weight gradient is folded into them as backward
produces it (at most one layer's gradient at a time), and the block's shard is written as soon as its last window
is through. Equal to one whole-model backward per window (`tests/stats/test_streamed.py`).
A job killed in the backward goes on after the last block it finished (`quantlib.stats.progress`, a walk from the
last block to the first): the saved gradients flowing into the block before, the losses, the forward recomputed only
through the blocks still to go back through.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from quantlib.access.adapters import adapter_for, check_row_groups
from quantlib.access.blocks import BlockAccess
from quantlib.access.lazy import return_freed_memory
from quantlib.artifacts.atomic import atomic_dir, versions
from quantlib.artifacts.integrity import rebuild_hint
from quantlib.catalog.statistics import LOSS_LOGITS
from quantlib.errors import DataError, NumericalError
from quantlib.stats.progress import NoProgress
from quantlib.stats import capture
from quantlib.stats.artifacts import StatisticReader, block_file
from quantlib.stats.streamed import BlockChain, final_states

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


def _end_loss_gradients(model, blocks, tokens, final, chain, access, device) -> tuple[list[float], object]:
    """Per window, the loss (mean next-token cross-entropy of the model's own logits: final norm and head) and its
    gradient w.r.t. the final states `final` (a stream, dropped). The logits are taken `LOSS_LOGITS // vocabulary`
    tokens at a time (each token's share of the loss and of its gradient is its own), so the head's working set
    stays a few logits tensors of 16 MB instead of the whole window's."""
    n, L = tokens.shape
    step = max(1, min(L, LOSS_LOGITS // model.config.vocab_size))
    # what the forward walk freed, back to the system before the head is read: the heap kept 80 MB of it on the
    # offline model, and this phase is the job's peak (806 -> 765 MB with streams on disk)
    return_freed_memory()
    losses, grads = [], chain.stream()
    with access.outer(device, head=True), final_states(blocks, chain.tuple_output) as feed:
        for w in range(n):
            x = final[w].detach()
            ids = tokens[w:w + 1].to(device)
            labels = torch.full_like(ids, -100)
            labels[:, :-1] = ids[:, 1:]
            grad, loss = torch.empty_like(x), 0.0
            for s in range(0, L, step):
                part = x[:, s:s + step].detach().requires_grad_(True)
                feed(part)
                with torch.enable_grad():
                    logits = model(ids[:, s:s + step], use_cache=False).logits.float()
                    piece = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, s:s + step].reshape(-1),
                                            ignore_index=-100, reduction="sum") / (L - 1)
                # the states' gradient alone, returned rather than accumulated into `part.grad`
                (grad[:, s:s + step],) = torch.autograd.grad(piece, part)
                loss += piece.item()
                del logits, piece, part
            if not math.isfinite(loss):
                raise NumericalError(f"the loss of calibration window {w} is {loss}; check the model's weights and "
                                     "compute dtype")
            grads.append(grad)
            losses.append(loss)
    final.drop()
    return losses, grads


def capture_gradients(model, tokens: torch.Tensor, out_dir, meta: dict, params: dict, inputs: dict | None = None,
                      device: str = "cpu", progress: bool = True, access=None, streams: str = "memory", resume=None,
                      **_) -> None:
    """Write the `gradients.G{G}` artifact (see the module's docstring). `access` reaches the blocks (default: the
    model's own, in memory; lazy: each read from disk and freed after); `streams` is where the kept activations and
    gradients are (`memory` or `disk`). `resume` (a `quantlib.stats.progress.BlockProgress`, made by the job)
    keeps the backward's state after each block (its shard written into `resume.checkpoint`, the gradients flowing
    into the block before, the losses): a job started again recomputes the forward only through the blocks still to
    go back through, and goes on at the block before the last one finished."""
    G = params["G"]
    check_groups(model, G, "the saliency's group count G")
    adapter = adapter_for(model)
    blocks = adapter.block_list(model)
    access = access or BlockAccess(model)
    resume = resume or NoProgress()
    n = len(tokens)
    model.requires_grad_(False)  # only the quantized linears' weights, block by block (`fold`)
    t0 = time.time()
    # The backward walks the blocks last to first: the k blocks an earlier attempt finished are the last k.
    left = len(blocks) - resume.begin(len(blocks), None, reverse=True)
    with resume.stream_folder(streams) as folder:
        with torch.no_grad(), access.outer(device):
            states = capture.block_inputs(model, blocks, tokens, 1, device)
        restored = resume.restore(streams, folder, device)
        with BlockChain(access, [kw for _, kw in states], device, streams, folder) as chain:
            if left == len(blocks):
                final = chain.forward([h for h, _ in states], len(blocks))
                del states
                log.info("gradients: forward through %d blocks in %.1fs", len(blocks), time.time() - t0)
                losses, grads = _end_loss_gradients(model, blocks, tokens, final, chain, access, device)
                layers = []
            else:
                # Resumed: the losses and the gradients flowing into block `left`-1's output are the saved ones;
                # the kept inputs of blocks 0..left-1 are recomputed (a deterministic forward, so the same bytes;
                # cheaper than saving every block's inputs, which would cost the disk of the whole forward).
                losses, layers = resume.extra["losses"], list(resume.extra["layers"])
                grads = restored["grad"] if left else None
                if left:
                    chain.inputs_up_to([h for h, _ in states], left)
                    log.info("gradients: forward through %d blocks in %.1fs, to resume the backward", left - 1,
                             time.time() - t0)
                del states
            _backward(model, adapter, chain, grads, left, tokens, G, losses, layers, resume, out_dir, meta, device,
                      streams, progress, t0)
    log.info("gradients: %d windows in %.1fs, mean loss %.4f", n, time.time() - t0, sum(losses) / n)


def _backward(model, adapter, chain, grads, left, tokens, G, losses, layers, resume, out_dir, meta, device, streams,
              progress, t0) -> None:
    """Back through blocks `left`-1..0 from the gradients `grads` flowing into block `left`-1's output, one shard per
    block (`fold`), the progress recorded after each; then the manifest."""
    n, L = tokens.shape
    blocks = adapter.block_list(model)
    with atomic_dir(out_dir, seal=True, into=getattr(resume, "checkpoint", None)) as tmp:

        @contextlib.contextmanager
        def fold(i, block):
            """Block i's Fisher sums and saliency while its windows go back through it; its shard after."""
            linears = adapter.linears(block)
            fisher = {name: torch.zeros(lin.weight.shape, dtype=torch.float32, device=device)
                      for name, lin in linears}
            saliency = {name: torch.empty(n, L, G, dtype=torch.bfloat16) for name, _ in linears}
            block.requires_grad_(False)
            handles = []
            for name, lin in linears:
                def add(p, name=name):  # this window's squared gradient into the Fisher, the gradient freed
                    fisher[name].add_(p.grad.float().square())
                    p.grad = None

                def keep_output(module, args, out, name=name):
                    def saliency_of(grad):
                        s = (grad.float() * SALIENCY_SCALE).square().reshape(grad.shape[0], L, G, -1).mean(-1)
                        saliency[name][chain.position[1]] = s[0].to(torch.bfloat16).cpu()
                    out.register_hook(saliency_of)

                lin.weight.requires_grad_(True)
                handles.append(lin.weight.register_post_accumulate_grad_hook(add))
                handles.append(lin.register_forward_hook(keep_output))
            try:
                yield
            finally:
                for h in handles:
                    h.remove()
                block.requires_grad_(False)
            part = {}
            for name, F in fisher.items():
                if not torch.isfinite(F).all():
                    raise NumericalError(f"the gradients of layer '{adapter.blocks}.{i}.{name}' contain NaN or "
                                         "Inf")
                part[f"{name}.fisher"] = F.cpu().contiguous()
                part[f"{name}.saliency"] = saliency[name].contiguous()
            save_file(part, str(tmp / block_file(i)))
            layers.extend(fisher)

        def after(i, g):  # block i's shard is written: the state to go on from at block i-1
            resume.finished(i, None, {"grad": g}, {"losses": losses, "layers": sorted(set(layers))})

        if left:
            chain.backward(grads, install=fold, label="gradients" if progress else "", after=after)
        manifest = {"stat": "gradients", **meta, "G": G, "scale": SALIENCY_SCALE, "windows": n, "seqlen": L,
                    "tokens_sha256": tokens_digest(tokens), "blocks": len(blocks), "block_path": adapter.blocks,
                    "layers": sorted(set(layers)), "loss": [round(x, 6) for x in losses], "device": device,
                    "dtype": str(next(model.parameters()).dtype), "streams": streams,
                    "threads": torch.get_num_threads(), "seconds": round(time.time() - t0, 2),
                    "versions": versions()}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))


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
