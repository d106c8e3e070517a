"""Stored representations of quantized layers. Each format is a module here, listed in `quantlib.catalog.registry.FORMATS`
and imported only when a checkpoint or a solver uses it, so a fresh process loads any saved model.

A representation offers: `format` (its catalog key), `meta()` and `to_tensors()` (what a checkpoint stores),
`from_tensors(meta, tensors)` (the inverse), `dequantize()`, `bits_per_weight`, `select_rows(rows)` (the part of a
stacked solve that belongs to one layer) and `shape`. Formats used by the solving loops also offer a projection
(`UniformGrid.projection`): the nearest representable value of each column.
"""

from __future__ import annotations

import torch

from quantlib.catalog import registry


class ColumnProjection:
    """The code bookkeeping every projection shares: `buffer` holds the codes of column k (processing order) in row
    k; subclasses round a column in `__call__(k, values)` and write its codes there."""

    def __init__(self, d_in: int, d_out: int, perm: torch.Tensor, dtype, device=None):
        self.perm = perm
        # On the device of the values it rounds (a CUDA solve writes its codes with `out=`, which must be there).
        self.buffer = torch.empty(d_in, d_out, dtype=dtype, device=device)
        # Row views made once: a projection runs once per column, so indexing and allocation dominate its cost.
        self._codes = self.buffer.unbind(0)

    def save(self) -> torch.Tensor:
        """A copy of the codes recorded so far (e.g. of the best iterate)."""
        return self.buffer.clone()

    def restore(self, saved: torch.Tensor) -> None:
        self.buffer.copy_(saved)

    def codes(self) -> torch.Tensor:
        """(d_out, d_in) uint8 codes in the original column order."""
        d_in, d_out = self.buffer.shape
        out = torch.empty(d_out, d_in, dtype=torch.uint8, device=self.buffer.device)
        out[:, self.perm.to(out.device)] = self.buffer.T.to(torch.uint8)
        return out


def load_representation(meta: dict, tensors: dict):
    """Rebuild a layer's representation from a checkpoint's metadata and tensors."""
    return registry.format_entry(meta["format"]).load().from_tensors(meta, tensors)
