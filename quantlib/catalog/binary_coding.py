"""UniQuanF's family: FlexRound (block-wise, uniform grid), ALTERNATING and UniQuanF (binary coding, format `bcq`)."""

from __future__ import annotations

from quantlib.catalog.contract import block_training
from quantlib.catalog.names import Option
from quantlib.catalog.registry import Component, register
from quantlib.errors import ConfigError

# UniQuanF's family (Park et al., ACL 2025): block-wise training with the authors' run-script defaults (Adam, lr 5e-3
# for the scales, 5e-4 for the binary-coding scales, cosine to 0, 20 epochs at batch 1, QDrop 0.5) and the data-free
# binary-coding baseline.
_ALTERNATIONS = Option("alternations", 15, int, "alt", "least-squares rounds of ALTERNATING")


def _check_bcq(spec) -> None:
    if spec.opt("alternations") < 1:
        raise ConfigError(f"{spec.solver}: alternations must be >= 1, got {spec.opt('alternations')}")


def _check_uniquanf(spec) -> None:
    _check_bcq(spec)
    for key in ("remap_period", "clip_grid"):
        if spec.opt(key) < 1:
            raise ConfigError(f"uniquanf: {key} must be >= 1, got {spec.opt(key)}")
    if spec.opt("alpha_lr") <= 0:
        raise ConfigError(f"uniquanf: alpha_lr must be > 0, got {spec.opt('alpha_lr')}")


register(Component(
    "flexround", "solver", "quantlib.solvers.flexround:wrap", "FlexRound", needs=("calibration", "fp_targets"),
    mode="block", options=block_training(epochs=20, lr=5e-3),
    help="learnable element-wise division before rounding (log-scale per (row, group), per weight and per row) on "
         "the init's grid, trained on each block's output error",
))

register(Component(
    "alternating", "solver", "quantlib.solvers.alternating:solve", "ALTERNATING", mode="data_free",
    takes_init=False, format="bcq", check=_check_bcq,
    options=(_ALTERNATIONS, Option("offset", True, bool, "nooffset", "fit an offset per (row, group) too")),
    help="binary coding per (row, group): greedy signs and scales, then alternating least-squares scales and "
         "nearest levels",
))

register(Component(
    "uniquanf", "solver", "quantlib.solvers.uniquanf:wrap", "UniQuanF", needs=("calibration", "fp_targets"),
    mode="block", takes_init=False, format="bcq", check=_check_uniquanf,
    options=block_training(epochs=20, lr=5e-3) + (
        Option("alpha_lr", 5e-4, float, "blr", "Adam's learning rate of the binary-coding scales"),
        Option("remap_period", 2, int, "p", "steps between remappings of each weight to its best index neighbour"),
        _ALTERNATIONS,
        Option("clip_grid", 1, int, "clip", "scales tried at initialisation: s * i / G, i = 1..G"),
    ),
    help="unified uniform and binary-coding quantizer: learnable division, then binary-coding levels with learnable "
         "scales and local remapping, trained on each block's output error",
))
