"""Lightweight distillation after quantization (NeUQI, Lin et al. 2025, section 4): the quantized model's integer
codes stay fixed while every (row, group) scale and zero point of its quantized linears and every norm gain train
to bring the model's final hidden states (after the last norm, before the LM head) to the unquantized model's,
mean squared error over all elements. AdamW (betas 0.9 / 0.95, no weight decay), 10 % linear warm-up then cosine to
0, batches of windows in a seeded order, the gradient norm clipped at 1; float32, or with `bf16` the forward passes
in bfloat16 autocast on a GPU as the reference trains (the teacher's targets stay float32).
The result is a checkpoint in the base's format: the same codes, the trained scales, zeros and norm gains.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from quantlib.errors import ConfigError, NumericalError
from quantlib.runner.training import train, warmup_cosine
from quantlib.solvers.trainable import TrainableUniformLinear


def _swap(model, name: str, module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _norm_gains(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(f"{n}.weight", m.weight) for n, m in model.named_modules()
            if "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), torch.nn.Parameter)]


def _precision(bf16: bool, device: str):
    """The forward passes' precision: float32, or bfloat16 autocast where the device has bfloat16 arithmetic."""
    if not bf16:
        return contextlib.nullcontext()
    if not str(device).startswith("cuda") or not torch.cuda.is_available() or not torch.cuda.is_bf16_supported():
        raise ConfigError(f"distillation option bf16 needs a CUDA GPU with bfloat16 support, and this job runs on "
                          f"'{device}' (bfloat16 matrix products on a CPU run about 100x slower than float32); drop "
                          "`bf16` from the .kd part, or run the job with compute.device: cuda")
    return torch.autocast("cuda", dtype=torch.bfloat16)


def distill(student, reps: dict, teacher, tokens: torch.Tensor, spec, seed: int = 0, device: str = "cpu",
            max_steps: int | None = None, progress_every: int = 8) -> tuple[dict, dict]:
    """Train `student` (quantized, its layers' representations `reps`) against `teacher` in place. Returns (new
    representations, diagnostics)."""
    d = spec.distill
    precision = _precision(d.opt("bf16"), device)
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

    def loss_of(idx: list[int]) -> torch.Tensor:
        with precision:
            out = body(tokens[idx].to(device), use_cache=False).last_hidden_state
        return F.mse_loss(out.float(), targets[idx].to(device))

    def check(step: int) -> None:
        for name, m in modules.items():
            if not bool((m.scale > 0).all()):
                raise NumericalError(f"a scale of layer '{name}' reached {float(m.scale.detach().min()):.3g} at step "
                                     f"{step}; lower the learning rate (option lr)")

    def adamw(ps) -> torch.optim.Optimizer:
        return torch.optim.AdamW(ps, lr=d.opt("lr"), betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)

    t0 = time.time()
    history = train(params, adamw, warmup_cosine, loss_of, n, epochs, batch, torch.Generator().manual_seed(seed),
                    "distill", clip=1.0, max_steps=max_steps, check=check, progress_every=progress_every)
    new_reps = {}
    for name, m in modules.items():
        new_reps[name] = m.representation()
        lin = originals[name]
        lin.weight.data.copy_(new_reps[name].dequantize().to(lin.weight.dtype))
        _swap(student, name, lin)
    student.requires_grad_(False)
    diagnostics = {"base": spec.base().short_name(), "steps": history.steps,
                   "loss": [round(x, 8) for x in history.losses], "lr": [float(f"{x:.6g}") for x in history.lrs],
                   "seconds": round(time.time() - t0, 2),
                   "trained": {"scales_and_zeros" if d.opt("train_zero") else "scales": len(modules),
                               "norm_gains": len(_norm_gains(student)) if d.opt("train_norm") else 0},
                   "dtype": "bfloat16 autocast" if d.opt("bf16") else "float32", "windows": n, "seed": seed}
    return new_reps, diagnostics
