"""Format `spqr`: SpQR's representation (Dettmers et al. 2023). Uniform codes in small groups of input columns whose
per-row scales and zeros are themselves quantized: each group's vector of d_out scales (and of zeros) holds
`stat_bits`-bit codes, decoded with a float16 scale and zero per block of `stat_group` consecutive rows (SpQR's
second level); plus unstructured float16 outliers. With `stat_bits` 16 the statistics are stored as they are.

Stored tensors: `qweight` (packed codes, as the uniform format), then either `scales`/`zeros` (float32, stat_bits 16)
or `scale_codes`/`zero_codes` (n_groups, d_out) uint8 with `scale_params`/`zero_params` (n_groups, n_blocks, 2)
float16 [scale, zero] of each row block; outliers as CSR (`outlier_crow`, `outlier_col`, `outlier_val`).
A layer cut from a stacked solve (q/k/v share one) may start inside a row block: `stat_offset` is its first row's
position in that block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantlib.formats.outliers import SparseOutliers
from quantlib.formats.uniform import UniformGrid, pack_codes, unpack_codes


@dataclass
class QuantizedStatistic:
    """One statistic (the scales or the zeros) of every group: codes (n_groups, d_out) and, per block of
    `rows` rows, a float16 (scale, zero) pair (n_groups, n_blocks, 2). `offset`: position of row 0 in its block."""

    codes: torch.Tensor
    params: torch.Tensor
    rows: int
    offset: int = 0

    def dequantize(self) -> torch.Tensor:
        """(n_groups, d_out) float32 values: scale * (code - zero) with the row's block parameters."""
        n_groups, d_out = self.codes.shape
        block = (torch.arange(d_out) + self.offset) // self.rows
        params = self.params.to(torch.float32)
        scale, zero = params[:, block, 0], params[:, block, 1]
        return scale * (self.codes.to(torch.float32) - zero)

    def select_rows(self, rows: slice) -> "QuantizedStatistic":
        r0, r1, _ = rows.indices(self.codes.shape[1])
        first, last = (r0 + self.offset) // self.rows, (r1 - 1 + self.offset) // self.rows
        return QuantizedStatistic(self.codes[:, r0:r1], self.params[:, first:last + 1], self.rows,
                                  (r0 + self.offset) % self.rows)


@dataclass
class SpqrQuantized:
    format = "spqr"
    codes: torch.Tensor  # (d_out, d_in) uint8
    bits: int
    group_size: int
    stat_bits: int
    stat_group: int
    scales: torch.Tensor | QuantizedStatistic  # (d_out, n_groups) float32 when stat_bits == 16
    zeros: torch.Tensor | QuantizedStatistic
    outliers: SparseOutliers | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def grid(self) -> UniformGrid:
        """The decoded statistics as a uniform grid (what the codes are dequantized with)."""
        if self.stat_bits == 16:
            return UniformGrid(self.scales, self.zeros, self.bits, self.group_size)
        return UniformGrid(self.scales.dequantize().T.contiguous(), self.zeros.dequantize().T.contiguous(),
                           self.bits, self.group_size)

    @property
    def outlier_fraction(self) -> float:
        d_out, d_in = self.shape
        return 0.0 if self.outliers is None else self.outliers.count / (d_out * d_in)

    @property
    def bits_per_weight(self) -> float:
        """SpQR's count: wbits + 2 qq_bits / beta1 + 64 / (beta1 beta2) (the last term: a 16-bit scale and zero of
        either statistic per `stat_group` rows of a group), plus 32 bits per outlier and the CSR row pointers."""
        d_out, d_in = self.shape
        n_groups = d_in // self.group_size if self.group_size > 0 else 1
        bits = self.bits + 2 * self.stat_bits * n_groups / d_in
        if self.stat_bits < 16:
            bits += 2 * 32 * n_groups * -(-d_out // self.stat_group) / (d_out * d_in)
        if self.outliers is not None:
            bits += self.outliers.storage_bits / (d_out * d_in)
        return bits

    def dequantize(self) -> torch.Tensor:
        w = self.grid.dequantize(self.codes)
        return w if self.outliers is None else w + self.outliers.dense()

    def select_rows(self, rows: slice) -> "SpqrQuantized":
        if self.stat_bits == 16:
            scales, zeros = self.scales[rows], self.zeros[rows]
        else:
            scales, zeros = self.scales.select_rows(rows), self.zeros.select_rows(rows)
        outliers = None if self.outliers is None else self.outliers.select_rows(rows)
        return SpqrQuantized(self.codes[rows], self.bits, self.group_size, self.stat_bits, self.stat_group,
                             scales, zeros, outliers)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": pack_codes(self.codes, self.bits)}
        if self.stat_bits == 16:
            out.update(scales=self.scales.float().contiguous(), zeros=self.zeros.float().contiguous())
        else:
            for name, stat in (("scale", self.scales), ("zero", self.zeros)):
                out[f"{name}_codes"] = stat.codes.to(torch.uint8).contiguous()
                out[f"{name}_params"] = stat.params.to(torch.float16).contiguous()
        if self.outliers is not None:
            out.update(self.outliers.to_tensors())
        return out

    def meta(self) -> dict:
        meta = {"format": self.format, "bits": self.bits, "group_size": self.group_size, "shape": list(self.shape),
                "stat_bits": self.stat_bits, "stat_group": self.stat_group, "outliers": self.outliers is not None}
        if self.stat_bits < 16:
            meta["stat_offset"] = self.scales.offset
        return meta

    @classmethod
    def from_tensors(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "SpqrQuantized":
        d_out, d_in = meta["shape"]
        codes = unpack_codes(tensors["qweight"], meta["bits"], d_in)
        if meta["stat_bits"] == 16:
            scales, zeros = tensors["scales"], tensors["zeros"]
        else:
            scales, zeros = (QuantizedStatistic(tensors[f"{n}_codes"], tensors[f"{n}_params"], meta["stat_group"],
                                                meta.get("stat_offset", 0)) for n in ("scale", "zero"))
        outliers = SparseOutliers.from_tensors(meta["shape"], tensors) if meta["outliers"] else None
        return cls(codes, meta["bits"], meta["group_size"], meta["stat_bits"], meta["stat_group"], scales, zeros,
                   outliers)
