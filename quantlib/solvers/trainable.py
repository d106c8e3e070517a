"""Trainable fake-quant modules: the stand-ins for a block's linear layers while block-wise reconstruction trains
their quantizers (`FakeQuantLinear` and its uniform base, subclassed by each block-wise solver), and a quantized
linear whose scales and zero points train with its codes fixed (distillation, `TrainableUniformLinear`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantlib.formats.outliers import OutlierQuantized
from quantlib.formats.uniform import UniformGrid, UniformQuantized
from quantlib.solvers.contract import SolveResult


def grouped(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(d_out, d_in) as (d_out, groups, d_in / groups): a view, each group's columns contiguous (`group_index`)."""
    return t.view(t.shape[0], groups, -1)


# The quantizers of FlexRound and UniQuanF as autograd functions with hand-written backward passes. Their plain
# expressions gather each (row, group)'s parameters per column (`d1[:, columns]`), and autograd scatters the gradients
# back (index_put): about a third of a block's training step, more than its attention. Here the parameters broadcast
# over (d_out, groups, group size) views and each backward is one pass; the forward values are the plain expressions'
# bit for bit (same operations in the same order), the gradients equal to float round-off (tests/solvers).


class LearnedDivision(torch.autograd.Function):
    """W / e^(d1 + d2 + d3) of FlexRound and UniQuanF (W / e^d1 of LSQ: d2, d3 None), as (d_out, groups, group
    size): d1 (d_out, groups) per (row, group), d2 per weight, d3 (d_out, 1) per row; W gets no gradient."""

    @staticmethod
    def forward(ctx, weight, d1, d2=None, d3=None):
        groups = d1.shape[1]
        if d2 is None:  # one exponent per (row, group): e^d1 on the small tensor
            exponent = (d1 if d3 is None else d1 + d3)[:, :, None]
            divided = grouped(weight, groups) / torch.exp(exponent)
        else:  # one full-size tensor, written in place (a fresh one per operation costs as much as the operation)
            exponent = d1[:, :, None] + grouped(d2, groups)
            if d3 is not None:
                exponent.add_(d3[:, :, None])
            divided = torch.div(grouped(weight, groups), exponent.exp_(), out=exponent)
        ctx.save_for_backward(divided)
        ctx.has = (d2 is not None, d3 is not None)
        return divided

    @staticmethod
    def backward(ctx, grad):
        divided, = ctx.saved_tensors
        d_exponent = torch.mul(grad, divided).neg_()  # d(W e^-D)/dD = -W e^-D, the same for d1, d2 and d3
        has_d2, has_d3 = ctx.has
        return (None, d_exponent.sum(-1), d_exponent.reshape(divided.shape[0], -1) if has_d2 else None,
                d_exponent.sum((1, 2))[:, None] if has_d3 else None)


class RoundedScaled(torch.autograd.Function):
    """e^d1 (clamp(round(r), 0, maxq) - z), r (d_out, groups, group size), returned as (d_out, d_in): rounding
    straight through, the clamp's gradient where round(r) lies in [0, maxq], d1 through the scale e^d1."""

    @staticmethod
    def forward(ctx, r, d1, zero, maxq):
        rounded = torch.round(r)
        centered = rounded.clamp(0, maxq)
        inside = centered == rounded
        del rounded
        centered.sub_(zero[:, :, None])
        scale = torch.exp(d1)
        ctx.save_for_backward(centered, inside, scale)
        return (scale[:, :, None] * centered).view(r.shape[0], -1)

    @staticmethod
    def backward(ctx, grad):
        centered, inside, scale = ctx.saved_tensors
        g = grad.view(centered.shape)
        d_r = (g * scale[:, :, None]).masked_fill_(~inside, 0.0)
        return d_r, (g * centered).sum(-1) * scale, None, None


class LevelsScaled(torch.autograd.Function):
    """UniQuanF's e^d1 (q + Q/2 - z) with q = table[index] each weight's binary-coding level (table (d_out, groups,
    2^b), differentiable in alpha upstream), returned as (d_out, d_in). Gradients reach u (as 1) and the table (through
    q) only where |u - q| <= the smallest alpha of the weight's (row, group), `alpha_min` (d_out, groups)."""

    @staticmethod
    def forward(ctx, u, d1, table, index, zero, half, alpha_min):
        index = index.view(u.shape)
        q = table.gather(2, index)
        outside = (u - q).abs_() > alpha_min[:, :, None]  # no gradient there
        centered = q.add_(half).sub_(zero[:, :, None])  # q + Q/2 - z, in q's own memory
        scale = torch.exp(d1)
        ctx.save_for_backward(centered, outside, scale, index)
        ctx.table_shape = table.shape
        return (scale[:, :, None] * centered).view(u.shape[0], -1)

    @staticmethod
    def backward(ctx, grad):
        centered, outside, scale, index = ctx.saved_tensors
        g = grad.view(centered.shape)
        d_u = (g * scale[:, :, None]).masked_fill_(outside, 0.0)
        d_table = torch.zeros(ctx.table_shape, dtype=d_u.dtype, device=d_u.device).scatter_add_(2, index, d_u)
        return d_u, (g * centered).sum(-1) * scale, d_table, None, None, None, None


