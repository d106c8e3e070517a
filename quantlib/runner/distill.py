"""Lightweight distillation after quantization (NeUQI, Lin et al. 2025, section 4): the quantized model's integer
codes stay fixed while every (row, group) scale and zero point of its quantized linears and every norm gain train
to bring the model's final hidden states (after the last norm, before the LM head) to the unquantized model's,
mean squared error over all elements. AdamW (betas 0.9 / 0.95, no weight decay), 10 % linear warm-up then cosine to
0, batches of windows in a seeded order, the gradient norm clipped at 1; float32, or with `bf16` the forward passes
in bfloat16 autocast on a GPU as the reference trains (the teacher's targets stay float32).
The result is a checkpoint in the base's format: the same codes, the trained scales, zeros and norm gains.

Neither model is held whole; both are read block by block from their checkpoints (`quantlib.access.lazy`). The
teacher's targets come from one streamed forward of the FP model, each block freed after it (`BlockChain` without
kept inputs). Each training step takes its batch of windows forward through the student's blocks, each read when
reached, keeping every block's inputs; takes the loss on the final states through the student's own final norm;
then goes back block by block, last to first, each block's forward recomputed from its kept inputs
(`quantlib.stats.streamed.BlockChain.backward`): the gradients of one backward pass through the whole model.
Resident between steps: the trainable scales, zero points and norm gains with AdamW's state, the targets, the
student's embeddings and final norm, and each block's representations (the integer codes, one byte per weight, so
that a block is not unpacked from the checkpoint at every step; on disk with `streams` disk, like the targets and
the kept activations). `quantlib.jobs.memory_backward.distill_phases` gives the figures.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from quantlib.access.blocks import BlockAccess
from quantlib.errors import ConfigError, NumericalError
from quantlib.runner.training import train, warmup_cosine
from quantlib.solvers.trainable import TrainableUniformLinear
from quantlib.stats import capture
from quantlib.stats.capture import Stream
from quantlib.stats.streamed import BlockChain, final_states


def _swap(model, name: str, module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _norm_gains(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(f"{n}.weight", m.weight) for n, m in model.named_modules()
            if "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), torch.nn.Parameter)]


def _precision(bf16: bool, device: str) -> Callable:
    """The forward passes' precision (a factory of contexts): float32, or bfloat16 autocast where the device has
    bfloat16 arithmetic."""
    if not bf16:
        return contextlib.nullcontext
    if not str(device).startswith("cuda") or not torch.cuda.is_available() or not torch.cuda.is_bf16_supported():
        raise ConfigError(f"distillation option bf16 needs a CUDA GPU with bfloat16 support, and this job runs on "
                          f"'{device}' (bfloat16 matrix products on a CPU run about 100x slower than float32); drop "
                          "`bf16` from the .kd part, or run the job with compute.device: cuda")
    return partial(torch.autocast, "cuda", dtype=torch.bfloat16)


def teacher_targets(teacher, tokens: torch.Tensor, device, streams: str, folder: Path | None) -> Stream:
    """The FP model's final hidden states (after its last norm) of every window, one window at a time, from one
    streamed forward of `teacher` (a LazyModel): kept in a stream (memory or disk) on the CPU."""
    access = BlockAccess(teacher.model, lazy=teacher)
    blocks = teacher.blocks
    targets = Stream(streams, folder, "cpu")
    with torch.no_grad():
        with access.outer(device):
            states = capture.block_inputs(teacher.model, blocks, tokens, 1, device)
        with BlockChain(access, [kw for _, kw in states], device, streams, folder) as chain:
            final = chain.forward([h for h, _ in states], len(blocks), keep=False)
            del states
            with access.outer(device), final_states(blocks, chain.tuple_output) as feed:
                for w in range(len(tokens)):
                    feed(final[w])
                    out = teacher.model.base_model(tokens[w:w + 1].to(device), use_cache=False).last_hidden_state
                    targets.append(out.cpu())
            final.drop()
    return targets


class Student:
    """The quantized model being distilled (a LazyModel of its checkpoint), read block by block: the trainable scales,
    zero points (`train_zero`) and norm gains (`train_norm`) are resident Parameters; each block's representations
    are read once and kept (`streams`: in memory, or in `folder`); `install(i, block)` builds block i's trainable
    linears around the resident trainables while the block is in use."""

    def __init__(self, lazy, train_zero: bool, train_norm: bool, device, streams: str, folder: Path | None):
        self.lazy, self.device, self.train_zero = lazy, device, train_zero
        self.streams, self.folder = streams, folder
        self.access = BlockAccess(lazy.model, lazy=lazy, quantized_weights=False)
        self.prefixes = [f"{lazy.prefix}.{i}." for i in range(len(lazy))]
        self.layers = [[layer for layer in lazy.quantized if layer.startswith(p)] for p in self.prefixes]
        self.scale: dict[str, torch.nn.Parameter] = {}
        self.zero: dict[str, torch.nn.Parameter] = {}
        self.gains: dict[str, torch.nn.Parameter] = {}  # parameter name -> trainable norm gain
        self._reps: list = []
        lazy.model.requires_grad_(False)
        lazy.load_outer(head=False, device=device)  # the embeddings and the final norm, for the whole training
        norms = [name for name, _ in _norm_gains(lazy.model)] if train_norm else []
        for i, pre in enumerate(self.prefixes):
            block = self.access.open(i, device)
            reps = lazy.representations(self.layers[i])
            for layer, rep in reps.items():
                m = TrainableUniformLinear(rep, None, train_zero).to(device)
                self.scale[layer] = m.scale
                if m.zero is not None:
                    self.zero[layer] = m.zero
            for name in norms:
                if name.startswith(pre):
                    self.gains[name] = torch.nn.Parameter(block.get_parameter(name[len(pre):]).detach().clone())
            self._keep(i, reps)
            self.access.close(i, block)
        for name in norms:
            if name not in self.gains:  # outside the blocks (the final norm): the loaded outer's own parameter
                self.gains[name] = lazy.model.get_parameter(name).requires_grad_(True)
        self.gains = {name: self.gains[name] for name in norms}  # the model's order

    def _keep(self, i: int, reps: dict) -> None:
        if self.streams == "disk":
            path = self.folder / f"reps{i:05d}.pt"
            torch.save(reps, path)
            self._reps.append(path)
        else:
            self._reps.append(reps)

    def representations(self, i: int) -> dict:
        """Block i's stored representations, as read from the checkpoint."""
        item = self._reps[i]
        return torch.load(item, weights_only=False) if self.streams == "disk" else item  # our own temporary file

    def parameters(self) -> list[torch.nn.Parameter]:
        """What trains, in the order the in-memory distillation used: scales and zeros layer by layer, then gains."""
        layers = [layer for group in self.layers for layer in group]
        return [p for layer in layers for p in (self.scale[layer], self.zero.get(layer)) if p is not None] + \
            list(self.gains.values())

    @contextlib.contextmanager
    def install(self, i: int, block):
        """Block i's quantized linears swapped for trainable ones on the resident trainables, its norm gains for
        the resident gains; yields {layer: trainable module}; the block is put back as it was on leaving."""
        pre, reps = self.prefixes[i], self.representations(i)
        swapped, gains = [], []
        try:
            for layer in self.layers[i]:
                name = layer[len(pre):]
                lin = block.get_submodule(name)
                m = TrainableUniformLinear(reps[layer], None if lin.bias is None else lin.bias.detach(),
                                           self.train_zero, self.scale[layer], self.zero.get(layer)).to(self.device)
                _swap(block, name, m)
                swapped.append((name, lin, layer, m))
            for full, p in self.gains.items():
                if full.startswith(pre):
                    owner, _, key = full[len(pre):].rpartition(".")
                    module = block.get_submodule(owner)
                    gains.append((module, key, module._parameters[key]))
                    module._parameters[key] = p
            yield {layer: m for _, _, layer, m in swapped}
        finally:
            for name, lin, _, _ in swapped:
                _swap(block, name, lin)
            for module, key, original in gains:
                module._parameters[key] = original

    def export(self, i: int, block) -> dict:
        """{layer: trained representation} of block i; the trained norm gains copied into `block`."""
        with self.install(i, block) as modules:
            reps = {layer: m.representation() for layer, m in modules.items()}
        pre = self.prefixes[i]
        for full, p in self.gains.items():
            if full.startswith(pre):
                block.get_parameter(full[len(pre):]).data.copy_(p.detach())
        return reps

    def outer_state(self) -> dict:
        """The tensors outside the blocks as the checkpoint stores them, with the trained gains (the final norm).
        The outer is released first: loaded, a tied head is the embedding itself, which `LazyModel.outer_names`
        would then leave out as the head."""
        self.lazy.release_outer()
        state = self.lazy.outer_state()
        for full, p in self.gains.items():
            if full in state:
                state[full] = p.detach().to(device="cpu", dtype=state[full].dtype)
        return state


