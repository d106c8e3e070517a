"""`quantlib.kernels`: dequantize / GEMV / matmul for the packed formats (uniform, lut, bcq) and QTIP's trellis
format, Triton kernels with a plain-torch reference. See kernels/README.md.

The code lives in the repository's top-level `kernels/` folder, which deliberately has no `__init__.py`: a top-level
package named `kernels` would clash with Hugging Face's `kernels` package. This shim makes that folder part of this
package by listing it in `__path__`, so its modules import as `quantlib.kernels.dispatch`, `quantlib.kernels.torch_ops`
and `quantlib.kernels.triton_ops` (and their relative imports resolve inside `quantlib.kernels`).
"""

from pathlib import Path

__path__ = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2] / "kernels")]

from quantlib.kernels.dispatch import (  # noqa: E402  (needs __path__ above)
    BACKENDS,
    MAX_GEMV_ROWS,
    dequant_bcq,
    dequant_lut,
    dequant_trellis,
    dequant_uniform,
    gemv_bcq,
    gemv_lut,
    gemv_trellis,
    gemv_uniform,
    matmul_bcq,
    matmul_lut,
    matmul_trellis,
    matmul_uniform,
    resolve_backend,
)

__all__ = [
    "BACKENDS", "MAX_GEMV_ROWS", "resolve_backend",
    "dequant_uniform", "gemv_uniform", "matmul_uniform",
    "dequant_lut", "gemv_lut", "matmul_lut",
    "dequant_bcq", "gemv_bcq", "matmul_bcq",
    "dequant_trellis", "gemv_trellis", "matmul_trellis",
]
