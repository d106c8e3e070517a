"""Full-precision corrections added to a quantized matrix, and the format `uniform_outliers` (uniform codes plus
outliers: QuantEase's outlier-aware variant). Values are kept in float16, as the papers count them, so the model
that is evaluated is exactly the one that is stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantlib.formats.uniform import UniformQuantized

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
        crow = torch.zeros(S.shape[0] + 1, dtype=torch.int64, device=S.device)
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
        out = torch.zeros(d_out, d_in, device=self.val.device)
        rows = torch.repeat_interleave(torch.arange(d_out, device=self.crow.device), self.crow[1:] - self.crow[:-1])
        rows = rows.to(out.device)
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
        out = torch.zeros(self.shape, device=self.values.device)
        out[:, self.columns.to(out.device)] = self.values.float()
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
