"""SpinQuant (Liu et al. 2024): R1 and R2 learned on calibration windows instead of drawn at random.

Both start as QuaRot's seeded random Hadamards and are trained on the quantized model's next-token loss: the model
runs with its quantized forward in the loop (activations, KV cache, online R3/R4: `quantlib.transforms.activations`)
and, optionally, its weights fake-quantized per output channel (symmetric round-to-nearest, straight-through). The
weights are a function of the rotations (`rotation.rotated_state`), evaluated with `torch.func.functional_call`, so
the model's own parameters are untouched until the learned rotations are applied at the end.

Optimiser: SpinQuant's, SGD on the Stiefel manifold by the Cayley transform (Li, Fuxin and Todorovic 2020,
`cayley_step`): with the Euclidean gradient G of an orthogonal R, W = (R^T G - G^T R) / 2 is skew-symmetric and
R^T <- (I - a/2 W)^-1 (I + a/2 W) R^T stays exactly orthogonal (solved here, not iterated), a descent step of
a = min(lr, 1 / ||W||_1). The learning rate follows the reference's cosine schedule without warm-up,
lr (1 + cos(pi t / T)) / 2 at step t of T, and the gradients of R1 and every R2 are first scaled together to a global
norm of at most `clip` (1.0: the reference trains through transformers' Trainer, whose default `max_grad_norm` its
script keeps; benchmarks/spinquant_vs_reference.py measured gradient norms of about 20 on the offline model, so
without it every step sits at SGD-G's bound and the rotations wander ~20 times further).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace

import torch

from quantlib.catalog.contract import forward_settings
from quantlib.transforms.activations import ForwardQuant, install
from quantlib.transforms.rotation import (
    apply_rotations,
    fold_norms,
    quarot_rotations,
    rotate_down_inputs,
    rotated_state,
    rotation_params,
)

log = logging.getLogger("quantlib")


def cayley_step(R: torch.Tensor, G: torch.Tensor, lr: float) -> torch.Tensor:
    """One step of SpinQuant's optimiser (SGD-G of Li et al. 2020 without momentum, as SpinQuant trains) on an
    orthogonal R (float64) with Euclidean gradient G: the skew matrix W = (R^T G - G^T R) / 2, the step
    a = min(lr, 1 / ||W||_1) (the optimiser's own bound on the step, which the reference applies at every step), and
    R^T <- (I - a/2 W)^-1 (I + a/2 W) R^T, solved exactly where the reference iterates its fixed point. To first
    order R moves by -a (G - R G^T R) / 2: a times the Riemannian gradient."""
    W = 0.5 * (R.T @ G - G.T @ R)
    a = min(lr, 1.0 / (float(W.abs().sum(0).max()) + 1e-8))
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    return torch.linalg.solve(eye - (a / 2) * W, (eye + (a / 2) * W) @ R.T).T


def _weight_quant(W: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric round-to-nearest with a straight-through gradient."""
    top = 2 ** (bits - 1) - 1
    scale = (W.detach().abs().amax(1, keepdim=True) / top).clamp_min(1e-8)
    Wq = torch.clamp(torch.round(W / scale), -top - 1, top) * scale
    return W + (Wq - W).detach()


def cosine_lr(lr: float, step: int, steps: int) -> float:
    """The learning rate of step `step` (from 0) of `steps`: transformers' cosine schedule with no warm-up, which
    SpinQuant's training script selects (`--lr_scheduler_type cosine`)."""
    return lr * 0.5 * (1 + math.cos(math.pi * step / steps))


def learn_rotations(model, tokens: torch.Tensor, fq: ForwardQuant, iters: int, lr: float, batch: int = 1,
                    weight_bits: int | None = None, seed: int = 0, progress: bool = False, clip: float = 1.0
                    ) -> tuple[torch.Tensor, list[torch.Tensor], dict]:
    """Learn (Q1, Q2s) on `tokens` (n, seqlen). Folds the norms and applies R4's weight side to `model` in place
    (as `rotate_model` would) and leaves R1/R2 to the caller. `clip`: the largest global norm of the step's
    gradients (0: none). Returns the rotations (float64) and diagnostics (losses and gradient norms before the
    clip per step, seconds)."""
    t0 = time.time()
    fold_norms(model)
    rotate_down_inputs(model)
    install(model, replace(fq, rotated=True))
    params = rotation_params(model)
    base = {n: p.detach() for n, p in params.items()}
    block_linears = [n for n in base if ".layers." in n and n.endswith(".weight")]
    Q1, Q2s = quarot_rotations(model, seed)
    g = torch.Generator().manual_seed(seed)
    losses, grad_norms = [], []
    was_training = model.training
    model.eval()  # no dropout; gradients flow regardless
    for step in range(iters):
        R1 = Q1.float().requires_grad_()
        R2s = [Q.float().requires_grad_() for Q in Q2s]
        state = rotated_state(model, base, R1, R2s)
        if weight_bits is not None:
            for n in block_linears:
                state[n] = _weight_quant(state[n], weight_bits)
        idx = torch.randperm(len(tokens), generator=g)[:batch]  # distinct windows; batch = n: all of them
        x = tokens[idx]
        out = torch.func.functional_call(model, state, (x,), {"labels": x, "use_cache": False})
        out.loss.backward()
        losses.append(float(out.loss.detach()))
        # what transformers' Trainer does with max_grad_norm: one norm over every rotation's gradient
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_([R1, *R2s], clip if clip > 0 else float("inf"))))
        step_lr = cosine_lr(lr, step, iters)
        Q1 = cayley_step(Q1, R1.grad.double(), step_lr)
        Q2s = [cayley_step(Q, R.grad.double(), step_lr) for Q, R in zip(Q2s, R2s)]
        if progress and (step % 10 == 0 or step == iters - 1):
            log.info("spinquant step %d/%d: loss %.4f", step + 1, iters, losses[-1])
    model.train(was_training)
    return Q1, Q2s, {"losses": losses, "grad_norms": grad_norms, "seconds": round(time.time() - t0, 2)}


