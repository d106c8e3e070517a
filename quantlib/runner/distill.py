"""Lightweight distillation after quantization (NeUQI, Lin et al. 2025, section 4): the quantized model's integer
codes stay fixed while every (row, group) scale and zero point of its quantized linears and every norm gain train
to bring the model's final hidden states (after the last norm, before the LM head) to the unquantized model's,
mean squared error over all elements. AdamW (betas 0.9 / 0.95, no weight decay), 10 % linear warm-up then cosine to
0, batches of windows in a seeded order, the gradient norm clipped at 1; float32 (the reference trains in bf16).
The result is a checkpoint in the base's format: the same codes, the trained scales, zeros and norm gains.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F

from quantlib.errors import ConfigError, NumericalError
from quantlib.solvers.trainable import TrainableUniformLinear

log = logging.getLogger("quantlib")


def _swap(model, name: str, module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _norm_gains(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(f"{n}.weight", m.weight) for n, m in model.named_modules()
            if "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), torch.nn.Parameter)]


def schedule(step: int, total: int) -> float:
    """The learning rate's factor: 10 % linear warm-up, then cosine to 0."""
    warm = max(1, math.ceil(0.1 * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def distill(student, reps: dict, teacher, tokens: torch.Tensor, spec, seed: int = 0, device: str = "cpu",
            max_steps: int | None = None, progress_every: int = 8) -> tuple[dict, dict]:
    """Train `student` (quantized, its layers' representations `reps`) against `teacher` in place. Returns (new
    representations, diagnostics)."""
    d = spec.distill
    if student.config.model_type != teacher.config.model_type or \
            student.config.hidden_size != teacher.config.hidden_size:
        raise ConfigError("the teacher must be the quantized model's own unquantized model (model type and hidden "
                          f"size differ: {student.config.model_type}/{student.config.hidden_size} against "
                          f"{teacher.config.model_type}/{teacher.config.hidden_size})")
    student.to(device).requires_grad_(False)
    teacher.to(device).requires_grad_(False)
    originals = {name: student.get_submodule(name) for name in reps}
    modules = {}
    for name, rep in reps.items():
        lin = originals[name]
        modules[name] = TrainableUniformLinear(rep, None if lin.bias is None else lin.bias.detach(),
                                               d.opt("train_zero")).to(device)
        _swap(student, name, modules[name])
    params = [p for m in modules.values() for p in (m.scale, m.zero) if p is not None]
    if d.opt("train_norm"):
        for _, gain in _norm_gains(student):
            gain.requires_grad_(True)
            params.append(gain)
    body, target_body = student.base_model, teacher.base_model
    n = len(tokens)
    with torch.no_grad():  # the teacher's targets, once
        targets = torch.cat([target_body(tokens[i:i + 1].to(device), use_cache=False).last_hidden_state.cpu()
                             for i in range(n)])
    batch, epochs = d.opt("batch"), d.opt("epochs")
    total = epochs * math.ceil(n / batch) if max_steps is None else max_steps
    optimiser = torch.optim.AdamW(params, lr=d.opt("lr"), betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: schedule(s, total))
    generator = torch.Generator().manual_seed(seed)
    losses, lrs, step, t0 = [], [], 0, time.time()
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator).tolist()
            for b0 in range(0, n, batch):
                if step >= total:
                    break
                idx = order[b0:b0 + batch]
                x = tokens[idx].to(device)
                out = body(x, use_cache=False).last_hidden_state
                loss = F.mse_loss(out, targets[idx].to(device))
                if not torch.isfinite(loss):
                    raise NumericalError(f"distillation loss is {float(loss)} at step {step + 1}; lower the "
                                         "learning rate (option lr)")
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                lrs.append(optimiser.param_groups[0]["lr"])
                optimiser.step()
                lr_schedule.step()
                losses.append(loss.item())
                step += 1
                for name, m in modules.items():
                    if not bool((m.scale > 0).all()):
                        raise NumericalError(f"a scale of layer '{name}' reached {float(m.scale.detach().min()):.3g} at step "
                                             f"{step}; lower the learning rate (option lr)")
                if step % progress_every == 0 or step == total:
                    log.info("distill: step %d/%d, loss %.5f, %.1fs", step, total, losses[-1], time.time() - t0)
    new_reps = {}
    for name, m in modules.items():
        new_reps[name] = m.representation()
        lin = originals[name]
        lin.weight.data.copy_(new_reps[name].dequantize().to(lin.weight.dtype))
        _swap(student, name, lin)
    student.requires_grad_(False)
    diagnostics = {"base": spec.base().short_name(), "steps": step, "loss": [round(x, 8) for x in losses],
                   "lr": [float(f"{x:.6g}") for x in lrs], "seconds": round(time.time() - t0, 2),
                   "trained": {"scales_and_zeros" if d.opt("train_zero") else "scales": len(modules),
                               "norm_gains": len(_norm_gains(student)) if d.opt("train_norm") else 0},
                   "dtype": "float32", "windows": n, "seed": seed}
    return new_reps, diagnostics
