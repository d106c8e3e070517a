"""Public entry points of `quantlib.kernels`: dequantize, GEMV and matmul for the `uniform`, `lut` and `bcq` packed
formats and the `trellis` format (QTIP), with argument validation and the choice between the Triton kernels and the
plain-torch reference.

Layouts (fixed by the checkpoint formats, docs/formats.md), for a layer (d_out, d_in), n_groups = d_in / group_size
(1 when group_size == -1):
- uniform: `qweight` int32 (d_out, ceil(d_in * bits / 32)), each row an LSB-first stream of `bits`-bit codes (code j
  at bit j * bits, possibly across a word boundary); `scales`, `zeros` floating (d_out, n_groups).
  w = (q - zeros) * scales, evaluated in scales.dtype.
- lut: `qweight` as uniform; `lut` floating (d_out, 2^bits). w[r, j] = lut[r, q[r, j]], in lut.dtype.
- bcq: `planes` int32 (nb, d_out, ceil(d_in / 32)), plane i the 1-bit stream of signs (1 -> +1, 0 -> -1); `alpha`
  floating (d_out, n_groups, nb); `offset` floating (d_out, n_groups).
  w = sum_i alpha_i * sign_i + offset, summed in float32, in alpha.dtype.
- trellis: quantlib.formats.trellis's stored tensors; W = A^T W_t B per segment, W_t decoded by the backend in the
  transformed domain, the transforms applied here in torch (kernels/README.md).

Policies:
- Every check runs before any work and raises ValueError naming the offending tensor or argument.
- Non-contiguous tensors are accepted: they are copied to contiguous memory here (`.contiguous()`, free when
  already contiguous), because the Triton kernels index row-major memory directly.
- `zeros` is cast to scales.dtype (the weight is evaluated in the scales' dtype); `lut`, `alpha` and `offset` are
  used in their own dtype.
- Outputs: dequant_* in the scale / table / alpha dtype; gemv_* and matmul_* in x.dtype. GEMV accumulates in float32
  over the weight already rounded to its dequantized dtype, so gemv(x) == x.float() @ dequant(...).float().T up to
  summation order.
- backend: "torch" always works; "triton" needs the triton package and either CUDA tensors or Triton's interpreter
  (TRITON_INTERPRET=1 in the environment now and already when triton was first imported: Triton decides at import);
  "auto" takes triton when those hold, else torch.
"""

from __future__ import annotations

import torch

from quantlib.errors import ConfigError
from quantlib.transforms.hadamard import hadamard_split

from . import torch_ops, triton_ops, triton_trellis

BACKENDS = ("auto", "torch", "triton")
MAX_GEMV_ROWS = triton_ops.MAX_GEMV_ROWS


# ---------------------------------------------------------------------------------------------------------------- #
# Backend choice


