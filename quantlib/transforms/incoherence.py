"""Incoherence processing (QuIP#, QTIP): random-sign Hadamard transforms on both sides of a layer's weight.

With A = H_m diag(s_out) and B = H_n diag(s_in) (orthogonal, `RandomHadamard`), a weight W (m, n) is quantized as
W' = A W B^T and its input Hessian as H' = B H B^T. Then y = W x = A^T W' (B x), and for any error E' = W' - W_hat',
E = A^T E' B has tr(E H E^T) = tr(E' H' E'^T): the layer objective is the same in both domains, so a solver may work
on (W', H') and the dequantized weight is A^T W_hat' B. The transformed weight's entries are close to Gaussian with
no outliers, which is what QTIP's codes assume. The two seeds are all that must be stored.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from quantlib.errors import ConfigError
from quantlib.transforms.hadamard import RandomHadamard


def layer_seed(name: str, seed: int) -> int:
    """A per-layer seed from the layer's name and the spec's seed: layers get independent signs, reproducibly."""
    return (zlib.crc32(name.encode()) + 1_000_003 * int(seed)) % (2 ** 31)


@dataclass(frozen=True)
class Incoherence:
    """The pair of random Hadamard transforms of a (rows, cols) weight, rebuilt from its two seeds."""

    rows: int
    cols: int
    seed_out: int
    seed_in: int

    def __post_init__(self):
        if self.rows < 1 or self.cols < 1:
            raise ConfigError(f"incoherence processing needs a non-empty weight, got ({self.rows}, {self.cols})")
        # RandomHadamard refuses a size with no Hadamard construction, naming it
        object.__setattr__(self, "_out", RandomHadamard(self.rows, self.seed_out))
        object.__setattr__(self, "_in", RandomHadamard(self.cols, self.seed_in))

    @classmethod
    def seeded(cls, rows: int, cols: int, seed: int) -> "Incoherence":
        """Two independent sign vectors from one seed."""
        return cls(rows, cols, (2 * seed) % (2 ** 31), (2 * seed + 1) % (2 ** 31))

    def weight(self, W: torch.Tensor) -> torch.Tensor:
        """W' = A W B^T."""
        self._check(W)
        return self._out(self._in(W, dim=1), dim=0)

    def unweight(self, Wt: torch.Tensor) -> torch.Tensor:
        """W = A^T W' B: the exact inverse of `weight`."""
        self._check(Wt)
        return self._out.inverse(self._in.inverse(Wt, dim=1), dim=0)

    def hessian(self, H: torch.Tensor) -> torch.Tensor:
        """H' = B H B^T, symmetrised against round-off."""
        if tuple(H.shape) != (self.cols, self.cols):
            raise ConfigError(f"incoherence: a Hessian of shape ({self.cols}, {self.cols}) was expected, got "
                              f"{tuple(H.shape)}")
        Ht = self._in(self._in(H, dim=1), dim=0)
        return (Ht + Ht.T) / 2

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """x' = B x along the last dim: what the transformed weight multiplies (W x = A^T (W' x'))."""
        return self._in(x, dim=-1)

    def outputs(self, y: torch.Tensor) -> torch.Tensor:
        """A^T y' along the last dim: the layer's output from the transformed weight's (W x = A^T (W' x'))."""
        return self._out.inverse(y, dim=-1)

    def _check(self, W: torch.Tensor) -> None:
        if tuple(W.shape) != (self.rows, self.cols):
            raise ConfigError(f"incoherence: a weight of shape ({self.rows}, {self.cols}) was expected, got "
                              f"{tuple(W.shape)}")