def apply_learned(model, Q1: torch.Tensor, Q2s: list[torch.Tensor]) -> None:
    """R1/R2 into the weights of a model whose norms are folded and R4 applied (after `learn_rotations`), one
    tensor at a time (`rotation.apply_rotations`)."""
    apply_rotations(model, Q1, Q2s)


def spinquant(model, spec, tokens=None) -> dict:
    """The `spinquant` preprocessor (catalog: quantlib.catalog.rotations): rotations learned on the calibration
    windows with the spec's quantized forward in the loop, its weights fake-quantized too when the solver is
    data-free (RTN: what the model will run with); a Hessian-based solver (GPTQ/LDLQ) corrects the weights after, so
    they stay in full precision during the training, as the reference does for GPTQ."""
    if tokens is None:
        raise ValueError("spinquant learns its rotations on calibration windows; none were given")
    fq = ForwardQuant(**forward_settings(spec))
    weight_bits = spec.bits if spec.mode == "data_free" else None
    Q1, Q2s, diag = learn_rotations(model, tokens, fq, spec.opt("spin_iters"), spec.opt("spin_lr"),
                                    spec.opt("spin_batch"), weight_bits, spec.opt("rotation_seed"), progress=True,
                                    clip=spec.opt("spin_clip"))
    apply_learned(model, Q1, Q2s)
    log.info("spinquant: %d steps in %.1fs, loss %.4f -> %.4f, gradient norm %.3g -> %.3g (clipped to %g)",
             len(diag["losses"]), diag["seconds"], diag["losses"][0], diag["losses"][-1], diag["grad_norms"][0],
             diag["grad_norms"][-1], spec.opt("spin_clip"))
    return diag
