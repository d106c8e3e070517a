"""Format `lut`: per-row lookup tables (SqueezeLLM, LNQ, GuidedQuant). Each row has 2^b float16 values; each weight
is the b-bit code of one of them: w_hat[r, j] = table[r, code[r, j]].

Stored tensors: `qweight` (the codes packed as the uniform format's: an LSB-first bit stream per row in int32 words)
and `lut` float16 (d_out, 2^b). Bits per weight: b + 16 * 2^b / d_in (the table counted per row, as GuidedQuant
counts it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantlib.formats import ColumnProjection
from quantlib.formats.uniform import pack_codes, unpack_codes


@dataclass
class LutQuantized:
    format = "lut"
    codes: torch.Tensor  # (d_out, d_in) uint8
    tables: torch.Tensor  # (d_out, 2^b) float16
    bits: int

    def __post_init__(self):
        if self.tables.dtype != torch.float16:
            raise ValueError("lookup tables are stored in float16; round them before building the representation")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def bits_per_weight(self) -> float:
        return self.bits + 16 * 2 ** self.bits / self.codes.shape[1]

    def dequantize(self) -> torch.Tensor:
        return self.tables.float().gather(1, self.codes.long())

    def select_rows(self, rows: slice) -> "LutQuantized":
        return LutQuantized(self.codes[rows], self.tables[rows], self.bits)

    @classmethod
    def stack_rows(cls, parts: list["LutQuantized"]) -> "LutQuantized":
        return cls(torch.cat([p.codes for p in parts]), torch.cat([p.tables for p in parts]), parts[0].bits)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": pack_codes(self.codes, self.bits), "lut": self.tables.contiguous()}

    def meta(self) -> dict:
        return {"format": self.format, "bits": self.bits, "shape": list(self.codes.shape)}

    @classmethod
    def from_tensors(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "LutQuantized":
        d_out, d_in = meta["shape"]
        lut = tensors["lut"]
        if tuple(lut.shape) != (d_out, 2 ** meta["bits"]) or lut.dtype != torch.float16:
            raise ValueError(f"a {meta['bits']}-bit lookup table must be float16 of shape ({d_out}, "
                             f"{2 ** meta['bits']}), got {lut.dtype} {tuple(lut.shape)}")
        return cls(unpack_codes(tensors["qweight"], meta["bits"], d_in), lut, meta["bits"])

    def projection(self, perm: torch.Tensor) -> "LutProjection":
        return LutProjection(self.tables.float(), perm)


class LutProjection(ColumnProjection):
    """The nearest entry of each row's table, one column at a time, for the shared solving loops (quantlib.solvers.loops):
    `project(k, values)` rounds the k-th column in processing order and records its codes."""

    def __init__(self, tables: torch.Tensor, perm: torch.Tensor):
        super().__init__(perm.numel(), tables.shape[0], perm, torch.long, tables.device)
        self.tables = tables

    def __call__(self, k: int, values: torch.Tensor) -> torch.Tensor:
        code = (values.unsqueeze(1) - self.tables).abs().argmin(1)
        self._codes[k].copy_(code)
        return self.tables.gather(1, code.unsqueeze(1)).squeeze(1)
