"""Solvers: one module each, listed in `quantlib.catalog.registry`. A layer-wise solver maps a layer's weight to a stored
representation plus the dequantized weight:

    solve(W: (d_out, d_in) float32, task: LayerTask) -> SolveResult

`task.hessian` is the layer's PreparedHessian (dead columns, act-order permutation and damping settled once, factors
on demand; None for data-free specs) and `task.init_grid(W)` the spec's parameter init, resolved once by the runner.
Rows are independent given H, so the runner may stack layers that share an input (q/k/v) into one call.
Preprocessors take the same task: `preprocess(W, task) -> W'`. Block-wise solvers have their own contract
(`quantlib.runner.blockwise`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from quantlib.catalog import registry
from quantlib.stats.hessian import PreparedHessian


@dataclass
class SolveResult:
    rep: Any  # the stored representation (e.g. quantlib.formats.uniform.UniformQuantized)
    weight: torch.Tensor  # dequantized weight, (d_out, d_in) float32
    stats: dict = field(default_factory=dict)  # solver diagnostics for the per-layer report


@dataclass
class LayerTask:
    """What a preprocessor or solver gets besides the weight: the spec, the layer's name, its prepared Hessian and
    the resolved init."""

    name: str
    spec: Any
    hessian: PreparedHessian | None = None
    init: Callable | None = None  # init(W, hdiag) -> grid, bound to the spec
    stats: dict = field(default_factory=dict)  # per-weight statistics of these rows (e.g. "fisher")
    # rows of each layer stacked in W (q/k/v), for a solver whose representation mixes rows (QTIP's output-side
    # transform); None: W is one layer (or rows a solver may cut anywhere)
    rows: tuple[int, ...] | None = None

    def init_grid(self, W: torch.Tensor):
        """The spec's parameter init for W, weighted by the damped diag(H) where there is a Hessian."""
        if self.init is None:
            raise ValueError(f"{self.spec.describe()} takes no parameter init")
        return self.init(W, None if self.hessian is None else self.hessian.diag())

    def stat(self, key: str) -> torch.Tensor:
        if key not in self.stats:
            raise ValueError(f"layer {self.name}: {self.spec.describe()} needs the statistic '{key}', which the "
                             "runner did not provide")
        return self.stats[key]


class LayerSolver:
    """A spec's preprocessors, solver and init, resolved once and applied to one layer (or stacked layers sharing an
    input) at a time: the one path from a weight and its Hessian to a representation."""

    def __init__(self, spec):
        self.spec = spec
        solver = registry.component("solver", spec.solver)
        self.solve = solver.load()
        # model-scope preprocessors (rotations) ran on the whole model before the walk
        self.preprocessors = [c.load() for c in (registry.component("preprocess", p) for p in spec.preprocess)
                              if c.scope == "layer"]
        self.init = None
        if solver.takes_init:
            init = registry.component("init", spec.init).load()
            self.init = lambda W, hdiag: init(W, spec, hdiag)
        self.damp = spec.opt_or("damp", None)
        self.act_order = spec.opt_or("act_order", False)
        self.ladder = solver.damp_ladder

    def task(self, H: torch.Tensor | None, name: str, stats: dict | None = None,
             rows: tuple[int, ...] | None = None) -> LayerTask:
        hessian = None if H is None else PreparedHessian(H, self.damp, self.act_order, name, self.ladder)
        return LayerTask(name, self.spec, hessian, self.init, stats or {}, rows)

    def __call__(self, W: torch.Tensor, H: torch.Tensor | None, name: str, stats: dict | None = None,
                 rows: tuple[int, ...] | None = None) -> SolveResult:
        task = self.task(H, name, stats, rows)
        # Preprocessing (e.g. MagR) changes what the solver quantizes; callers still compare with the original W.
        for pre in self.preprocessors:
            W = pre(W, task)
        return self.solve(W, task)


def solve_layer(W: torch.Tensor, H: torch.Tensor | None, spec, name: str = "layer", stats: dict | None = None,
                rows: tuple[int, ...] | None = None) -> SolveResult:
    """Quantize one weight matrix with its undamped mean Hessian H (None for data-free specs) as `spec` says;
    `stats` holds per-weight statistics a method reads (e.g. {"fisher": (d_out, d_in)})."""
    return LayerSolver(spec)(W, H, name, stats, rows)
