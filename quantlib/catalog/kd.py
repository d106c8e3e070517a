"""The `.kd` part of a short name: lightweight distillation after quantization (NeUQI), its windows and options
(`quantlib.catalog.contract.DISTILL_OPTIONS`), rendered and read back; `QuantSpec` carries it as `distill`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quantlib.catalog import contract
from quantlib.catalog.names import CalibSpec, find_calib
from quantlib.errors import ConfigError


@dataclass(frozen=True)
class DistillSpec:
    """The `.kd` part of a name: lightweight distillation of the quantized model on n windows of L tokens (NeUQI),
    with non-default options only, sorted by key."""

    calib: CalibSpec
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def build(cls, calib: CalibSpec, options: dict[str, Any] | None = None) -> "DistillSpec":
        defs = {o.key: o for o in contract.DISTILL_OPTIONS}
        clean = {}
        for key, value in (options or {}).items():
            if key not in defs:
                raise ConfigError(f"unknown distillation option '{key}'; it takes: {', '.join(sorted(defs))}")
            value = defs[key].coerce(value)
            if value != defs[key].default:
                clean[key] = value
        return cls(calib, tuple(sorted(clean.items())))

    def opt(self, key: str) -> Any:
        defs = {o.key: o for o in contract.DISTILL_OPTIONS}
        return dict(self.options).get(key, defs[key].default)

    def short_name(self) -> str:
        defs = {o.key: o for o in contract.DISTILL_OPTIONS}
        return ".".join(["kd", self.calib.short_name(), *(defs[k].render(v) for k, v in self.options)])


def parse_distill(name: str, tokens: list[str]) -> DistillSpec:
    """`{dataset}.n{N}.L{L}[.s{seed}][.{option}...]` after a name's `kd` token."""
    try:
        found = find_calib(["_", *tokens])
    except ConfigError as exc:  # a calibration part with odd numbers (n0, L1): say which name
        raise ConfigError(f"cannot read short name '{name}': {exc}") from None
    if found is None or found[0] != 1:
        raise ConfigError(f"cannot read short name '{name}': 'kd' must be followed by the distillation windows "
                          "{dataset}.n{N}.L{L}[.s{seed}]")
    _, end, calib = found
    defs = {o.key: o for o in contract.DISTILL_OPTIONS}
    options = {}
    for tok in tokens[end - 1:]:
        try:
            hits = [(o.key, v) for o in defs.values() for ok, v in [o.match(tok, o.default)] if ok]
        except ConfigError as exc:  # an option's token without a value of its kind (bs1p5)
            raise ConfigError(f"cannot read short name '{name}': {exc}") from None
        if len(hits) != 1:
            raise ConfigError(f"cannot read short name '{name}': unknown distillation option token '{tok}'; it "
                              f"takes: {', '.join(sorted(o.describe() for o in defs.values()))}")
        options[hits[0][0]] = hits[0][1]
    return DistillSpec.build(calib, options)
