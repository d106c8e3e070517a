"""What the GPU tests share: the `gpu` mark with its skip reason, strict float32 on CUDA, and the comparisons of a
CUDA result with the CPU's.

Every test under tests/gpu that needs a device carries `GPU` (pytest.mark.gpu plus a skip without CUDA whose reason
starts with "no CUDA device: "), so `pytest -q` on a CPU machine reports them as skipped and a GPU machine runs them
with `pytest -m gpu tests/gpu`. Nothing here reads ../shared: every model is built in the test (tests/conftest.py).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

CUDA = torch.cuda.is_available()


def no_cuda_reason() -> str:
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is a build without CUDA"
    else:
        why = f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU (torch.cuda.is_available() is False)"
    return f"no CUDA device: {why}"


GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason=no_cuda_reason() if not CUDA else "")]


@contextlib.contextmanager
def strict_float32():
    """float32 matmuls in float32 (no TF32) for the duration, so CUDA and CPU differ only by summation order."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def codes_of(rep) -> torch.Tensor:
    """The discrete part of a layer representation: its codes (uniform, lut, spqr; outliers' base) or sign planes
    (bcq)."""
    for attr in ("codes", "signs"):
        if hasattr(rep, attr):
            return getattr(rep, attr)
    return rep.base.codes


def identical_share(a: torch.Tensor, b: torch.Tensor) -> float:
    """The share of equal entries of two tensors (any devices)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.cpu() == b.cpu()).float().mean())


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def correlated_problem(d_out: int = 96, d_in: int = 256, n: int = 1024, seed: int = 0):
    """A layer weight W (d_out, d_in) and the Hessian H = X^T X / n of correlated activations with uneven channel
    scales (as in real models), float32 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) / d_in ** 0.5
    X = torch.randn(n, d_in, generator=g) @ (torch.eye(d_in) + 2 * mix)
    X *= torch.linspace(0.2, 3, d_in)
    W = torch.randn(d_out, d_in, generator=g) * 0.05
    return W, X.T @ X / n
