"""FlexRound (Lee et al. 2023, "FlexRound: Learnable Rounding based on Element-wise Division for Post-Training
Quantization"), trained block by block by the core's block mode with UniQuanF's training settings.

From the spec's init (min-max, or NeUQI's: any uniform init composes): a trainable log-scale d1 per (row, group),
and d2 per weight and d3 per row, both starting at 0; the zero point stays. The division that decides the rounding
is element-wise, the grid is not:

    W_hat = e^d1 (clamp(round(W / e^(d1 + d2 + d3) + z), 0, Q) - z),   straight-through rounding

so the result is stored in the uniform format with scale e^d1. With zero steps it is RTN on the init's grid.
"""

from __future__ import annotations

import torch

from quantlib.solvers.contract import LayerTask, SolveResult
from quantlib.solvers.trainable import LearnedDivision, RoundedScaled, UniformFakeQuant


class FlexRoundLinear(UniformFakeQuant):
    def __init__(self, linear: torch.nn.Linear, task: LayerTask):
        super().__init__(linear, task)
        self.d1 = torch.nn.Parameter(self.scale_init.log())
        self.d2 = torch.nn.Parameter(torch.zeros_like(self.weight_fp))
        self.d3 = torch.nn.Parameter(torch.zeros(self.out_features, 1, device=self.weight_fp.device))

    def _divided(self) -> torch.Tensor:
        """W / e^(d1 + d2 + d3) + z, (d_out, groups, group size)."""
        return LearnedDivision.apply(self.weight_fp, self.d1, self.d2, self.d3) + self.zero[:, :, None]

    def weight_hat(self) -> torch.Tensor:
        return RoundedScaled.apply(self._divided(), self.d1, self.zero, 2 ** self.bits - 1)

    def param_groups(self, spec) -> list[dict]:
        return [{"params": [self.d1, self.d2, self.d3], "lr": spec.opt("lr")}]

    def freeze(self) -> SolveResult:
        with torch.no_grad():
            codes = torch.clamp(torch.round(self._divided()), 0, 2 ** self.bits - 1)
            return self.frozen(torch.exp(self.d1), codes.view(self.out_features, self.in_features))


def wrap(linear: torch.nn.Linear, task: LayerTask) -> FlexRoundLinear:
    return FlexRoundLinear(linear, task)
