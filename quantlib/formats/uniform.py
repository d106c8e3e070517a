"""The uniform grid, shared by every uniform method, its stored representation (format `uniform`) and its
projection for the solving loops.

Canonical affine form:  q = clamp(round(w / s + z), 0, 2^b - 1),  w_hat = s * (q - z), with one (s, z) per
(output row, group of `group_size` consecutive input columns); group_size = -1 is one group per row ("per
channel"). z may be real (NeUQI) or integer (min-max, NeUQI_int). docs/formats.md describes the stored layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantlib.formats import ColumnProjection


def num_groups(d_in: int, group_size: int) -> int:
    return 1 if group_size == -1 else d_in // group_size


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
        return UniformGrid(self.scale[rows], self.zero[rows], self.bits, self.group_size)

    def projection(self, perm: torch.Tensor, dtype=torch.float32) -> "UniformProjection":
        """The nearest grid point of each column, for the solving loops that process columns in the order `perm`."""
        d_in = perm.numel()
        group_of = group_index(d_in, self.group_size)[perm].tolist()
        return UniformProjection(self.scale.T.to(dtype).contiguous(), self.zero.T.to(dtype).contiguous(), group_of,
                                 self.maxq, perm)


class UniformProjection(ColumnProjection):
    """Rounds one column at a time to the grid, for the shared solving loops (error feedback, coordinate descent).

    `scale_rows`, `zero_rows`: (n_groups, d_out), one row per group (a solver may fill a group's row lazily, before
    the loop reaches it, as SpQR does); `group_of[k]`: the group of the k-th column in processing order. Calling
    `project(k, values)` returns the nearest representable values of column k (a buffer reused by the next call) and
    records their codes; `codes()` gives them in the original column order.
    """

    def __init__(self, scale_rows: torch.Tensor, zero_rows: torch.Tensor, group_of: list[int], maxq: int,
                 perm: torch.Tensor):
        d_out = scale_rows.shape[1]
        super().__init__(len(group_of), d_out, perm, scale_rows.dtype, scale_rows.device)
        self.scale_rows, self.zero_rows = scale_rows, zero_rows
        self.maxq, self.group_of = maxq, group_of
        self._scale, self._zero = scale_rows.unbind(0), zero_rows.unbind(0)
        self._out = torch.empty(d_out, dtype=scale_rows.dtype, device=scale_rows.device)

    def __call__(self, k: int, values: torch.Tensor) -> torch.Tensor:
        g = self.group_of[k]
        q, s, z = self._codes[k], self._scale[g], self._zero[g]
        torch.div(values, s, out=q)
        q.add_(z).round_().clamp_(0, self.maxq)
        torch.sub(q, z, out=self._out)
        return self._out.mul_(s)


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
        """Average storage bits per weight: the codes plus a 16-bit scale and zero per (row, group), as the papers
        count them."""
        d_in = self.codes.shape[1]
        return self.grid.bits + 2 * 16 * self.grid.scale.shape[1] / d_in

    def dequantize(self) -> torch.Tensor:
        return self.grid.dequantize(self.codes)

    def select_rows(self, rows: slice) -> "UniformQuantized":
        return UniformQuantized(self.codes[rows], self.grid.select_rows(rows))

    @classmethod
    def stack_rows(cls, parts: list["UniformQuantized"]) -> "UniformQuantized":
        """One representation of row blocks solved apart (GuidedQuant's per-block Hessians)."""
        g = parts[0].grid
        grid = UniformGrid(torch.cat([p.grid.scale for p in parts]), torch.cat([p.grid.zero for p in parts]), g.bits,
                           g.group_size)
        return cls(torch.cat([p.codes for p in parts]), grid)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "qweight": pack_codes(self.codes, self.grid.bits),
            "scales": self.grid.scale.float().contiguous(),
            "zeros": self.grid.zero.float().contiguous(),
        }

    def meta(self) -> dict:
        return {"format": self.format, "bits": self.grid.bits, "group_size": self.grid.group_size,
                "shape": list(self.codes.shape)}

    @classmethod
    def from_tensors(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "UniformQuantized":
        d_out, d_in = meta["shape"]
        codes = unpack_codes(tensors["qweight"], meta["bits"], d_in)
        return cls(codes, UniformGrid(tensors["scales"], tensors["zeros"], meta["bits"], meta["group_size"]))


def pack_codes(codes: torch.Tensor, bits: int, rows_per_chunk: int = 256) -> torch.Tensor:
    """(d_out, d_in) integer codes -> (d_out, ceil(d_in * bits / 32)) int32: each row an LSB-first bit stream."""
    d_out, d_in = codes.shape
    n_words = -(-d_in * bits // 32)
    device = codes.device  # a layer solved on a GPU is packed there (the checkpoint writer moves it to the CPU)
    shifts = torch.arange(bits, dtype=torch.int32, device=device)
    weights = torch.ones(32, dtype=torch.int64, device=device) << torch.arange(32, dtype=torch.int64, device=device)
    out = torch.empty(d_out, n_words, dtype=torch.int32, device=device)
    for r0 in range(0, d_out, rows_per_chunk):
        c = codes[r0:r0 + rows_per_chunk].to(torch.int32)
        stream = ((c.unsqueeze(-1) >> shifts) & 1).reshape(c.shape[0], d_in * bits)
        stream = torch.nn.functional.pad(stream, (0, n_words * 32 - d_in * bits))
        words = (stream.view(c.shape[0], n_words, 32).to(torch.int64) * weights).sum(-1)
        out[r0:r0 + rows_per_chunk] = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return out


def unpack_codes(packed: torch.Tensor, bits: int, d_in: int, rows_per_chunk: int = 256) -> torch.Tensor:
    d_out, n_words = packed.shape
    device = packed.device
    shifts = torch.arange(32, dtype=torch.int64, device=device)
    weights = torch.ones(bits, dtype=torch.int32, device=device) << torch.arange(bits, dtype=torch.int32, device=device)
    out = torch.empty(d_out, d_in, dtype=torch.uint8, device=device)
    for r0 in range(0, d_out, rows_per_chunk):
        w = packed[r0:r0 + rows_per_chunk].to(torch.int64) & 0xFFFFFFFF
        stream = ((w.unsqueeze(-1) >> shifts) & 1).reshape(w.shape[0], n_words * 32)[:, : d_in * bits]
        out[r0:r0 + rows_per_chunk] = (stream.view(w.shape[0], d_in, bits).to(torch.int32) * weights).sum(-1).to(torch.uint8)
    return out


