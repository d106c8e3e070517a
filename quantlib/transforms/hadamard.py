"""Orthonormal Hadamard transforms of any dimension that has a Hadamard matrix built here.

A Hadamard matrix of order n exists only for n = 1, 2 or a multiple of 4; for the sizes of LLM layers it is built as
the Kronecker product H_m (x) H_{2^p} of a small dense factor and a power of two (as QuIP# and QTIP do): the power of
two goes through the fast Walsh-Hadamard transform of the `hadamard-transform` package, the small factor through a
matmul. The small factor is computed, not stored: Paley's first construction (order q + 1 for a prime q = 3 mod 4)
or his second (order 2 (q + 1) for a prime q = 1 mod 4), from the quadratic characters of GF(q) (Paley 1933, "On
orthogonal matrices"). n = 576 = 36 x 16 (q = 17), 1536 = 12 x 128 (q = 11), 640 = 20 x 32 (q = 19),
11008 = 5504 x 2 (q = 5503), 14336 = 28 x 512 (q = 13); a size with no such split is refused, naming it.

Every transform here is orthonormal (entries +-1/sqrt(n)), so `hadamard(hadamard(x), transpose=True) == x` up to
round-off, and transforming a weight's input side and its Hessian the same way leaves the layer objective unchanged.
"""

from __future__ import annotations

import functools

import torch
from hadamard_transform import hadamard_transform as _fwht

from quantlib.errors import ConfigError


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    f = 2
    while f * f <= q:
        if q % f == 0:
            return False
        f += 1
    return True


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i), chi the quadratic character of GF(q), q prime."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley(m: int) -> torch.Tensor | None:
    """An unnormalized (+-1) Hadamard matrix of order m from Paley's constructions, or None."""
    q = m - 1
    if q % 4 == 3 and _is_prime(q):  # Paley I: I + [[0, 1^T], [-1, Q]] (Q skew-symmetric)
        S = torch.zeros(m, m, dtype=torch.float64)
        S[0, 1:] = 1.0
        S[1:, 0] = -1.0
        S[1:, 1:] = _jacobsthal(q)
        return torch.eye(m, dtype=torch.float64) + S
    if m % 2 == 0:
        q = m // 2 - 1
        if q % 4 == 1 and _is_prime(q):  # Paley II: C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]]
            C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
            C[0, 1:] = 1.0
            C[1:, 0] = 1.0
            C[1:, 1:] = _jacobsthal(q)
            A = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
            B = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
            return torch.kron(C, A) + torch.kron(torch.eye(q + 1, dtype=torch.float64), B)
    return None


@functools.lru_cache(maxsize=None)
def hadamard_split(n: int) -> tuple[int, int]:
    """(m, 2^p) with n = m * 2^p, m the smallest order of a dense factor built here (1 for a power of two)."""
    if n < 1:
        raise ConfigError(f"a Hadamard transform needs a positive dimension, got {n}")
    pow2 = n & -n
    if pow2 == n:
        return 1, n
    odd = n // pow2
    m = odd
    while m <= n:
        if m % 4 == 0 and _paley(m) is not None:
            return m, n // m
        m *= 2
    raise ConfigError(
        f"no Hadamard matrix of order {n} can be built here: {n} = {odd} x 2^{pow2.bit_length() - 1}, and no "
        f"{odd} x 2^j dividing it is a Paley order (q + 1 with q prime = 3 mod 4, or 2 (q + 1) with q prime = 1 mod "
        "4); use a method without incoherence processing / rotations for this layer size")


@functools.lru_cache(maxsize=None)
def _factor(m: int) -> torch.Tensor:
    H = _paley(m) if m > 2 else torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)[:m, :m]
    H = H / m ** 0.5
    # a construction error would silently break every transform built on it: check once per order
    err = (H @ H.T - torch.eye(m, dtype=torch.float64)).abs().max().item()
    assert err < 1e-12, f"Hadamard factor of order {m} is not orthogonal ({err:.2e})"
    return H


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The dense orthonormal matrix H_n that `hadamard` applies (x -> x @ H_n^T); for tests and small sizes."""
    m, p = hadamard_split(n)
    eye = torch.eye(p, dtype=torch.float64)
    Hp = _fwht(eye) if p > 1 else eye
    return torch.kron(_factor(m), Hp).to(dtype)


def hadamard(x: torch.Tensor, dim: int = -1, transpose: bool = False) -> torch.Tensor:
    """y = H_n x along `dim` (n = x.shape[dim]), orthonormal; transpose=True applies H_n^T, the inverse."""
    x = x.movedim(dim, -1)
    shape = x.shape
    n = shape[-1]
    m, p = hadamard_split(n)
    y = x.reshape(-1, m, p)
    if p > 1:
        y = _fwht(y.reshape(-1, p)).reshape(-1, m, p)  # Sylvester's H_{2^p} is symmetric: its own transpose
    if m > 1:
        Hm = _factor(m).to(dtype=x.dtype, device=x.device)
        y = torch.matmul(Hm.T if transpose else Hm, y)
    return y.reshape(shape).movedim(-1, dim)


def random_signs(n: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """n random +-1 (float32) from a generator seeded with `seed`: the same on every machine."""
    g = torch.Generator().manual_seed(int(seed))
    return (torch.randint(0, 2, (n,), generator=g).float() * 2 - 1).to(device)


class RandomHadamard:
    """x -> H_n (s * x) along the last dim (s random signs from `seed`): an orthogonal map with a stored seed, the
    randomized Hadamard transform of QuIP#/QTIP's incoherence processing and QuaRot's rotations.
    `inverse` undoes it; `matrix()` is its dense form (rows map inputs to outputs, y = x @ matrix().T)."""

    def __init__(self, n: int, seed: int):
        hadamard_split(n)  # refuse an impossible size at construction
        self.n, self.seed = n, int(seed)
        self.signs = random_signs(n, seed)

    def __call__(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        s = self.signs.to(dtype=x.dtype, device=x.device)
        shape = [1] * x.dim()
        shape[dim] = self.n
        return hadamard(x * s.reshape(shape), dim=dim)

    def inverse(self, y: torch.Tensor, dim: int = -1) -> torch.Tensor:
        s = self.signs.to(dtype=y.dtype, device=y.device)
        shape = [1] * y.dim()
        shape[dim] = self.n
        return hadamard(y, dim=dim, transpose=True) * s.reshape(shape)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return hadamard_matrix(self.n, dtype) * self.signs.to(dtype)[None, :]
