"""The uniform quantizer grid, shared by every uniform method, and its stored representation.

Canonical affine form (algorithms.md 1.5):  q = clamp(round(w / s + z), 0, 2^b - 1),  w_hat = s * (q - z),
with one (s, z) per (output row, group of `group_size` consecutive input columns); group_size = -1 is one group
per row ("per channel"). z may be real (NeUQI) or integer (min-max, NeUQI_int).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError

# Registry of stored representations, by the `format` string written into the checkpoint.
FORMATS: dict[str, type] = {}


def register_format(cls):
    FORMATS[cls.format] = cls
    return cls


def num_groups(d_in: int, group_size: int) -> int:
    return 1 if group_size == -1 else d_in // group_size


def check_group_size(d_in: int, group_size: int, layer: str) -> None:
    """Packed formats need whole groups, so a group size must divide every quantized layer's input size."""
    if group_size != -1 and d_in % group_size:
        raise ConfigError(
            f"group size {group_size} does not divide the input dimension {d_in} of layer '{layer}'; "
            f"use a divisor of {d_in} or -1 (per channel)")


def group_index(d_in: int, group_size: int, device=None) -> torch.Tensor:
    """The group of each input column, shape (d_in,)."""
    if group_size == -1:
        return torch.zeros(d_in, dtype=torch.long, device=device)
    return torch.arange(d_in, device=device) // group_size


