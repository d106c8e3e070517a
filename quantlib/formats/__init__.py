"""Stored representations of quantized layers. Each format is a module here, listed in `quantlib.methods.FORMATS`
and imported only when a checkpoint or a solver uses it, so a fresh process loads any saved model.

A representation offers: `format` (its catalog key), `meta()` and `to_tensors()` (what a checkpoint stores),
`from_tensors(meta, tensors)` (the inverse), `dequantize()`, `bits_per_weight`, `select_rows(rows)` (the part of a
stacked solve that belongs to one layer) and `shape`. Formats used by the solving loops also offer a projection
(`UniformGrid.projection`): the nearest representable value of each column.
"""

from __future__ import annotations

from .. import methods


def load_representation(meta: dict, tensors: dict):
    """Rebuild a layer's representation from a checkpoint's metadata and tensors."""
    return methods.format_entry(meta["format"]).load().from_tensors(meta, tensors)
