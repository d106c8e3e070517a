"""The shared solving loops: error feedback (GPTQ / LDLQ, also SpQR) and cyclic coordinate descent (QuantEase).

Both walk the columns of a layer in processing order (act order or identity) and call the format's *projection*
to round a column to its nearest representable values, so a lookup-table or binary-coding format plugs into the
same loops unchanged: a projection is a callable `project(k, values) -> w_hat` for the k-th column in processing
order that records the column's codes (`quantlib.formats.uniform.UniformProjection` for the uniform grid).

Both work on transposed, contiguous copies in processing order (column k of W[:, perm] is row k here), so every
step touches contiguous memory.
"""

from __future__ import annotations

import torch

BLOCK = 128


class ErrorFeedback:
    """The LDLQ column loop (GPTQ's error feedback written through the LDL factorisation of H, as in QuIP).

    With H_pi = U D U^T (U unit upper triangular, columns in processing order), the error e = w - w_hat costs
    sum_k D_k ((e U)_k)^2, and column k is rounded as w_hat_k = Q_k(target_k) with

        target_k = w_k + sum_{j<k} (w_j - w_hat_j) U_jk,

    which makes (eU)_k the rounding error of column k alone. `run(step)` calls `step(k, target_k)` for
    k = 0..d_in-1, and `step` returns w_hat_k (a projection, or a solver's own step around one). Feedback from earlier
    blocks of columns is one matmul per block ("lazy batch"); the result does not depend on the block size.

    In terms of the rounding errors r_j = target_j - w_hat_j (r = e U), target_k = w_k + sum_{j<k} r_j V_jk with
    V = I - U^-1: GPTQ's form, whose partial sums are GPTQ's working matrix (`current`).
    """

    def __init__(self, W: torch.Tensor, U: torch.Tensor, perm: torch.Tensor):
        self.Wt = W[:, perm].T.contiguous()
        self.U = U.to(W.dtype)
        self.err = torch.empty_like(self.Wt)  # w - w_hat of the columns done so far
        # target_k of the columns done so far; the rounding errors target - w_hat = target - w + err are formed
        # only when `current` needs them, which keeps the column loop short.
        self.targets = torch.empty_like(self.Wt)
        self.done = 0  # columns 0..done-1 have their w_hat
        self._V = None

    def current(self, positions: torch.Tensor) -> torch.Tensor:
        """(len(positions), d_out): GPTQ's working values of columns not yet done, i.e. the best unquantized values
        given the columns done so far (w_p + sum_{j<done} r_j V_jp). Costs one triangular inverse on first use."""
        if self._V is None:
            eye = torch.eye(self.U.shape[0], dtype=self.U.dtype, device=self.U.device)
            self._V = eye - torch.linalg.solve_triangular(self.U, eye, upper=True, unitriangular=True)
        out = self.Wt[positions].clone()
        if self.done:
            done = slice(0, self.done)
            rounding = self.targets[done] - self.Wt[done] + self.err[done]
            out += self._V[done, positions].T @ rounding
        return out

    def run(self, step) -> None:
        Wt, U, err = self.Wt, self.U, self.err
        d_in = Wt.shape[0]
        for b0 in range(0, d_in, BLOCK):
            b1 = min(b0 + BLOCK, d_in)
            target = self.targets[b0:b1]
            target.copy_(Wt[b0:b1])
            if b0:
                target.addmm_(U[:b0, b0:b1].T, err[:b0])
            Ub = U[b0:b1, b0:b1]
            for j in range(b1 - b0):
                k = b0 + j
                self.done = k
                e = err[k]
                torch.sub(Wt[k], step(k, target[j]), out=e)
                if j + 1 < b1 - b0:
                    target[j + 1:].addr_(Ub[j, j + 1:], e)
        self.done = d_in

    def run_blocks(self, step, width: int) -> None:
        """BlockLDLQ (QuIP#, QTIP): the columns in blocks of `width`, each block rounded jointly by
        `step(k0, targets)` (targets (width, d_out), the block's columns as rows; returns their w_hat) with error
        feedback between blocks only.

        Grouping H = U D U^T by blocks, H = U_b D_b U_b^T with U_b = U M^-1 (M the diagonal blocks of U: U_b's are
        identities) and D_b = M D M^T block diagonal; then target_B = w_B + sum_{j before B} e_j (U_b)_jB makes
        (e U_b)_B the block's own rounding error, so the objective is sum_B r_B D_b,B r_B^T. A vector quantizer of
        the block (minimising |r_B|^2, as QTIP's trellis does) then sees exactly the error feedback LDLQ gives a
        column. width = 1 is `run` with a scalar step.
        """
        Wt, U, err = self.Wt, self.U, self.err
        d_in = Wt.shape[0]
        if d_in % width:
            raise ValueError(f"BlockLDLQ: blocks of {width} columns do not tile {d_in} columns")
        for b0 in range(0, d_in, width):
            b1 = b0 + width
            target = self.targets[b0:b1]
            target.copy_(Wt[b0:b1])
            if b0:
                # (U_b)_{:b0, B} = U_{:b0, B} U_BB^-1 (U_BB unit upper triangular)
                F = torch.linalg.solve_triangular(U[b0:b1, b0:b1], U[:b0, b0:b1], upper=True, left=False,
                                                  unitriangular=True)
                target.addmm_(F.T, err[:b0])
            self.done = b0
            torch.sub(Wt[b0:b1], step(b0, target), out=err[b0:b1])
        self.done = d_in


