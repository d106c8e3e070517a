"""Trainable fake-quant modules: the stand-ins for a block's linear layers while block-wise reconstruction trains
their quantizers (`FakeQuantLinear` and its uniform base, subclassed by each block-wise solver), and a quantized
linear whose scales and zero points train with its codes fixed (distillation, `TrainableUniformLinear`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantlib.formats.outliers import OutlierQuantized
from quantlib.formats.uniform import UniformGrid, UniformQuantized, group_index
from quantlib.solvers.contract import SolveResult


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass, the identity in the backward pass (straight-through estimator)."""
    return (torch.round(x) - x).detach() + x


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
        self.register_buffer("columns", group_index(self.in_features, grid.group_size))
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
