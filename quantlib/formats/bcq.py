"""Format `bcq`: binary-coding quantization (Xu et al. 2018; UniQuanF). Each weight is a sum of b signed scales plus
an offset, per (row, group of `group_size` input columns):

    w_hat[r, j] = sum_i alpha[r, g(j), i] * beta_i[r, j] + offset[r, g(j)],   beta_i in {-1, +1}

Stored tensors: `qplanes` int32 (b, d_out, ceil(d_in / 32)), plane i's signs (bit 1 -> +1) packed LSB-first per row
like the uniform format's `qweight` at one bit; `alphas` float16 (d_out, n_groups, b) and `offsets` float16
(d_out, n_groups). Bits per weight: b + 16 (b + 1) n_groups / d_in. A uniform grid maps into it exactly: with
alpha_i = s 2^(i-1) (i = 1..b, smallest first) and o = s ((2^b - 1) / 2 - z), the 2^b sums are s (q - z).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantlib.formats.uniform import group_index, pack_codes, unpack_codes


@dataclass
class BcqQuantized:
    format = "bcq"
    signs: torch.Tensor  # (b, d_out, d_in) bool, True for +1
    alphas: torch.Tensor  # (d_out, n_groups, b) float16
    offsets: torch.Tensor  # (d_out, n_groups) float16
    group_size: int

    def __post_init__(self):
        if self.alphas.dtype != torch.float16 or self.offsets.dtype != torch.float16:
            raise ValueError("binary-coding scales and offsets are stored in float16; round them first")

    @property
    def bits(self) -> int:
        return self.signs.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.signs.shape[1:])

    @property
    def bits_per_weight(self) -> float:
        d_in = self.shape[1]
        return self.bits + 16 * (self.bits + 1) * self.alphas.shape[1] / d_in

    def dequantize(self) -> torch.Tensor:
        d_out, d_in = self.shape
        cols = group_index(d_in, self.group_size)
        alphas = self.alphas.float()[:, cols, :]  # (d_out, d_in, b)
        beta = self.signs.permute(1, 2, 0).float() * 2 - 1
        return (alphas * beta).sum(-1) + self.offsets.float()[:, cols]

    def select_rows(self, rows: slice) -> "BcqQuantized":
        return BcqQuantized(self.signs[:, rows], self.alphas[rows], self.offsets[rows], self.group_size)

    @classmethod
    def stack_rows(cls, parts: list["BcqQuantized"]) -> "BcqQuantized":
        return cls(torch.cat([p.signs for p in parts], 1), torch.cat([p.alphas for p in parts]),
                   torch.cat([p.offsets for p in parts]), parts[0].group_size)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        planes = torch.stack([pack_codes(plane.to(torch.uint8), 1) for plane in self.signs])
        return {"qplanes": planes, "alphas": self.alphas.contiguous(), "offsets": self.offsets.contiguous()}

    def meta(self) -> dict:
        return {"format": self.format, "bits": self.bits, "group_size": self.group_size, "shape": list(self.shape)}

    @classmethod
    def from_tensors(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "BcqQuantized":
        d_out, d_in = meta["shape"]
        b = meta["bits"]
        n_groups = 1 if meta["group_size"] == -1 else d_in // meta["group_size"]
        planes, alphas, offsets = tensors["qplanes"], tensors["alphas"], tensors["offsets"]
        expected = {"qplanes": (b, d_out, -(-d_in // 32)), "alphas": (d_out, n_groups, b), "offsets": (d_out, n_groups)}
        for key, shape in expected.items():
            if tuple(tensors[key].shape) != shape:
                raise ValueError(f"bcq tensor '{key}' has shape {tuple(tensors[key].shape)}, its metadata implies "
                                 f"{shape}")
        signs = torch.stack([unpack_codes(p, 1, d_in).bool() for p in planes])
        return cls(signs, alphas, offsets, meta["group_size"])


def levels(alphas: torch.Tensor) -> torch.Tensor:
    """The 2^b values sum_i alpha_i beta_i in Cartesian sign order (index c: sign i is bit i of c from the most
    significant, 0 -> +1), for alphas (..., b): (..., 2^b)."""
    b = alphas.shape[-1]
    c = torch.arange(2 ** b, device=alphas.device)
    bits = (c.unsqueeze(-1) >> torch.arange(b - 1, -1, -1, device=alphas.device)) & 1  # (2^b, b)
    signs = 1 - 2 * bits.to(alphas.dtype)
    return alphas @ signs.T


def signs_of(index: torch.Tensor, b: int) -> torch.Tensor:
    """(b, ...) bool planes (True for +1) of Cartesian level indices."""
    shifts = torch.arange(b - 1, -1, -1, device=index.device).view(-1, *([1] * index.dim()))
    return ((index.unsqueeze(0) >> shifts) & 1) == 0
