"""UniQuanF (Park et al., ACL 2025, "Unifying Uniform and Binary-coding Quantization for Accurate Compression of
Large Language Models"): FlexRound's learnable division followed by binary-coding levels, trained block by block by
the core's block mode.

Unified initialisation per (row, group): s = (max - min) / Q (at least 1e-8), a real zero point z = -min / s, and
alpha from ALTERNATING (no offset) on u = W / s + z - Q / 2; `clip{G}` also tries s * i / G, i = 1..G, keeping the
least mean |w - w_hat|^2.4. Trainable: d1 (log s per (row, group)), d2 (per weight), d3 (per row), alpha. Forward:

    u = W / e^(d1 + d2 + d3) + z - Q/2,   q = sum_i alpha_i beta_i(c),   W_hat = e^d1 (q + Q/2 - z)

where c is each weight's level index (Cartesian sign order): the nearest level at the start, then every `p`
steps the best of c - 1, c, c + 1 (the released code's local remapping; the full search never materialises
weights x 2^b). Gradients reach u (as 1) and alpha (through q) only where |u - q| <= min_i alpha_i. After training,
one last remapping, then alpha' = e^d1 alpha and offsets e^d1 (Q/2 - z) in float16 (the `bcq` format); the weight
is recomputed from the stored values.
"""

from __future__ import annotations

import torch

from quantlib.formats.bcq import BcqQuantized, levels, signs_of
from quantlib.solvers.alternating import fit, nearest_level
from quantlib.solvers.contract import LayerTask, SolveResult
from quantlib.solvers.trainable import FakeQuantLinear, LearnedDivision, LevelsScaled, grouped


