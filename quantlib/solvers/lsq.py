"""LSQ-style learned scales, trained block-wise: the smallest block-wise method, and the template for others.

Each linear of a block starts from the spec's init (min-max, or NeUQI's inits, which then need a Hessian) and trains
one log-scale per (row, group), the zero point fixed, with straight-through rounding (LSQ, Esser et al. 2020,
"Learned Step Size Quantization"), on the output error of the whole block (BRECQ, Li et al. 2021). Everything
else, from the activation streams to the optimiser, is the core's block mode (`quantlib.blockwise`).
"""

from __future__ import annotations

import torch

from ..blockwise import FakeQuantLinear, round_ste
from ..formats.uniform import UniformGrid, UniformQuantized, group_index
from . import LayerTask, SolveResult


class LearnedScaleLinear(FakeQuantLinear):
    def __init__(self, linear: torch.nn.Linear, task: LayerTask):
        super().__init__(linear)
        grid = task.init_grid(self.weight_fp)
        self.bits, self.group_size = grid.bits, grid.group_size
        self.register_buffer("zero", grid.zero.float().clone())
        self.register_buffer("columns", group_index(self.in_features, grid.group_size))
        self.register_buffer("log_scale_init", grid.scale.float().log())
        self.log_scale = torch.nn.Parameter(self.log_scale_init.clone())

    def weight_hat(self) -> torch.Tensor:
        scale = self.log_scale.exp()[:, self.columns]
        zero = self.zero[:, self.columns]
        q = torch.clamp(round_ste(self.weight_fp / scale + zero), 0, 2 ** self.bits - 1)
        return scale * (q - zero)

    def param_groups(self, spec) -> list[dict]:
        return [{"params": [self.log_scale], "lr": spec.opt("lr")}]

    def freeze(self) -> SolveResult:
        with torch.no_grad():
            grid = UniformGrid(self.log_scale.exp().detach().clone(), self.zero.clone(), self.bits, self.group_size)
            rep = UniformQuantized(grid.quantize(self.weight_fp).to(torch.uint8), grid)
            moved = float((self.log_scale - self.log_scale_init).abs().mean())
        return SolveResult(rep, rep.dequantize(), {"mean_abs_log_scale_change": moved})


def wrap(linear: torch.nn.Linear, task: LayerTask) -> LearnedScaleLinear:
    return LearnedScaleLinear(linear, task)
