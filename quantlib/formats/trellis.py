"""Format `trellis`: QTIP's bitshift-trellis codes (Tseng et al. 2024, "QTIP: Quantization with Trellises and
Incoherence Processing") of an incoherence-processed weight.

The bitshift trellis. A state is an L-bit integer; one step emits V weights, the code's value of the state, and the
next state shifts in k*V new bits: s' = ((s << kV) mod 2^L) | c. A sequence of T weights is T/V states; tail-biting
(the last state's low L - kV bits are the first state's high ones) makes the whole sequence a circular bit stream of
exactly k*T bits in which state i is the L-bit window starting at bit i*kV. We store, per step, the state's top kV
bits (its "symbol"): k bits per weight, nothing else per sequence.

The codes are QTIP's, each state's value a hash of its index:
- `1mad`: x = (34038481 s + 76625530) mod 2^32, the sum of x's four bytes minus 510, / 147.8 (close to N(0, 1));
- `3inst`: x = (89226354 s + 64248484) mod 2^32, masked (0x8FFF8FFF) and XORed with 0x3B603B60, its two 16-bit
  halves read as float16 and added;
- `hyb`: V = 2 weights per state, entry (s (s + 1) >> (L - Q - 1)) mod 2^Q of a table of 2^Q 2-D points (k-means
  centres of a 2-D Gaussian), the first coordinate's sign from bit L - 1 of s (s + 1); the table is stored.
1MAD and 3INST emit one weight per state (V = 1).

Encoding is Viterbi's search of the minimum squared-error path through the trellis (`Trellis.viterbi`, batched over
sequences), made tail-biting as QTIP does: a first pass on the sequence rotated by half its length fixes the state
at its start, then a pass constrained to start and end on that overlap.

Layout. The solver cuts each weight into tiles of `tile = (tx, ty)` (rows x columns, QTIP's td_x x td_y: 16 x 16),
one sequence per tile read row by row; sequences are ordered by row tile, then column tile. A layer is one or more
row *segments* (the layers of a stacked solve, GuidedQuant's row blocks), each with its own incoherence seeds and
scale: W_hat = A^T (scale * decode(codes)) B (`quantlib.transforms.incoherence`).

Stored tensors: `trellis` int32 (n_sequences, ceil(T k / 32)): each sequence's symbols as an LSB-first stream of kV-bit
fields (the uniform format's packing); `scales` float32 (n_segments,); `seeds` int64 (n_segments, 2): the output-
and input-side sign seeds; `segments` int64 (n_segments,): rows per segment; with HYB `tlut` float16 (2^Q, 2). Bits
per weight: k plus the segments' 16-bit scales and HYB's table (the seeds regenerate the transforms and are not
counted, as QTIP does not count them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from quantlib.catalog.vector import viterbi_chunk
from quantlib.errors import ConfigError
from quantlib.formats.uniform import pack_codes, unpack_codes
from quantlib.transforms.incoherence import Incoherence

CODES = ("1mad", "3inst", "hyb")


def _mod32(x: torch.Tensor) -> torch.Tensor:
    return x & 0xFFFFFFFF


def code_1mad(states: torch.Tensor) -> torch.Tensor:
    x = _mod32(states.to(torch.int64) * 34038481 + 76625530)
    total = (x & 255) + ((x >> 8) & 255) + ((x >> 16) & 255) + ((x >> 24) & 255)
    return (total - 510).to(torch.float32) / 147.800537109375


def _half_from_bits(bits16: torch.Tensor) -> torch.Tensor:
    signed = torch.where(bits16 >= 2 ** 15, bits16 - 2 ** 16, bits16)
    return signed.to(torch.int16).view(torch.float16).to(torch.float32)


def code_3inst(states: torch.Tensor) -> torch.Tensor:
    x = _mod32(states.to(torch.int64) * 89226354 + 64248484)
    x = (x & 0x8FFF8FFF) ^ 0x3B603B60  # per half: random sign and low 12 bits, the top exponent bits fixed
    return _half_from_bits(x >> 16) + _half_from_bits(x & 0xFFFF)


@functools.lru_cache(maxsize=16)
def code_table(code: str, L: int) -> torch.Tensor:
    """(2^L, 1) float32: the value every state emits under a computed code."""
    states = torch.arange(2 ** L)
    if code == "1mad":
        return code_1mad(states).unsqueeze(1)
    if code == "3inst":
        return code_3inst(states).unsqueeze(1)
    raise ConfigError(f"trellis: '{code}' is not a computed code ({', '.join(CODES[:2])})")


@functools.lru_cache(maxsize=4)
def hyb_default_lut(Q: int) -> torch.Tensor:
    """(2^Q, 2) float32 (float16-exact): HYB's small table as QTIP builds it, k-means centres of a 2-D standard
    Gaussian rescaled to a standard deviation of sqrt(15/16) (QTIP's 0.968). Here: Lloyd iterations on 2^16 seeded
    samples. Stored with every layer, so a checkpoint never depends on regenerating it."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(2 ** 16, 2, generator=g, dtype=torch.float64)
    centres = data[: 2 ** Q].clone()
    for _ in range(25):
        assign = torch.cdist(data, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, data)
        counts = torch.bincount(assign, minlength=2 ** Q).unsqueeze(1).to(data.dtype)
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
    centres = centres / centres.std(unbiased=False) * (15 / 16) ** 0.5
    return centres.to(torch.float16).float()


def hyb_table(L: int, Q: int, lut: torch.Tensor) -> torch.Tensor:
    """(2^L, 2): HYB's value of each state: entry ((s (s + 1)) >> (L - Q - 1)) mod 2^Q of the small table, its first
    coordinate negated when bit L - 1 of s (s + 1) is set (QTIP's quantlut_sym, written for any L > Q)."""
    s = torch.arange(2 ** L, dtype=torch.int64)
    h = s * (s + 1)
    vals = lut.float()[(h >> (L - Q - 1)) & (2 ** Q - 1)].clone()
    vals[:, 0] *= 1 - 2 * ((h >> (L - 1)) & 1).float()
    return vals


@dataclass(frozen=True)
class Trellis:
    """QTIP's bitshift trellis: L state bits, k bits per weight, V weights per step, and a code: 1MAD or 3INST
    (computed, V = 1) or HYB (V = 2, a table of 2^Q 2-D points hashed from the state; `lut` that table, default
    `hyb_default_lut(Q)`)."""

    L: int
    k: int
    V: int = 1
    code: str = "1mad"
    Q: int = 9
    lut: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        check_trellis(self.L, self.k, self.V, self.code, self.Q)
        if self.code == "hyb":
            lut = hyb_default_lut(self.Q) if self.lut is None else self.lut.float()
            if tuple(lut.shape) != (2 ** self.Q, 2):
                raise ValueError(f"trellis: HYB's table must be (2^Q, 2) = ({2 ** self.Q}, 2), got {tuple(lut.shape)}")
            object.__setattr__(self, "lut", lut)
            object.__setattr__(self, "_table", hyb_table(self.L, self.Q, lut))
        else:
            object.__setattr__(self, "_table", code_table(self.code, self.L))

    @property
    def kv(self) -> int:
        return self.k * self.V

    def table(self) -> torch.Tensor:
        """(2^L, V) float32: the value every state emits."""
        return self._table

    def rms(self) -> float:
        """The code's root mean square value over all states (QTIP scales each layer to a multiple of it)."""
        return float(self.table().double().square().mean().sqrt())

    def steps(self, T: int) -> int:
        if T % self.V or (T // self.V) * self.kv < self.L:
            raise ConfigError(f"trellis: a sequence of {T} weights must be a multiple of V = {self.V} and hold at "
                              f"least L = {self.L} bits (k T >= L)")
        return T // self.V

    # ---------------------------------------------------------------------------------------------- search

    def viterbi(self, X: torch.Tensor, overlap: torch.Tensor | None = None, chunk: int | None = None):
        """The minimum squared-error state path of each row of X (B, T): (states (B, T/V) int64, cost (B,)).

        With `overlap` (B,) the path must start in a state whose top L - kV bits are the overlap and end in one whose
        low L - kV bits are it (the tail-biting constraint for that overlap). Exact dynamic programming: per step,
        the best predecessor of every state among the 2^kV states that shift into it.
        """
        B = X.shape[0]
        n = self.steps(X.shape[1])
        if chunk is None:  # back-pointers and costs of about 64 MB per chunk
            chunk = viterbi_chunk(n, self.L, self.kv)
        if B > chunk:
            parts = [self.viterbi(X[i:i + chunk], None if overlap is None else overlap[i:i + chunk], chunk)
                     for i in range(0, B, chunk)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        L, kv = self.L, self.kv
        S, P = 2 ** L, 2 ** (L - kv)  # states; shared parts (L - kV bits that two consecutive states share)
        vals = self.table().to(device=X.device, dtype=X.dtype)  # (S, V)
        Xs = X.reshape(B, n, self.V)
        state = torch.arange(S, device=X.device)

        def err(t):  # (B, S), a fresh tensor the step may overwrite
            if self.V == 1:
                return (Xs[:, t, :] - vals[:, 0]).square_()
            return (Xs[:, t, None, :] - vals).square().sum(-1)

        cost = err(0)
        inf = torch.tensor(float("inf"), dtype=X.dtype, device=X.device)
        if overlap is not None:
            cost = torch.where((state >> kv)[None, :] == overlap[:, None], cost, inf)
        back = torch.empty(n, B, P, dtype=torch.uint8, device=X.device)
        for t in range(1, n):
            # predecessors of a state with shared part p are j * P + p, j < 2^kV: a view, min over j
            best, arg = cost.view(B, 2 ** kv, P).min(1)
            back[t] = arg.to(torch.uint8)
            cost = err(t).view(B, P, 2 ** kv).add_(best.unsqueeze(-1)).view(B, S)
        if overlap is not None:
            cost = torch.where((state & (P - 1))[None, :] == overlap[:, None], cost, inf)
        final_cost, last = cost.min(1)
        states = torch.empty(B, n, dtype=torch.int64, device=X.device)
        states[:, n - 1] = last
        for t in range(n - 1, 0, -1):
            p = states[:, t] >> kv
            j = back[t].gather(1, p.unsqueeze(1)).squeeze(1).to(torch.int64)
            states[:, t - 1] = j * P + p
        return states, final_cost

    def quantize(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tail-biting encoding of each row of X (B, T), as QTIP does: the state at the start is taken from a free
        search of the sequence rotated by half its length (so the start sits mid-path), then the path is searched
        again constrained to that overlap. Returns (symbols (B, T/V) uint8, X_hat (B, T))."""
        n = self.steps(X.shape[1])
        half = n // 2
        rolled, _ = self.viterbi(torch.roll(X, half * self.V, dims=1))
        overlap = rolled[:, half] >> self.kv
        states, _ = self.viterbi(X, overlap)
        return self.symbols(states), self.decode_states(states)

    # ---------------------------------------------------------------------------------------------- codes

    def symbols(self, states: torch.Tensor) -> torch.Tensor:
        """The top kV bits of every state: what a tail-biting path stores."""
        return (states >> (self.L - self.kv)).to(torch.uint8)

    def states(self, symbols: torch.Tensor) -> torch.Tensor:
        """(B, n) symbols -> (B, n) states: state i is the L-bit window at bit i kV of the circular stream."""
        sym = symbols.to(torch.int64)
        m = -(-self.L // self.kv)  # symbols a window touches
        acc = torch.zeros_like(sym)
        for j in range(m):
            acc = (acc << self.kv) | torch.roll(sym, -j, dims=1)
        return acc >> (m * self.kv - self.L)

    def decode_states(self, states: torch.Tensor) -> torch.Tensor:
        vals = self.table().to(states.device)
        return vals[states].reshape(states.shape[0], -1)

    def decode(self, symbols: torch.Tensor) -> torch.Tensor:
        """(B, n) symbols -> (B, n V) values."""
        return self.decode_states(self.states(symbols))


def check_trellis(L: int, k: int, V: int, code: str, Q: int = 9) -> None:
    """Refuse a trellis that cannot be built or stored, naming the parameter."""
    if code not in CODES:
        raise ConfigError(f"trellis: unknown code '{code}'; built: {', '.join(CODES)}")
    if V != (2 if code == "hyb" else 1):
        raise ConfigError(f"trellis: code {code} emits {2 if code == 'hyb' else 1} weight(s) per state, got V = {V}")
    if code == "hyb" and not 1 <= Q < L:
        raise ConfigError(f"trellis: HYB's table of 2^Q points needs 1 <= Q < L = {L}, got Q = {Q}")
    if not 1 <= k <= 8 or k * V > 8:
        raise ConfigError(f"trellis: k V (bits per step) must be between 1 and 8, got k = {k}, V = {V}")
    if not k * V < L <= 24:
        raise ConfigError(f"trellis: L (state bits) must be above k V = {k * V} and at most 24, got {L}")


class TrellisProjection:
    """BlockLDLQ's block step (`quantlib.solvers.loops.ErrorFeedback.run_blocks`): a block of ty columns, all rows,
    cut into tiles of tx rows, each tile one sequence quantized by the trellis. Records the symbols."""

    def __init__(self, trellis: Trellis, d_out: int, d_in: int, tile: tuple[int, int]):
        self.trellis, self.tile = trellis, tile
        tx, ty = tile
        self.d_out, self.d_in = d_out, d_in
        self.buffer = torch.zeros(d_out // tx, d_in // ty, tx * ty // trellis.V, dtype=torch.uint8)

    def __call__(self, k0: int, targets: torch.Tensor) -> torch.Tensor:
        """targets (ty, d_out): the block's columns as rows (the loop's transposed layout)."""
        tx, ty = self.tile
        seqs = targets.T.reshape(self.d_out // tx, tx * ty)  # tile rows one after another
        symbols, values = self.trellis.quantize(seqs)
        self.buffer[:, k0 // ty] = symbols.cpu()
        return values.reshape(self.d_out, ty).T

    def symbols(self) -> torch.Tensor:
        """(n_sequences, T/V): row tile major, then column tile."""
        return self.buffer.reshape(-1, self.buffer.shape[-1])


def tiles_to_weight(values: torch.Tensor, rows: int, cols: int, tile: tuple[int, int]) -> torch.Tensor:
    """(n_sequences, tx ty) in row-tile-major order -> (rows, cols)."""
    tx, ty = tile
    return values.reshape(rows // tx, cols // ty, tx, ty).permute(0, 2, 1, 3).reshape(rows, cols)


def weight_to_tiles(W: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    rows, cols = W.shape
    tx, ty = tile
    return W.reshape(rows // tx, tx, cols // ty, ty).permute(0, 2, 1, 3).reshape(-1, tx * ty)


@dataclass
class TrellisQuantized:
    format = "trellis"
    symbols: torch.Tensor  # (n_sequences, T/V) uint8
    scales: torch.Tensor  # (n_segments,) float32
    seeds: torch.Tensor  # (n_segments, 2) int64: output-side, input-side sign seeds
    segments: torch.Tensor  # (n_segments,) int64: rows per segment
    d_in: int
    trellis: Trellis
    tile: tuple[int, int]

    def __post_init__(self):
        tx, ty = self.tile
        rows = int(self.segments.sum())
        n = tx * ty // self.trellis.V
        if any(int(r) % tx for r in self.segments) or self.d_in % ty:
            raise ValueError(f"trellis: segments {self.segments.tolist()} x {self.d_in} are not whole tiles {tx}x{ty}")
        if tuple(self.symbols.shape) != (rows // tx * (self.d_in // ty), n):
            raise ValueError(f"trellis: {tuple(self.symbols.shape)} symbols do not fit a ({rows}, {self.d_in}) "
                             f"weight in {tx}x{ty} tiles")

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.segments.sum()), self.d_in

    @property
    def bits_per_weight(self) -> float:
        rows, cols = self.shape
        table = 16 * self.trellis.lut.numel() if self.trellis.code == "hyb" else 0
        return self.trellis.k + (16 * len(self.segments) + table) / (rows * cols)

    def _sequences_per_row_tile(self) -> int:
        return self.d_in // self.tile[1]

    def dequantize(self) -> torch.Tensor:
        values = self.trellis.decode(self.symbols)
        out, s0 = [], 0
        for i, rows in enumerate(self.segments.tolist()):
            s1 = s0 + rows // self.tile[0] * self._sequences_per_row_tile()
            Wt = tiles_to_weight(values[s0:s1], rows, self.d_in, self.tile) * self.scales[i]
            inc = Incoherence(rows, self.d_in, int(self.seeds[i, 0]), int(self.seeds[i, 1]))
            out.append(inc.unweight(Wt.double()).float())
            s0 = s1
        return torch.cat(out)

    def select_rows(self, rows: slice) -> "TrellisQuantized":
        """The segments covering `rows` exactly (a segment's rows are mixed by its transform, so it cannot be cut)."""
        starts = [0] + torch.cumsum(self.segments, 0).tolist()
        start, stop = rows.indices(starts[-1])[:2]
        if start not in starts or stop not in starts:
            raise ValueError(f"trellis: rows {start}:{stop} cut a segment (boundaries {starts}); the solver must be "
                             "given the stacked layers' row counts")
        a, b = starts.index(start), starts.index(stop)
        per = self._sequences_per_row_tile()
        return TrellisQuantized(self.symbols[start // self.tile[0] * per:stop // self.tile[0] * per],
                                self.scales[a:b], self.seeds[a:b], self.segments[a:b], self.d_in, self.trellis,
                                self.tile)

    @classmethod
    def stack_rows(cls, parts: list["TrellisQuantized"]) -> "TrellisQuantized":
        first = parts[0]
        if any(p.trellis != first.trellis or p.tile != first.tile or p.d_in != first.d_in for p in parts):
            raise ValueError("trellis: only parts with one trellis, tile and input size stack")
        return cls(torch.cat([p.symbols for p in parts]), torch.cat([p.scales for p in parts]),
                   torch.cat([p.seeds for p in parts]), torch.cat([p.segments for p in parts]), first.d_in,
                   first.trellis, first.tile)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {"trellis": pack_codes(self.symbols, self.trellis.kv), "scales": self.scales.float().contiguous(),
               "seeds": self.seeds.to(torch.int64).contiguous(), "segments": self.segments.to(torch.int64).contiguous()}
        if self.trellis.code == "hyb":
            out["tlut"] = self.trellis.lut.to(torch.float16).contiguous()  # float16-exact: encoding used these values
        return out

    def meta(self) -> dict:
        t = self.trellis
        meta = {"format": self.format, "bits": t.k, "L": t.L, "V": t.V, "code": t.code, "tile": list(self.tile),
                "shape": list(self.shape)}
        if t.code == "hyb":
            meta["Q"] = t.Q
        return meta

    @classmethod
    def from_tensors(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "TrellisQuantized":
        trellis = Trellis(meta["L"], meta["bits"], meta["V"], meta["code"], meta.get("Q", 9), tensors.get("tlut"))
        tile = tuple(meta["tile"])
        d_out, d_in = meta["shape"]
        n = tile[0] * tile[1] // trellis.V
        symbols = unpack_codes(tensors["trellis"], trellis.kv, n)
        rep = cls(symbols, tensors["scales"].float(), tensors["seeds"].to(torch.int64),
                  tensors["segments"].to(torch.int64), d_in, trellis, tile)
        if rep.shape != (d_out, d_in):
            raise ValueError(f"trellis: stored segments give {rep.shape}, metadata says {(d_out, d_in)}")
        return rep
