"""Vector quantization: QTIP's trellis-coded quantization (format `trellis`)."""

from __future__ import annotations

from quantlib.catalog.names import Option
from quantlib.catalog.registry import Component, register
from quantlib.errors import ConfigError


def _check_qtip(spec) -> None:
    if spec.group_size != -1:
        raise ConfigError(f"qtip: one scale per layer; give no group size (w{spec.bits}, not "
                          f"w{spec.bits}g{spec.group_size})")
    if spec.opt("scale") <= 0:
        raise ConfigError(f"qtip: scale must be > 0, got {spec.opt('scale')}")
    for key in ("tile_rows", "tile_cols"):
        if spec.opt(key) < 1:
            raise ConfigError(f"qtip: {key} must be >= 1, got {spec.opt(key)}")
    if spec.opt("code_1mad") and spec.opt("code_3inst"):
        raise ConfigError("qtip: one code: 1mad or 3inst (neither: HYB)")
    hyb = code(spec) == "hyb"
    if not hyb and "hyb_bits" in dict(spec.options):
        raise ConfigError("qtip: 'hyb_bits' applies only to the HYB code; drop it")
    # The limits of quantlib.formats.trellis.check_trellis, here without torch. V (weights per step) follows from
    # the code: 2 for HYB, 1 for the computed codes.
    L, V, Q = spec.opt("trellis_L"), 2 if hyb else 1, spec.opt("hyb_bits")
    kv = spec.bits * V
    if not 1 <= kv <= 8:
        raise ConfigError(f"qtip: k V (bits per trellis step) must be between 1 and 8, got {kv}")
    if not kv < L <= 24:
        raise ConfigError(f"qtip: trellis_L (state bits) must be above k V = {kv} and at most 24, got {L}")
    if hyb and not 1 <= Q < L:
        raise ConfigError(f"qtip: HYB's table of 2^Q points needs 1 <= hyb_bits < trellis_L = {L}, got {Q}")
    tile = spec.opt("tile_rows") * spec.opt("tile_cols")
    if tile % V or tile * spec.bits < L:
        raise ConfigError("qtip: a tile (one trellis sequence) must be a multiple of V weights and hold at least L "
                          "bits (tile_rows tile_cols k >= L)")


def viterbi_chunk(steps: int, L: int, kv: int) -> int:
    """Sequences per Viterbi search (`quantlib.formats.trellis.Trellis.viterbi`): its back-pointers (steps x
    sequences x 2^(L - kV) bytes) and one float32 cost per state and sequence kept to about 64 MB together."""
    return max(1, (1 << 26) // (steps * 2 ** (L - kv) + 4 * 2 ** L))


def viterbi_bytes(spec, rows: int) -> int:
    """Peak bytes of one Viterbi search of BlockLDLQ's block step on a layer of `rows` output rows (one sequence per
    tile of the block's columns, float32 targets): the back-pointers, the running cost and the step's errors of
    every state ((2 + V) floats: HYB's V = 2 errors are summed from a V-wide copy), the best predecessor and its
    int64 index per shared part, and the paths found (the free search's and the tail-biting one's, int64). Measured
    (peak RSS of a search, 1MAD w2): L = 8, 3072 rows 4.2 MB (this 4.5); L = 12, 3072 rows 58 MB (60); L = 16, 240
    and 960 rows 66 and 83 MB (74, 74: the allocator keeps some of each chunk's freed back-pointers)."""
    V = 2 if code(spec) == "hyb" else 1
    L, kv = spec.opt("trellis_L"), spec.bits * V
    steps = spec.opt("tile_rows") * spec.opt("tile_cols") // V
    sequences = max(1, rows // spec.opt("tile_rows"))
    c = min(sequences, viterbi_chunk(steps, L, kv))
    states, shared = 2 ** L, 2 ** (L - kv)
    return steps * c * shared + c * states * 4 * (2 + V) + c * shared * 12 + 2 * sequences * steps * 8


def code(spec) -> str:
    """The trellis code a spec names: HYB unless 1mad or 3inst is set."""
    return "1mad" if spec.opt("code_1mad") else "3inst" if spec.opt("code_3inst") else "hyb"


register(Component(
    "qtip", "solver", "quantlib.solvers.qtip:solve", "QTIP", needs=("hessian",), takes_init=False,
    format="trellis", takes_guided=True,
    options=(
        # Defaults are the paper's (HYB with Q = 9 and V = 2, L = 16, 16 x 16 tiles, scale_override 0.9); on a CPU
        # a smaller L (tl10, tl12) keeps Viterbi affordable: its cost grows as 2^L per weight.
        Option("trellis_L", 16, int, "tl", "state bits L of the bitshift trellis"),
        Option("code_1mad", False, bool, "1mad", "QTIP's 1MAD computed code (V = 1) instead of HYB"),
        Option("code_3inst", False, bool, "3inst", "QTIP's 3INST computed code (V = 1) instead of HYB"),
        Option("hyb_bits", 9, int, "hybq", "HYB's table of 2^Q 2-D points: Q (QTIP's tlut_bits)"),
        Option("tile_rows", 16, int, "tx", "rows of a tile, one trellis sequence (QTIP's td_x)"),
        Option("tile_cols", 16, int, "ty", "columns of a tile and of BlockLDLQ's blocks (QTIP's td_y)"),
        Option("scale", 0.9, float, "wscale",
               "each layer's transformed weight is scaled to this times the code's rms (QTIP's scale_override)"),
        Option("hadamard_seed", 0, int, "hseed", "seed of the random signs of the Hadamard transforms"),
    ),
    check=_check_qtip,
    help="QTIP: random Hadamard incoherence processing on both sides, then BlockLDLQ with a tail-biting bitshift "
         "trellis (HYB, 1MAD or 3INST code, Viterbi) as each 16 x 16 tile's vector quantizer",
))