def distill(student, teacher, tokens: torch.Tensor, spec, seed: int = 0, device: str = "cpu",
            max_steps: int | None = None, progress_every: int = 8, streams: str = "memory",
            on_block: Callable | None = None, resume=None) -> tuple[dict, dict]:
    """Train the quantized model `student` against `teacher` (LazyModels of the base checkpoint and of the FP model;
    see the module's docstring). Then, block by block, `on_block(i, block, reps)` gets block i (its trained norm
    gains in place, its quantized layers' weights on the meta device) and {layer: trained representation}. Returns
    (the tensors outside the blocks as the checkpoint stores them, with the trained gains; diagnostics). `resume`
    (a `quantlib.stats.progress.StepProgress`, made by the job) keeps the training's state every few steps, and a
    job started again goes on after the last step saved (`quantlib.runner.training.train`)."""
    d = spec.distill
    precision = _precision(d.opt("bf16"), device)
    s_cfg, t_cfg = student.model.config, teacher.model.config
    if s_cfg.model_type != t_cfg.model_type or s_cfg.hidden_size != t_cfg.hidden_size:
        raise ConfigError("the teacher must be the quantized model's own unquantized model (model type and hidden "
                          f"size differ: {s_cfg.model_type}/{s_cfg.hidden_size} against "
                          f"{t_cfg.model_type}/{t_cfg.hidden_size})")
    t0 = time.time()
    n = len(tokens)
    folder = Path(tempfile.mkdtemp(prefix="quantlib-distill-")) if streams == "disk" else None
    try:
        targets = teacher_targets(teacher, tokens, device, streams, folder)  # once
        st = Student(student, d.opt("train_zero"), d.opt("train_norm"), device, streams, folder)
        model, blocks = student.model, student.blocks

        def loss_of(idx: list[int]) -> torch.Tensor:
            ids = tokens[idx].to(device)
            with torch.no_grad():
                (h, kw), = capture.block_inputs(model, blocks, ids, len(idx), device)
            with BlockChain(st.access, [kw], device, streams, folder, precision) as chain:
                final = chain.forward([h], len(blocks), install=st.install)
                x = final[0].detach().requires_grad_(True)
                final.drop()
                with final_states(blocks, chain.tuple_output) as feed, precision():
                    feed(x)
                    out = model.base_model(ids, use_cache=False).last_hidden_state
                loss = F.mse_loss(out.float(), torch.cat([targets[j] for j in idx]).to(device))
                loss.backward()
                chain.backward([x.grad], install=st.install)
            return loss.detach()

        def check(step: int) -> None:
            for layer, scale in st.scale.items():
                if not bool((scale > 0).all()):
                    raise NumericalError(f"a scale of layer '{layer}' reached {float(scale.detach().min()):.3g} at "
                                         f"step {step}; lower the learning rate (option lr)")

        def adamw(ps) -> torch.optim.Optimizer:
            return torch.optim.AdamW(ps, lr=d.opt("lr"), betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)

        history = train(st.parameters(), adamw, warmup_cosine, loss_of, n, d.opt("epochs"), d.opt("batch"),
                        torch.Generator().manual_seed(seed), "distill", clip=1.0, max_steps=max_steps, check=check,
                        progress_every=progress_every, backward=False, resume=resume)
        train_seconds = time.time() - t0
        for i in range(len(blocks)):
            block = st.access.open(i, device)
            reps = st.export(i, block)
            if on_block is not None:
                on_block(i, block, reps)
            st.access.close(i, block)
        outer = st.outer_state()
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    diagnostics = {"base": spec.base().short_name(), "steps": history.steps,
                   "loss": [round(x, 8) for x in history.losses], "lr": [float(f"{x:.6g}") for x in history.lrs],
                   "seconds": round(train_seconds, 2),
                   "trained": {"scales_and_zeros" if d.opt("train_zero") else "scales": len(st.scale),
                               "norm_gains": len(st.gains)},
                   "dtype": "bfloat16 autocast" if d.opt("bf16") else "float32", "windows": n, "seed": seed,
                   "streams": streams}
    return outer, diagnostics