class FakeQuantLinear(torch.nn.Module):
    """A trainable stand-in for a linear layer during block-wise reconstruction. Subclasses hold their quantizer's
    parameters as `torch.nn.Parameter`s and define `weight_hat()` (differentiable), `param_groups(spec)` (for the
    optimiser: [{"params": [...], "lr": ...}]) and `freeze() -> SolveResult` (the stored representation and its
    dequantized weight). The original weight is a buffer (`weight_fp`, float32) and the bias stays frozen."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_fp", linear.weight.detach().float().clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def weight_hat(self) -> torch.Tensor:
        raise NotImplementedError

    def param_groups(self, spec) -> list[dict]:
        raise NotImplementedError

    def freeze(self) -> SolveResult:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_hat().to(x.dtype), self.bias)


class UniformFakeQuant(FakeQuantLinear):
    """A trainable stand-in on the spec's uniform grid: the init's grid (`task.init_grid`), its zero points fixed,
    each column's group; `frozen(scale, codes)` stores the result in the uniform format."""

    def __init__(self, linear: torch.nn.Linear, task):
        super().__init__(linear)
        grid = task.init_grid(self.weight_fp)
        self.bits, self.group_size = grid.bits, grid.group_size
        self.register_buffer("zero", grid.zero.float().clone())
        self.register_buffer("scale_init", grid.scale.float().clone())

    def frozen(self, scale: torch.Tensor, codes: torch.Tensor, stats: dict | None = None) -> SolveResult:
        grid = UniformGrid(scale.detach().clone(), self.zero.clone(), self.bits, self.group_size)
        rep = UniformQuantized(codes.detach().to(torch.uint8), grid)
        return SolveResult(rep, rep.dequantize(), stats or {})



class TrainableUniformLinear(torch.nn.Module):
    """A quantized linear with fixed codes: w = s (q - z) (+ fixed outliers), s and z trainable per (row, group).
    `scale` and `zero` (Parameters) are taken as they are when given: trainables that outlive the module (a model
    read block by block builds the module anew each time it reads the block)."""

    def __init__(self, rep, bias: torch.Tensor | None, train_zero: bool, scale: torch.nn.Parameter | None = None,
                 zero: torch.nn.Parameter | None = None):
        super().__init__()
        self.outliers = rep.outliers if isinstance(rep, OutlierQuantized) else None
        base = rep.base if isinstance(rep, OutlierQuantized) else rep
        self.bits, self.group_size = base.grid.bits, base.grid.group_size
        self.register_buffer("codes", base.codes)  # uint8: promoted to float inside the weight's one expression
        self.scale = scale if scale is not None else torch.nn.Parameter(base.grid.scale.float().clone())
        fixed = base.grid.zero.float().clone()
        self.zero = (zero if zero is not None else torch.nn.Parameter(fixed)) if train_zero else None
        if not train_zero:
            self.register_buffer("zero_fixed", fixed)
        self.register_buffer("dense_outliers", None if self.outliers is None else self.outliers.dense())
        self.register_buffer("bias", bias)

    def weight_now(self) -> torch.Tensor:
        """s (q - z), each (row, group)'s s and z broadcast over the group's columns (no gather: as costly as the
        layer's product otherwise, and the distillation forms the weight twice per step)."""
        zero = self.zero if self.zero is not None else self.zero_fixed
        d_out, d_in = self.codes.shape
        groups = self.scale.shape[1]
        q = self.codes.view(d_out, groups, d_in // groups)
        w = (self.scale[:, :, None] * (q - zero[:, :, None])).view(d_out, d_in)
        return w if self.dense_outliers is None else w + self.dense_outliers

    def forward(self, x):
        return F.linear(x, self.weight_now().to(x.dtype), self.bias)

    def representation(self):
        zero = self.zero if self.zero is not None else self.zero_fixed
        grid = UniformGrid(self.scale.detach().clone(), zero.detach().clone(), self.bits, self.group_size)
        base = UniformQuantized(self.codes.to(torch.uint8), grid)
        return base if self.outliers is None else OutlierQuantized(base, self.outliers)