def is_relaxed(it: int, iterations: int) -> bool:
    """QuantEase's accelerated schedule (Algorithm 2): every third sweep (it = 1, 4, 7, ...) skips rounding, except
    the last four, so with 30 iterations the relaxed sweeps are 1, 4, ..., 25 and the final sweep is quantized."""
    return it % 3 == 1 and it < iterations - 4


class CoordinateDescent:
    """Cyclic coordinate descent on f(W_hat) = tr(E H E^T), E = target - W_hat (QuantEase, Behdin et al. 2023).

    One coordinate step updates column j of every row at once: with the other columns fixed, f is a convex quadratic
    in w_hat_j whose unconstrained minimiser is u = w_hat_j + (E H)_j / H_jj, and the projection of u (for the uniform
    grid, its nearest grid point) is the exact minimiser over the representable values. A quantized sweep therefore
    never increases f once W_hat is representable.

    `target` is what W_hat approximates (W, or W - S with outliers), `start` the starting W_hat, `H` the damped
    Hessian in processing order, `perm` the processing order. Columns go in blocks; at a block start (E H) for the
    block's columns is one matmul with the current E, inside a block rank-1 updates, so a sweep costs about one
    (d_out x d_in x d_in) matmul. f is tracked exactly per column step (df = 2 delta.(EH)_j + H_jj |delta|^2).
    """

    def __init__(self, target: torch.Tensor, start: torch.Tensor, H: torch.Tensor, project, perm: torch.Tensor):
        self.perm = perm
        self.H = H
        self.hdiag = torch.diagonal(self.H).clone()
        self.X = start[:, perm].T.contiguous()  # W_hat^T
        self.E = target[:, perm].T.contiguous() - self.X  # (W_target - W_hat)^T
        self.project = project
        self.f = self.objective()

    def objective(self) -> float:
        """tr(E H E^T), computed exactly (float64 accumulation)."""
        return float(((self.H @ self.E) * self.E).sum(dtype=torch.float64))

    def sweep(self, quantize: bool) -> float:
        d_in = self.E.shape[0]
        hdiag = self.hdiag.tolist()
        # Row views made once per sweep: per-column indexing is most of the cost of a step on a CPU.
        X, E = self.X.unbind(0), self.E.unbind(0)
        project = self.project
        gains = []  # per column: delta . (g + H_jj delta / 2), so df = 2 * gain
        for b0 in range(0, d_in, BLOCK):
            b1 = min(b0 + BLOCK, d_in)
            G = self.H[b0:b1] @ self.E  # rows of (E H)^T for the block's columns, with the current E
            rows, Hb = G.unbind(0), self.H[b0:b1, b0:b1]
            for j in range(b1 - b0):
                k = b0 + j
                g = rows[j]
                u = torch.add(X[k], g, alpha=1 / hdiag[k])
                if quantize:
                    u = project(k, u)
                delta = X[k] - u  # change of E_k
                gains.append(torch.dot(delta, torch.add(g, delta, alpha=hdiag[k] / 2)))
                X[k].copy_(u)
                E[k].add_(delta)
                if j + 1 < b1 - b0:
                    G[j + 1:].addr_(Hb[j, j + 1:], delta)  # H symmetric: a contiguous row
        self.f += 2 * float(torch.stack(gains).sum(dtype=torch.float64))
        return self.f

    def run(self, iterations: int, relax: bool, after_sweep=None):
        """`iterations` sweeps (relaxed ones per `is_relaxed` when `relax`). Keeps the best quantized iterate: returns
        (its W_hat^T, the projection's codes at that sweep, what `after_sweep` returned then, per-sweep objectives,
        relaxed sweeps). `after_sweep(cd)` (e.g. the outlier step) runs after every sweep. The paper returns the last
        iterate; with its schedule the two coincide unless a sweep after a relaxed one ends higher."""
        trace, relaxed = [], []
        best, best_codes, best_f, best_extra = None, None, float("inf"), None
        for it in range(iterations):
            quantize = not (relax and is_relaxed(it, iterations))
            self.sweep(quantize)
            extra = after_sweep(self) if after_sweep else None
            trace.append(self.f)
            if not quantize:
                relaxed.append(it)
            elif self.f <= best_f:
                best, best_f, best_extra = self.X.clone(), self.f, extra
                best_codes = self.project.save()
        return best, best_codes, best_extra, trace, relaxed
