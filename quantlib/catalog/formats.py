"""The layer formats: how a quantized layer is stored (`quantlib.formats`, one module each)."""

from __future__ import annotations

from quantlib.catalog.registry import Format, register_format

register_format(Format("uniform", "quantlib.formats.uniform:UniformQuantized", "uniform grid",
                       help="b-bit codes packed LSB-first in int32 words per row, a scale and zero per (row, group)"))
register_format(Format("uniform_outliers", "quantlib.formats.outliers:OutlierQuantized", "uniform + outliers",
                       help="uniform codes plus full-precision float16 outliers (CSR entries or whole columns)"))
register_format(Format("lut", "quantlib.formats.lut:LutQuantized", "lookup table",
                       help="b-bit codes (packed as the uniform format's) into a per-row table of 2^b float16 values"))
register_format(Format("spqr", "quantlib.formats.spqr:SpqrQuantized", "SpQR",
                       help="uniform codes in small groups whose scales and zeros are themselves quantized (SpQR's "
                            "second level), plus float16 outliers"))


register_format(Format("trellis", "quantlib.formats.trellis:TrellisQuantized", "trellis (QTIP)",
                       help="k bits per weight: tail-biting bitshift-trellis codes of incoherence-processed 16 x 16 "
                            "tiles, a scale and two Hadamard sign seeds per layer",
                       # no groups within a row: one scale per layer (or row block), codes per tile
                       grouping=lambda spec: f"{spec.opt('tile_rows')}x{spec.opt('tile_cols')} tiles"))
register_format(Format("bcq", "quantlib.formats.bcq:BcqQuantized", "binary coding",
                       help="b sign planes (1 bit per weight each) with b float16 scales and a float16 offset per "
                            "(row, group)"))
