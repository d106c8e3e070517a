"""Public entry points of `quantlib.kernels`: dequantize, GEMV and matmul for the `uniform`, `lut` and `bcq` packed
formats, with argument validation and the choice between the Triton kernels and the plain-torch reference.

Layouts (fixed by the checkpoint formats, docs/formats.md), for a layer (d_out, d_in), n_groups = d_in / group_size
(1 when group_size == -1):
- uniform: `qweight` int32 (d_out, ceil(d_in * bits / 32)), each row an LSB-first stream of `bits`-bit codes (code j
  at bit j * bits, possibly across a word boundary); `scales`, `zeros` floating (d_out, n_groups).
  w = (q - zeros) * scales, evaluated in scales.dtype.
- lut: `qweight` as uniform; `lut` floating (d_out, 2^bits). w[r, j] = lut[r, q[r, j]], in lut.dtype.
- bcq: `planes` int32 (nb, d_out, ceil(d_in / 32)), plane i the 1-bit stream of signs (1 -> +1, 0 -> -1); `alpha`
  floating (d_out, n_groups, nb); `offset` floating (d_out, n_groups).
  w = sum_i alpha_i * sign_i + offset, summed in float32, in alpha.dtype.

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

from . import torch_ops, triton_ops

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


def _impl(backend: str):
    return triton_ops if backend == "triton" else torch_ops


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