def _gather(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Each weight's level value: table (d_out, n_groups, 2^b) of levels per (row, group), index (d_out, d_in) with
    contiguous groups. A gather from the small table, so the backward pass scatters into (d_out, n_groups, 2^b)
    instead of building (d_out, d_in, b) tensors every step."""
    d_out, n_groups, _ = table.shape
    return table.gather(2, index.reshape(d_out, n_groups, -1)).reshape(index.shape)


class UniQuanFLinear(FakeQuantLinear):
    def __init__(self, linear: torch.nn.Linear, task: LayerTask):
        super().__init__(linear)
        spec = task.spec
        self.bits, self.group_size = spec.bits, spec.group_size
        self.Q = 2 ** spec.bits - 1
        self.period = spec.opt("remap_period")
        d_out, d_in = self.weight_fp.shape
        gs = d_in if spec.group_size == -1 else spec.group_size
        G = self.weight_fp.reshape(-1, gs)  # one row per (row, group)
        lo, hi = G.amin(-1), G.amax(-1)
        s0 = ((hi - lo) / self.Q).clamp_min(1e-8)
        best = None
        for i in range(1, spec.opt("clip_grid") + 1):
            s = s0 * i / spec.opt("clip_grid")
            z = -lo / s
            u = G / s.unsqueeze(1) + z.unsqueeze(1) - self.Q / 2
            alphas, index, _ = fit(u, spec.bits, spec.opt("alternations"), offset=False)
            w_hat = s.unsqueeze(1) * (levels(alphas).gather(1, index) + self.Q / 2 - z.unsqueeze(1))
            err = (G - w_hat).abs().pow(2.4).mean(-1)
            if best is None:
                best = [s, z, alphas, err]
            else:
                better = err < best[3]
                best = [torch.where(better, s, best[0]), torch.where(better, z, best[1]),
                        torch.where(better.unsqueeze(1), alphas, best[2]), torch.minimum(err, best[3])]
        s, z, alphas, _ = best
        n_groups = d_in // gs
        self.register_buffer("zero", z.reshape(d_out, n_groups))
        self.d1 = torch.nn.Parameter(s.log().reshape(d_out, n_groups))
        self.d2 = torch.nn.Parameter(torch.zeros_like(self.weight_fp))
        # On the weight's device: `_u()` below runs before the runner moves the module (a CUDA block's weight).
        self.d3 = torch.nn.Parameter(torch.zeros(d_out, 1, device=self.weight_fp.device))
        self.alpha = torch.nn.Parameter(alphas.reshape(d_out, n_groups, spec.bits))
        self.register_buffer("index", torch.zeros(d_out, d_in, dtype=torch.long, device=self.weight_fp.device))
        # Each weight starts on its nearest level (the block error before training is the init's); training then
        # remaps locally every `p` steps.
        self.remap(self._u().detach(), nearest=True)
        self.steps = 0

    def _u(self) -> torch.Tensor:
        """W / e^(d1 + d2 + d3) + z - Q/2, (d_out, d_in)."""
        u = (LearnedDivision.apply(self.weight_fp, self.d1, self.d2, self.d3) + self.zero[:, :, None]).sub_(self.Q / 2)
        return u.view(self.weight_fp.shape)

    @torch.no_grad()
    def remap(self, u: torch.Tensor, nearest: bool) -> None:
        """Each weight's level: the nearest (a search over sorted levels), or the best of its index neighbours."""
        d_out, d_in = u.shape
        n_groups = self.alpha.shape[1]
        if nearest:
            x = u.reshape(d_out * n_groups, -1)
            self.index.copy_(nearest_level(x, self.alpha.detach().reshape(-1, self.bits)).reshape(d_out, d_in))
            return
        # The levels at c - 1, c and c + 1 (clamped to the table) gathered with the same index from three shifted
        # copies of the small table: no candidate index tensors. Ties keep c, then c - 1 (strict comparisons, in the
        # order c, c - 1, c + 1).
        table = self._levels().detach()
        last = 2 ** self.bits - 1
        below = torch.cat([table[..., :1], table[..., :last]], dim=-1)
        above = torch.cat([table[..., 1:], table[..., last:]], dim=-1)
        err = (u - _gather(table, self.index)).abs_()
        err_below = (u - _gather(below, self.index)).abs_()
        err_above = (u - _gather(above, self.index)).abs_()
        down = err_below < err
        up = err_above < torch.where(down, err_below, err)
        self.index.add_(up.to(torch.int8).sub_((down & ~up).to(torch.int8)))  # one-byte steps, no int64 temporaries

    def _levels(self) -> torch.Tensor:
        """The 2^b levels of every (row, group), (d_out, n_groups, 2^b), differentiable in alpha."""
        return levels(self.alpha)

    def weight_hat(self) -> torch.Tensor:
        u = self._u()
        if torch.is_grad_enabled():  # a training step (the error evaluations run without gradients)
            if self.steps and self.steps % self.period == 0:
                self.remap(u.detach(), nearest=False)
            self.steps += 1
        # Gradients to u (as 1) and to alpha (through q) only where u lies within the smallest alpha of its level.
        return LevelsScaled.apply(grouped(u, self.d1.shape[1]), self.d1, self._levels(), self.index, self.zero,
                                  self.Q / 2, self.alpha.detach().abs().amin(-1))

    def param_groups(self, spec) -> list[dict]:
        return [{"params": [self.d1, self.d2, self.d3], "lr": spec.opt("lr")},
                {"params": [self.alpha], "lr": spec.opt("alpha_lr")}]

    def freeze(self) -> SolveResult:
        with torch.no_grad():
            if self.steps:
                self.remap(self._u(), nearest=False)
            scale = torch.exp(self.d1)
            rep = BcqQuantized(signs_of(self.index, self.bits), (scale.unsqueeze(-1) * self.alpha).half(),
                               (scale * (self.Q / 2 - self.zero)).half(), self.group_size)
        return SolveResult(rep, rep.dequantize(), {"training_steps": self.steps})


def wrap(linear: torch.nn.Linear, task: LayerTask) -> UniQuanFLinear:
    return UniQuanFLinear(linear, task)
