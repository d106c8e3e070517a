"""LDLQ: GPTQ's error feedback written through the LDL factorisation of H (QuIP, Chee et al. 2023), with H reorder
(act order), on the spec's initialised grid.

The loop is the core's `ErrorFeedback`; each column is rounded by the grid's projection. Q_k uses the grid of column
k's *original* group (static groups), so act order needs no g_idx at inference.
"""

from __future__ import annotations

import torch

from quantlib.formats.uniform import UniformQuantized
from quantlib.solvers.contract import LayerTask, SolveResult
from quantlib.solvers.loops import ErrorFeedback


def solve(W: torch.Tensor, task: LayerTask) -> SolveResult:
    hess = task.hessian
    U, _ = hess.ldl()
    # After the factorisation, so the init's diag weights see the damping the factorisation settled on.
    grid = task.init_grid(W)
    project = grid.projection(hess.perm, W.dtype)
    ErrorFeedback(W, U, hess.perm).run(project)
    rep = UniformQuantized(project.codes(), grid)
    return SolveResult(rep, rep.dequantize(), {"damp": hess.damp, "dead_columns": hess.dead,
                                               "act_order": hess.act_order})