def resolve_backend(backend: str, device: torch.device) -> str:
    """"torch" or "triton" for tensors on `device`; ValueError when an explicit "triton" cannot run there."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(map(repr, BACKENDS))}")
    if backend == "torch":
        return "torch"
    runnable = device.type == "cuda" or triton_ops.interpret_enabled()
    if backend == "auto":
        return "triton" if triton_ops.AVAILABLE and runnable else "torch"
    if not triton_ops.AVAILABLE:
        raise ValueError("backend='triton' needs the triton package (pip install 'quantlib[kernels]'); "
                         "use backend='torch' or 'auto'")
    if not runnable:
        if triton_ops.interpret_requested():  # set, but after triton was imported: too late for its library
            raise ValueError(f"backend='triton' on {device.type} tensors: TRITON_INTERPRET=1 was set after triton "
                             f"was imported, and Triton reads it at import; set it before the first `import triton` "
                             f"(e.g. export it in the shell), move the tensors to CUDA, or use backend='torch'")
        raise ValueError(f"backend='triton' on {device.type} tensors needs Triton's interpreter: set the environment "
                         f"variable TRITON_INTERPRET=1 (before triton is first imported), move the tensors to CUDA, "
                         f"or use backend='torch'")
    return "triton"


# ---------------------------------------------------------------------------------------------------------------- #
# Validation


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_tensor(name: str, t, *, floating: bool = False, int32: bool = False, dim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if int32 and t.dtype != torch.int32:
        raise ValueError(f"{name} must be an int32 tensor (packed codes), got {t.dtype}")
    if floating and not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got {t.dim()}-D of shape {tuple(t.shape)}")


def _check_shape(name: str, t: torch.Tensor, expected: tuple, what: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} = {what}, got {tuple(t.shape)}")


def _check_bits(bits, low: int, high: int, fmt: str) -> None:
    if not _is_int(bits) or not low <= bits <= high:
        raise ValueError(f"bits must be an integer in {low}..{high} for the {fmt} format, got {bits!r}")


def _check_d_in(d_in) -> None:
    if not _is_int(d_in) or d_in < 1:
        raise ValueError(f"d_in must be a positive integer, got {d_in!r}")


def _n_groups(group_size, d_in: int) -> int:
    if not _is_int(group_size) or not (group_size == -1 or group_size > 0):
        raise ValueError(f"group_size must be a positive integer or -1 (one group per row), got {group_size!r}")
    if group_size != -1 and d_in % group_size:
        raise ValueError(f"group_size {group_size} does not divide d_in {d_in}")
    return 1 if group_size == -1 else d_in // group_size


def _check_devices(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device; got {listing}")
    return next(iter(devices.values()))


def _check_x(x, *, gemv: bool) -> None:
    _check_tensor("x", x, floating=True)
    if gemv:
        if x.dim() != 2:
            raise ValueError(f"x must be 2-D (n, d_in) for a GEMV, got shape {tuple(x.shape)}")
        if x.shape[0] > MAX_GEMV_ROWS:
            raise ValueError(f"x has {x.shape[0]} rows; the GEMV kernels take at most {MAX_GEMV_ROWS} "
                             f"(use matmul_*, which dequantizes and multiplies for more)")
    elif x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., d_in)")
    if x.shape[-1] < 1:
        raise ValueError(f"x must have a positive last dimension d_in, got shape {tuple(x.shape)}")


def _uniform_args(qweight, scales, zeros, bits, group_size, d_in, x=None):
    """Validated, contiguous (qweight, scales, zeros) with zeros in scales.dtype."""
    _check_bits(bits, 2, 8, "uniform")
    _check_d_in(d_in)
    n_groups = _n_groups(group_size, d_in)
    _check_tensor("qweight", qweight, int32=True, dim=2)
    _check_tensor("scales", scales, floating=True, dim=2)
    _check_tensor("zeros", zeros, floating=True, dim=2)
    d_out = qweight.shape[0]
    _check_shape("qweight", qweight, (d_out, -(-d_in * bits // 32)),
                 f"(d_out, ceil(d_in * bits / 32)) for d_in={d_in}, bits={bits}")
    _check_shape("scales", scales, (d_out, n_groups), f"(d_out, n_groups) for d_in={d_in}, group_size={group_size}")
    _check_shape("zeros", zeros, (d_out, n_groups), f"(d_out, n_groups) for d_in={d_in}, group_size={group_size}")
    extra = {} if x is None else {"x": x}
    device = _check_devices(qweight=qweight, scales=scales, zeros=zeros, **extra)
    return device, (qweight.contiguous(), scales.contiguous(), zeros.to(scales.dtype).contiguous())


def _lut_args(qweight, lut, bits, d_in, x=None):
    _check_bits(bits, 1, 8, "lut")
    _check_d_in(d_in)
    _check_tensor("qweight", qweight, int32=True, dim=2)
    _check_tensor("lut", lut, floating=True, dim=2)
    d_out = qweight.shape[0]
    _check_shape("qweight", qweight, (d_out, -(-d_in * bits // 32)),
                 f"(d_out, ceil(d_in * bits / 32)) for d_in={d_in}, bits={bits}")
    _check_shape("lut", lut, (d_out, 2 ** bits), f"(d_out, 2^bits) for bits={bits}")
    extra = {} if x is None else {"x": x}
    device = _check_devices(qweight=qweight, lut=lut, **extra)
    return device, (qweight.contiguous(), lut.contiguous())


def _bcq_args(planes, alpha, offset, group_size, d_in, x=None):
    _check_d_in(d_in)
    n_groups = _n_groups(group_size, d_in)
    _check_tensor("planes", planes, int32=True, dim=3)
    _check_tensor("alpha", alpha, floating=True, dim=3)
    _check_tensor("offset", offset, floating=True, dim=2)
    nb, d_out = planes.shape[0], planes.shape[1]
    if not 1 <= nb <= 8:
        raise ValueError(f"planes has {nb} bit planes (its first dimension); binary coding takes 1 to 8")
    _check_shape("planes", planes, (nb, d_out, -(-d_in // 32)), f"(nb, d_out, ceil(d_in / 32)) for d_in={d_in}")
    _check_shape("alpha", alpha, (d_out, n_groups, nb),
                 f"(d_out, n_groups, nb) for d_in={d_in}, group_size={group_size}, nb={nb}")
    _check_shape("offset", offset, (d_out, n_groups), f"(d_out, n_groups) for d_in={d_in}, group_size={group_size}")
    extra = {} if x is None else {"x": x}
    device = _check_devices(planes=planes, alpha=alpha, offset=offset, **extra)
    return device, (planes.contiguous(), alpha.contiguous(), offset.contiguous())


TRELLIS_CODES = torch_ops.TRELLIS_CODES


def _check_int_tensor(name: str, t, dim: int) -> None:
    _check_tensor(name, t, dim=dim)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")


def _trellis_args(trellis, scales, seeds, segments, bits, L, V, code, tile, d_in, tlut, x=None):
    """Validated (device, (trellis, scales float32, tlut), segments list, transforms list)."""
    if code not in TRELLIS_CODES:
        raise ValueError(f"code must be one of {', '.join(map(repr, TRELLIS_CODES))} for the trellis format, "
                         f"got {code!r}")
    if V != (2 if code == "hyb" else 1):
        raise ValueError(f"V must be {2 if code == 'hyb' else 1} for the trellis code {code!r} (weights per state), "
                         f"got {V!r}")
    if not _is_int(bits) or not 1 <= bits <= 8 // V:
        raise ValueError(f"bits must be an integer in 1..{8 // V} for the trellis format with V = {V} (k V <= 8), "
                         f"got {bits!r}")
    if not _is_int(L) or not bits * V < L <= 24:
        raise ValueError(f"L (state bits) must be an integer above k V = {bits * V} and at most 24, got {L!r}")
    if (not isinstance(tile, (tuple, list)) or len(tile) != 2 or not all(_is_int(t) and t > 0 for t in tile)):
        raise ValueError(f"tile must be two positive integers (rows, columns), got {tile!r}")
    tx, ty = tile
    T = tx * ty
    if T % V or T * bits < L:
        raise ValueError(f"tile {tx}x{ty} holds {T} weights: it must be a multiple of V = {V} and hold at least "
                         f"L = {L} bits (T k >= L)")
    _check_d_in(d_in)
    if d_in % ty:
        raise ValueError(f"d_in {d_in} is not a multiple of the tile's columns {ty}")
    _check_tensor("trellis", trellis, int32=True, dim=2)
    _check_tensor("scales", scales, floating=True, dim=1)
    _check_int_tensor("seeds", seeds, 2)
    _check_int_tensor("segments", segments, 1)
    n_seg = segments.shape[0]
    if n_seg < 1:
        raise ValueError("segments must hold at least one segment (rows per segment)")
    _check_shape("scales", scales, (n_seg,), "(n_segments,)")
    _check_shape("seeds", seeds, (n_seg, 2), "(n_segments, 2)")
    if code == "hyb":
        if tlut is None:
            raise ValueError("tlut (HYB's table, (2^Q, 2)) is required with the code 'hyb'")
        _check_tensor("tlut", tlut, floating=True, dim=2)
        q = tlut.shape[0].bit_length() - 1
        if tlut.shape[1] != 2 or tlut.shape[0] != 2 ** q or not 1 <= q < L:
            raise ValueError(f"tlut must have shape (2^Q, 2) with 1 <= Q < L = {L}, got {tuple(tlut.shape)}")
    elif tlut is not None:
        raise ValueError(f"tlut is only for the code 'hyb'; code {code!r} is computed from the state")
    extra = {} if x is None else {"x": x}
    if tlut is not None:
        extra["tlut"] = tlut
    device = _check_devices(trellis=trellis, scales=scales, seeds=seeds, segments=segments, **extra)
    rows = [int(r) for r in segments.tolist()]
    if any(r < 1 or r % tx for r in rows):
        raise ValueError(f"segments {rows} must be positive multiples of the tile's rows {tx}")
    for name, size in [("d_in", d_in)] + [("segments", r) for r in sorted(set(rows))]:
        try:
            hadamard_split(size)
        except ConfigError as exc:
            raise ValueError(f"{name}: {size} has no Hadamard transform for the incoherence processing "
                             f"({exc})") from exc
    n_seq = sum(rows) // tx * (d_in // ty)
    _check_shape("trellis", trellis, (n_seq, -(-T * bits // 32)),
                 f"(n_sequences, ceil(T k / 32)) for segments {rows}, d_in={d_in}, tile {tx}x{ty}, k={bits}")
    transforms = torch_ops.trellis_transforms(seeds.tolist(), rows, d_in)
    tensors = (trellis.contiguous(), scales.float().contiguous(), None if tlut is None else tlut.contiguous())
    return device, tensors, rows, transforms


def _impl(backend: str):
    return triton_ops if backend == "triton" else torch_ops


def _trellis_impl(backend: str):
    return triton_trellis if backend == "triton" else torch_ops


# ---------------------------------------------------------------------------------------------------------------- #
# uniform


def dequant_uniform(qweight, scales, zeros, bits: int, group_size: int, d_in: int, backend: str = "auto"):
    """The (d_out, d_in) weight in scales.dtype: (q - zeros) * scales evaluated in scales.dtype."""
    device, (qweight, scales, zeros) = _uniform_args(qweight, scales, zeros, bits, group_size, d_in)
    return _impl(resolve_backend(backend, device)).dequant_uniform(qweight, scales, zeros, bits, group_size, d_in)


def gemv_uniform(x, qweight, scales, zeros, bits: int, group_size: int, backend: str = "auto"):
    """x (n <= 8, d_in) -> x @ w.T (n, d_out) in x.dtype, accumulated in float32."""
    _check_x(x, gemv=True)
    device, (qweight, scales, zeros) = _uniform_args(qweight, scales, zeros, bits, group_size, x.shape[-1], x)
    impl = _impl(resolve_backend(backend, device))
    return impl.gemv_uniform(x.contiguous(), qweight, scales, zeros, bits, group_size)


def matmul_uniform(x, qweight, scales, zeros, bits: int, group_size: int, backend: str = "auto"):
    """x (..., d_in) -> (..., d_out) in x.dtype: the GEMV kernel for <= 8 rows on the triton backend, else
    dequantize and `x @ w.T` in x.dtype."""
    _check_x(x, gemv=False)
    device, args = _uniform_args(qweight, scales, zeros, bits, group_size, x.shape[-1], x)
    return _matmul(x, resolve_backend(backend, device), "uniform", args, (bits, group_size))


# ---------------------------------------------------------------------------------------------------------------- #
# lut


def dequant_lut(qweight, lut, bits: int, d_in: int, backend: str = "auto"):
    """The (d_out, d_in) weight lut[r, q[r, j]] in lut.dtype."""
    device, (qweight, lut) = _lut_args(qweight, lut, bits, d_in)
    return _impl(resolve_backend(backend, device)).dequant_lut(qweight, lut, bits, d_in)


def gemv_lut(x, qweight, lut, bits: int, backend: str = "auto"):
    """x (n <= 8, d_in) -> (n, d_out) in x.dtype, accumulated in float32."""
    _check_x(x, gemv=True)
    device, (qweight, lut) = _lut_args(qweight, lut, bits, x.shape[-1], x)
    return _impl(resolve_backend(backend, device)).gemv_lut(x.contiguous(), qweight, lut, bits)


def matmul_lut(x, qweight, lut, bits: int, backend: str = "auto"):
    """x (..., d_in) -> (..., d_out) in x.dtype (see matmul_uniform)."""
    _check_x(x, gemv=False)
    device, args = _lut_args(qweight, lut, bits, x.shape[-1], x)
    return _matmul(x, resolve_backend(backend, device), "lut", args, (bits,))


# ---------------------------------------------------------------------------------------------------------------- #
# bcq


def dequant_bcq(planes, alpha, offset, group_size: int, d_in: int, backend: str = "auto"):
    """The (d_out, d_in) weight sum_i alpha_i sign_i + offset, summed in float32, in alpha.dtype."""
    device, (planes, alpha, offset) = _bcq_args(planes, alpha, offset, group_size, d_in)
    return _impl(resolve_backend(backend, device)).dequant_bcq(planes, alpha, offset, group_size, d_in)


def gemv_bcq(x, planes, alpha, offset, group_size: int, backend: str = "auto"):
    """x (n <= 8, d_in) -> (n, d_out) in x.dtype, accumulated in float32."""
    _check_x(x, gemv=True)
    device, (planes, alpha, offset) = _bcq_args(planes, alpha, offset, group_size, x.shape[-1], x)
    return _impl(resolve_backend(backend, device)).gemv_bcq(x.contiguous(), planes, alpha, offset, group_size)


def matmul_bcq(x, planes, alpha, offset, group_size: int, backend: str = "auto"):
    """x (..., d_in) -> (..., d_out) in x.dtype (see matmul_uniform)."""
    _check_x(x, gemv=False)
    device, args = _bcq_args(planes, alpha, offset, group_size, x.shape[-1], x)
    return _matmul(x, resolve_backend(backend, device), "bcq", args, (group_size,))


# ---------------------------------------------------------------------------------------------------------------- #
# trellis (QTIP): the kernels decode in the transformed domain; the incoherence transform is applied in torch.


def dequant_trellis(trellis, scales, seeds, segments, bits: int, L: int, V: int, code: str, tile, d_in: int,
                    tlut=None, backend: str = "auto", transformed: bool = False):
    """The (d_out, d_in) float32 weight of a `trellis` layer (quantlib.formats.trellis's stored tensors), equal bit
    for bit to TrellisQuantized.dequantize(). The backend decodes W_t = scale * code(states) in the transformed
    domain (the Triton kernel or the torch reference: the same float32 values); W = A^T W_t B is then computed in
    torch, per segment, in float64. With `transformed`, W_t itself."""
    device, (trellis, scales, tlut), rows, transforms = _trellis_args(trellis, scales, seeds, segments, bits, L, V,
                                                                       code, tile, d_in, tlut)
    impl = _trellis_impl(resolve_backend(backend, device))
    Wt = impl.dequant_trellis_transformed(trellis, scales, rows, bits, L, V, code, tuple(tile), d_in, tlut)
    return Wt if transformed else torch_ops.trellis_unweight(Wt, transforms, rows)


def gemv_trellis(x, trellis, scales, seeds, segments, bits: int, L: int, V: int, code: str, tile, tlut=None,
                 backend: str = "auto"):
    """x (n <= 8, d_in) -> x @ W.T (n, d_out) in x.dtype. torch: x.float() @ dequant_trellis(...).T. triton: in the
    transformed domain as QTIP does, y = A^T (W_t (B x)), B x and A^T in torch (float32), W_t x in the kernel
    (float32 accumulation): equal to the torch result up to float32 round-off."""
    _check_x(x, gemv=True)
    device, (trellis, scales, tlut), rows, transforms = _trellis_args(trellis, scales, seeds, segments, bits, L, V,
                                                                       code, tile, x.shape[-1], tlut, x)
    impl = _trellis_impl(resolve_backend(backend, device))
    return impl.gemv_trellis(x.contiguous(), trellis, scales, transforms, rows, bits, L, V, code, tuple(tile), tlut)


def matmul_trellis(x, trellis, scales, seeds, segments, bits: int, L: int, V: int, code: str, tile, tlut=None,
                   backend: str = "auto"):
    """x (..., d_in) -> (..., d_out) in x.dtype: the GEMV for <= 8 rows on the triton backend, else
    dequant_trellis then `x @ w.T` in x.dtype."""
    _check_x(x, gemv=False)
    device, args, rows, transforms = _trellis_args(trellis, scales, seeds, segments, bits, L, V, code, tile,
                                                   x.shape[-1], tlut, x)
    trellis, scales, tlut = args
    backend = resolve_backend(backend, device)
    impl = _trellis_impl(backend)
    d_in, d_out = x.shape[-1], sum(rows)
    flat = x.reshape(-1, d_in)
    if flat.shape[0] == 0:
        return x.new_zeros(*x.shape[:-1], d_out)
    if backend == "triton" and flat.shape[0] <= MAX_GEMV_ROWS:
        y = impl.gemv_trellis(flat.contiguous(), trellis, scales, transforms, rows, bits, L, V, code, tuple(tile),
                              tlut)
    else:
        Wt = impl.dequant_trellis_transformed(trellis, scales, rows, bits, L, V, code, tuple(tile), d_in, tlut)
        y = flat @ torch_ops.trellis_unweight(Wt, transforms, rows).to(x.dtype).T
    return y.reshape(*x.shape[:-1], d_out)


# ---------------------------------------------------------------------------------------------------------------- #


def _matmul(x: torch.Tensor, backend: str, fmt: str, tensors: tuple, params: tuple) -> torch.Tensor:
    """Shared tail of matmul_*: arguments already validated and normalized."""
    impl = _impl(backend)
    d_in = x.shape[-1]
    d_out = tensors[0].shape[-2]  # qweight (d_out, words) or planes (nb, d_out, words)
    rows = x.reshape(-1, d_in)
    if rows.shape[0] == 0:
        return x.new_zeros(*x.shape[:-1], d_out)
    if backend == "triton" and rows.shape[0] <= MAX_GEMV_ROWS:
        y = getattr(impl, f"gemv_{fmt}")(rows.contiguous(), *tensors, *params)
    else:
        w = getattr(impl, f"dequant_{fmt}")(*tensors, *params, d_in)
        y = rows @ w.to(x.dtype).T
    return y.reshape(*x.shape[:-1], d_out)