@dataclass
class UniformGrid:
    scale: torch.Tensor  # (d_out, n_groups), > 0
    zero: torch.Tensor  # (d_out, n_groups)
    bits: int
    group_size: int
    # How the statistics are stored: `stat_bits` per scale and per zero (16: half precision, the papers' count);
    # below 16 they are themselves quantized, min-max, in groups of `stat_group` rows, each such group with a 16-bit
    # scale and zero for either statistic (SpQR's second level). The tensors hold the dequantized values.
    stat_bits: int = 16
    stat_group: int = 0

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def column_params(self, d_in: int, cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-column (scale, zero), shape (d_out, len(cols)); `cols` are original column indices."""
        gidx = group_index(d_in, self.group_size, self.scale.device)
        if cols is not None:
            gidx = gidx[cols]
        return self.scale[:, gidx], self.zero[:, gidx]

    def quantize(self, w: torch.Tensor, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None):
        """Codes of `w` (d_out, k) on this grid; per-column params of the same shape may be passed."""
        if scale is None:
            scale, zero = self.column_params(w.shape[1])
        return torch.clamp(torch.round(w / scale + zero), 0, self.maxq)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None):
        if scale is None:
            scale, zero = self.column_params(codes.shape[1])
        return scale * (codes.to(scale.dtype) - zero)

    def round(self, w: torch.Tensor) -> torch.Tensor:
        """Nearest grid point of every weight (round to nearest)."""
        return self.dequantize(self.quantize(w))

    def select_rows(self, rows: slice) -> "UniformGrid":
        return UniformGrid(self.scale[rows], self.zero[rows], self.bits, self.group_size, self.stat_bits,
                           self.stat_group)

    def stat_meta(self) -> dict:
        """The statistics' storage, for a checkpoint's metadata (absent when they are plain 16-bit values)."""
        return {} if self.stat_bits == 16 else {"stat_bits": self.stat_bits, "stat_group": self.stat_group}


@register_format
@dataclass
class UniformQuantized:
    """Integer codes on a uniform grid. Stored packed: codes as an LSB-first bit stream per row in int32 words,
    which for one row is the column of GPTQ's `qweight` (the same layout for 2, 3, 4 and 8 bits)."""

    format = "uniform"
    codes: torch.Tensor  # (d_out, d_in) uint8
    grid: UniformGrid

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def bits_per_weight(self) -> float:
        """Average storage bits per weight: the codes, plus a scale and a zero per (row, group) at `stat_bits` each
        (16 as the papers count them), plus with quantized statistics a 16-bit scale and zero of each statistic per
        `stat_group` rows of a group (SpQR's count: wbits + 2 qq_bits / beta1 + 64 / (beta1 beta2))."""
        d_out, d_in = self.codes.shape
        grid, n_groups = self.grid, self.grid.scale.shape[1]
        bits = grid.bits + 2 * grid.stat_bits * n_groups / d_in
        if grid.stat_bits < 16:
            bits += 2 * 32 * n_groups * -(-d_out // grid.stat_group) / (d_out * d_in)
        return bits

    def dequantize(self) -> torch.Tensor:
        return self.grid.dequantize(self.codes)

    def select_rows(self, rows: slice) -> "UniformQuantized":
        return UniformQuantized(self.codes[rows], self.grid.select_rows(rows))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "qweight": pack_codes(self.codes, self.grid.bits),
            "scales": self.grid.scale.float().contiguous(),
            "zeros": self.grid.zero.float().contiguous(),
        }

    def meta(self) -> dict:
        return {"format": self.format, "bits": self.grid.bits, "group_size": self.grid.group_size,
                "shape": list(self.codes.shape), **self.grid.stat_meta()}

    @classmethod
    def from_tensors(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "UniformQuantized":
        d_out, d_in = meta["shape"]
        codes = unpack_codes(tensors["qweight"], meta["bits"], d_in)
        grid = UniformGrid(tensors["scales"], tensors["zeros"], meta["bits"], meta["group_size"],
                           meta.get("stat_bits", 16), meta.get("stat_group", 0))
        return cls(codes, grid)


def pack_codes(codes: torch.Tensor, bits: int, rows_per_chunk: int = 256) -> torch.Tensor:
    """(d_out, d_in) integer codes -> (d_out, ceil(d_in * bits / 32)) int32: each row an LSB-first bit stream."""
    d_out, d_in = codes.shape
    n_words = -(-d_in * bits // 32)
    shifts = torch.arange(bits, dtype=torch.int32)
    weights = (torch.ones(32, dtype=torch.int64) << torch.arange(32, dtype=torch.int64))
    out = torch.empty(d_out, n_words, dtype=torch.int32)
    for r0 in range(0, d_out, rows_per_chunk):
        c = codes[r0:r0 + rows_per_chunk].to(torch.int32)
        stream = ((c.unsqueeze(-1) >> shifts) & 1).reshape(c.shape[0], d_in * bits)
        stream = torch.nn.functional.pad(stream, (0, n_words * 32 - d_in * bits))
        words = (stream.view(c.shape[0], n_words, 32).to(torch.int64) * weights).sum(-1)
        out[r0:r0 + rows_per_chunk] = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return out


def unpack_codes(packed: torch.Tensor, bits: int, d_in: int, rows_per_chunk: int = 256) -> torch.Tensor:
    d_out, n_words = packed.shape
    shifts = torch.arange(32, dtype=torch.int64)
    weights = (torch.ones(bits, dtype=torch.int32) << torch.arange(bits, dtype=torch.int32))
    out = torch.empty(d_out, d_in, dtype=torch.uint8)
    for r0 in range(0, d_out, rows_per_chunk):
        w = packed[r0:r0 + rows_per_chunk].to(torch.int64) & 0xFFFFFFFF
        stream = ((w.unsqueeze(-1) >> shifts) & 1).reshape(w.shape[0], n_words * 32)[:, : d_in * bits]
        out[r0:r0 + rows_per_chunk] = (stream.view(w.shape[0], d_in, bits).to(torch.int32) * weights).sum(-1).to(torch.uint8)
    return out


# ------------------------------------------------------------------------------------------------ outliers
# Full-precision corrections added to a quantized matrix (QuantEase's outlier-aware variant). Values are kept
# in float16, as the papers count them, so the model that is evaluated is exactly the one that is stored.

INDEX_BITS = 16  # a column index (16-bit value + 16-bit index per outlier, as SpQR counts them)


@dataclass
class SparseOutliers:
    """Unstructured outliers in CSR form: any entries of a (d_out, d_in) matrix."""

    kind = "csr"
    shape: tuple[int, int]
    crow: torch.Tensor  # (d_out + 1,) int64 row pointers
    col: torch.Tensor  # (nnz,) int32 column of each value, sorted within a row
    val: torch.Tensor  # (nnz,) float16

    @classmethod
    def from_dense(cls, S: torch.Tensor) -> "SparseOutliers":
        """The nonzero entries of S (rounded to float16; entries that round to 0 are dropped)."""
        S = S.to(torch.float16)
        rows, cols = torch.nonzero(S, as_tuple=True)  # row-major order, so columns are sorted within a row
        counts = torch.bincount(rows, minlength=S.shape[0])
        crow = torch.zeros(S.shape[0] + 1, dtype=torch.int64)
        crow[1:] = torch.cumsum(counts, 0)
        return cls(tuple(S.shape), crow, cols.to(torch.int32), S[rows, cols])

    @property
    def count(self) -> int:
        return int(self.val.numel())

    @property
    def storage_bits(self) -> int:
        return self.count * (16 + INDEX_BITS) + 32 * (self.shape[0] + 1)

    def dense(self) -> torch.Tensor:
        d_out, d_in = self.shape
        out = torch.zeros(d_out, d_in)
        rows = torch.repeat_interleave(torch.arange(d_out), self.crow[1:] - self.crow[:-1])
        out[rows, self.col.long()] = self.val.float()
        return out

    def select_rows(self, rows: slice) -> "SparseOutliers":
        r0, r1, _ = rows.indices(self.shape[0])
        a, b = int(self.crow[r0]), int(self.crow[r1])
        return SparseOutliers((r1 - r0, self.shape[1]), self.crow[r0:r1 + 1] - a, self.col[a:b], self.val[a:b])

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"outlier_crow": self.crow, "outlier_col": self.col, "outlier_val": self.val}

    @classmethod
    def from_tensors(cls, shape, tensors) -> "SparseOutliers":
        return cls(tuple(shape), tensors["outlier_crow"], tensors["outlier_col"], tensors["outlier_val"])


@dataclass
class ColumnOutliers:
    """Structured outliers: whole input columns kept in full precision (QuantEase's structured variant)."""

    kind = "columns"
    shape: tuple[int, int]
    columns: torch.Tensor  # (k,) int64, sorted
    values: torch.Tensor  # (d_out, k) float16

    @classmethod
    def from_dense(cls, S: torch.Tensor, columns: torch.Tensor) -> "ColumnOutliers":
        columns = torch.sort(columns.long()).values
        return cls(tuple(S.shape), columns, S[:, columns].to(torch.float16).contiguous())

    @property
    def count(self) -> int:
        return int(self.values.numel())

    @property
    def storage_bits(self) -> int:
        return self.count * 16 + self.columns.numel() * INDEX_BITS

    def dense(self) -> torch.Tensor:
        out = torch.zeros(self.shape)
        out[:, self.columns] = self.values.float()
        return out

    def select_rows(self, rows: slice) -> "ColumnOutliers":
        r0, r1, _ = rows.indices(self.shape[0])
        # every row block gets its own copy of the shared column list (a checkpoint may not alias tensors)
        return ColumnOutliers((r1 - r0, self.shape[1]), self.columns.clone(), self.values[r0:r1])

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"outlier_columns": self.columns, "outlier_values": self.values}

    @classmethod
    def from_tensors(cls, shape, tensors) -> "ColumnOutliers":
        return cls(tuple(shape), tensors["outlier_columns"], tensors["outlier_values"])


OUTLIER_KINDS = {cls.kind: cls for cls in (SparseOutliers, ColumnOutliers)}


@register_format
@dataclass
class OutlierQuantized:
    """Codes on a uniform grid plus full-precision outliers: w_hat = dequantize(codes) + S."""

    format = "uniform_outliers"
    base: UniformQuantized
    outliers: SparseOutliers | ColumnOutliers

    @property
    def shape(self) -> tuple[int, int]:
        return self.base.shape

    @property
    def outlier_fraction(self) -> float:
        d_out, d_in = self.shape
        return self.outliers.count / (d_out * d_in)

    @property
    def bits_per_weight(self) -> float:
        d_out, d_in = self.shape
        return self.base.bits_per_weight + self.outliers.storage_bits / (d_out * d_in)

    def dequantize(self) -> torch.Tensor:
        return self.base.dequantize() + self.outliers.dense()

    def select_rows(self, rows: slice) -> "OutlierQuantized":
        return OutlierQuantized(self.base.select_rows(rows), self.outliers.select_rows(rows))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.base.to_tensors(), **self.outliers.to_tensors()}

    def meta(self) -> dict:
        return {**self.base.meta(), "format": self.format, "outliers": self.outliers.kind}

    @classmethod
    def from_tensors(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "OutlierQuantized":
        base = UniformQuantized.from_tensors(meta, tensors)
        return cls(base, OUTLIER_KINDS[meta["outliers"]].from_tensors(meta["shape"], tensors))
