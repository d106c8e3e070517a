"""QTIP (Tseng et al. 2024): incoherence processing, then BlockLDLQ with QTIP's bitshift trellis as the block's
vector quantizer (format `trellis`).

Per layer (or per stacked layer sharing an input, or per GuidedQuant row block):
1. W' = A W B^T and H' = B H B^T with random-sign Hadamard transforms (`quantlib.transforms.incoherence`); the input
   side B is shared by the stacked layers (they share H), each layer's rows get their own A, so the stored layer can
   be cut back per layer.
2. Each layer's W' is divided by its scale rms(W') / (rms(code) * `scale`) (QTIP's Wscale with scale_override, 0.9
   in its scripts), so the weights match the code's Gaussian-like values.
3. BlockLDLQ on (W', H' damped): blocks of `tile_cols` columns, each cut into tiles of `tile_rows` rows, every tile
   one trellis sequence found by tail-biting Viterbi (`quantlib.formats.trellis`), with the shared error-feedback
   loop between blocks (`ErrorFeedback.run_blocks`).
The layer objective is the same in both domains, so the runner's errors need nothing of the transforms.
"""

from __future__ import annotations

import torch

from quantlib.catalog.vector import code
from quantlib.errors import ConfigError
from quantlib.formats.trellis import Trellis, TrellisProjection, TrellisQuantized
from quantlib.solvers.contract import LayerTask, SolveResult
from quantlib.solvers.loops import ErrorFeedback
from quantlib.stats.hessian import PreparedHessian
from quantlib.transforms.incoherence import Incoherence, layer_seed


def trellis_of(spec) -> Trellis:
    name = code(spec)
    return Trellis(spec.opt("trellis_L"), spec.bits, 2 if name == "hyb" else 1, name, spec.opt("hyb_bits"))


class Prepared:
    """A layer's transformed, scaled weight and transformed Hessian (what BlockLDLQ quantizes)."""

    def __init__(self, W: torch.Tensor, task: LayerTask):
        spec = task.spec
        self.trellis = trellis_of(spec)
        self.tile = (spec.opt("tile_rows"), spec.opt("tile_cols"))
        d_out, d_in = W.shape
        self.segments = tuple(task.rows or (d_out,))
        if sum(self.segments) != d_out:
            raise ValueError(f"layer {task.name}: stacked rows {self.segments} do not add up to {d_out}")
        tx, ty = self.tile
        if any(r % tx for r in self.segments) or d_in % ty:
            raise ConfigError(f"qtip: layer {task.name} ({list(self.segments)} x {d_in}) is not whole tiles of "
                              f"{tx} rows x {ty} columns; choose tile_rows / tile_cols that divide its sizes")
        self.trellis.steps(tx * ty)  # refuses a tile too short for the trellis
        base = layer_seed(task.name, spec.opt("hadamard_seed"))
        self.seeds = torch.tensor([[(base + 1 + i) % 2 ** 31, base] for i in range(len(self.segments))])
        self.incs = [Incoherence(r, d_in, int(s[0]), int(s[1])) for r, s in zip(self.segments, self.seeds)]
        hess = task.hessian
        # From the dead-column-fixed, undamped H: the damping is relative to mean diag, which B keeps.
        Ht = self.incs[0].hessian(hess.H.double()).float()
        self.hessian = PreparedHessian(Ht, hess.damp, False, task.name, hess.ladder)
        parts, scales, r0 = [], [], 0
        target = spec.opt("scale") * self.trellis.rms()
        for rows, inc in zip(self.segments, self.incs):
            Wt = inc.weight(W[r0:r0 + rows].double())
            rms = float(Wt.square().mean().sqrt())
            scale = torch.tensor(rms / target if rms > 0 else 1.0, dtype=torch.float32)
            parts.append((Wt / scale.double()).float())
            scales.append(scale)
            r0 += rows
        self.W = torch.cat(parts)  # (d_out, d_in), transformed and scaled
        self.scales = torch.stack(scales)

    def representation(self, symbols: torch.Tensor) -> TrellisQuantized:
        return TrellisQuantized(symbols, self.scales, self.seeds, torch.tensor(self.segments), self.W.shape[1],
                                self.trellis, self.tile)


def solve(W: torch.Tensor, task: LayerTask) -> SolveResult:
    prep = Prepared(W, task)
    U, _ = prep.hessian.ldl()
    d_out, d_in = prep.W.shape
    project = TrellisProjection(prep.trellis, d_out, d_in, prep.tile)
    ErrorFeedback(prep.W, U, torch.arange(d_in)).run_blocks(project, prep.tile[1])
    rep = prep.representation(project.symbols())
    return SolveResult(rep, rep.dequantize(), {"damp": prep.hessian.damp, "dead_columns": task.hessian.dead,
                                               "scales": [round(float(s), 8) for s in prep.scales],
                                               "trellis": f"L{prep.trellis.L} k{prep.trellis.k} V{prep.trellis.V} "
                                                          f"{prep.trellis.code}"})
