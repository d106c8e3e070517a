"""The one training loop behind block-wise reconstruction (`quantlib.runner.blockwise`) and distillation
(`quantlib.runner.distill`), so that both step, schedule, batch, check and log the same way.

The loop owns the order of every optimiser step (zero_grad, backward, optional clipping, step, schedule step), the
seeded order of the windows per epoch, batching, the step budget, the non-finite loss check, the history and,
given a job's progress (`quantlib.stats.progress.StepProgress`), keeping its state every few steps and going on
from an earlier attempt's. The caller owns what is trained and against what: its `loss_of(indices)` builds the batch,
draws anything random it needs from the same generator (after the epoch's permutation, as before) and returns the
loss.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from quantlib.errors import NumericalError

log = logging.getLogger("quantlib")


def cosine(step: int, total: int) -> float:
    """The learning rate's factor: cosine from 1 to 0 over `total` steps."""
    return 0.5 * (1 + math.cos(math.pi * step / total))


def warmup_cosine(step: int, total: int) -> float:
    """The learning rate's factor: 10 % linear warm-up, then cosine to 0."""
    warm = max(1, math.ceil(0.1 * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


@dataclass
class History:
    """What a training run leaves behind: the loss of every step and the learning rate (first group's) it used."""

    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.losses)


def train(params: Sequence, optimiser: Callable[[Sequence], torch.optim.Optimizer],
          schedule: Callable[[int, int], float], loss_of: Callable[[list[int]], torch.Tensor], n: int, epochs: int,
          batch: int, generator: torch.Generator, label: str, clip: float | None = None, max_steps: int | None = None,
          check: Callable[[int], None] | None = None, progress_every: int | None = None,
          lower: str = "the learning rate (option lr)", backward: bool = True, resume=None) -> History:
    """Train `params` (tensors or parameter groups) with `optimiser(params)` for `epochs` passes over `n` windows,
    `batch` windows per step in an order drawn from `generator` each epoch, at most `max_steps` steps (default: all
    of them); the learning rate follows `schedule(step, total)`. `clip` bounds the gradient norm, `check(step)` runs
    after every step (it raises to stop), `progress_every` steps are logged. `label` names the run in messages;
    `lower` is what to lower when the loss stops being finite. Without `backward`, `loss_of` computes the gradients
    itself (a streamed backward, `quantlib.stats.streamed`) and returns the loss detached.

    `resume` (a `quantlib.stats.progress.StepProgress`, made by the job) keeps the run's state after every few steps
    (`step_finished`) and gives back an earlier attempt's (`resume_training`): the run then goes on after its last
    saved step as if it had not stopped (same trainables, optimiser and schedule state, batch order, history)."""
    history = History()
    total = epochs * math.ceil(n / batch) if max_steps is None else max_steps
    saved = resume.resume_training(total) if resume is not None else None  # also clears foreign progress
    if total == 0:
        return history
    opt = optimiser(params)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, total))
    trained = [p for g in opt.param_groups for p in g["params"]]
    clipped = trained if clip is not None else []
    step, epoch0, pos0, order, t0 = 0, 0, 0, None, time.time()
    if saved is not None:
        tensors, extra = saved
        with torch.no_grad():
            for p, value in zip(trained, tensors["params"], strict=True):
                p.copy_(value)
        opt.load_state_dict(tensors["optimizer"])
        lr_schedule.load_state_dict(tensors["scheduler"])
        generator.set_state(tensors["generator"])
        history.losses, history.lrs = list(extra["losses"]), list(extra["lrs"])
        step, epoch0, pos0, order = len(history.losses), extra["epoch"], extra["next"], extra["order"]

    def snapshot() -> tuple[dict, dict]:
        """The state after this step (the tensors copied off the device; the optimiser's state is serialised by
        `torch.save` before the next step changes it)."""
        return ({"params": [p.detach().cpu().clone() for p in trained], "optimizer": opt.state_dict(),
                 "scheduler": lr_schedule.state_dict(), "generator": generator.get_state()},
                {"epoch": epoch, "next": b0 + batch, "order": order, "losses": history.losses, "lrs": history.lrs})

    with torch.enable_grad():
        for epoch in range(epoch0, epochs):
            if saved is None or epoch > epoch0:  # a resumed run's first epoch goes on in its saved order
                order = torch.randperm(n, generator=generator).tolist()
            for b0 in range(pos0 if saved is not None and epoch == epoch0 else 0, n, batch):
                if step >= total:
                    break
                opt.zero_grad(set_to_none=True)
                loss = loss_of(order[b0:b0 + batch])
                if not torch.isfinite(loss):
                    raise NumericalError(f"{label}: the loss is {loss.item()} at step {step + 1}; lower {lower}")
                if backward:
                    loss.backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(clipped, clip)
                history.lrs.append(opt.param_groups[0]["lr"])
                opt.step()
                lr_schedule.step()
                history.losses.append(loss.item())
                step += 1
                if check is not None:
                    check(step)
                if progress_every and (step % progress_every == 0 or step == total):
                    log.info("%s: step %d/%d, loss %.5f, %.1fs", label, step, total, history.losses[-1],
                             time.time() - t0)
                if resume is not None:
                    resume.step_finished(step, snapshot)
    return history
