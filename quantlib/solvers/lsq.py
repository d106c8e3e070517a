"""LSQ-style learned scales, trained block-wise: the smallest block-wise method, and the template for others.

Each linear of a block starts from the spec's init (min-max, or NeUQI's inits, which then need a Hessian) and trains
one log-scale per (row, group), the zero point fixed, with straight-through rounding (LSQ, Esser et al. 2020,
"Learned Step Size Quantization"), on the output error of the whole block (BRECQ, Li et al. 2021). Everything
else, from the activation streams to the optimiser, is the core's block mode (`quantlib.runner.blockwise`).
"""

from __future__ import annotations

import torch

from quantlib.solvers.contract import LayerTask, SolveResult
from quantlib.solvers.trainable import LearnedDivision, RoundedScaled, UniformFakeQuant


class LearnedScaleLinear(UniformFakeQuant):
    def __init__(self, linear: torch.nn.Linear, task: LayerTask):
        super().__init__(linear, task)
        self.log_scale = torch.nn.Parameter(self.scale_init.log())

    def _divided(self) -> torch.Tensor:
        """W / e^log_scale + z, (d_out, groups, group size)."""
        return LearnedDivision.apply(self.weight_fp, self.log_scale) + self.zero[:, :, None]

    def weight_hat(self) -> torch.Tensor:
        return RoundedScaled.apply(self._divided(), self.log_scale, self.zero, 2 ** self.bits - 1)

    def param_groups(self, spec) -> list[dict]:
        return [{"params": [self.log_scale], "lr": spec.opt("lr")}]

    def freeze(self) -> SolveResult:
        with torch.no_grad():
            scale = self.log_scale.exp()
            moved = float((self.log_scale - self.scale_init.log()).abs().mean())
            codes = torch.clamp(torch.round(self._divided()), 0, 2 ** self.bits - 1)
            return self.frozen(scale, codes.view(self.out_features, self.in_features),
                               {"mean_abs_log_scale_change": moved})


def wrap(linear: torch.nn.Linear, task: LayerTask) -> LearnedScaleLinear:
    return LearnedScaleLinear(linear, task)
