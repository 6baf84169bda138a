"""RMSNorm forward + backward in Triton.

y = weight * (x * rstd).to(x.dtype), rstd = 1 / sqrt(mean(x^2) + eps), normalised in fp32 as
the reference (Llama/Qwen) does. The forward saves rstd [rows] fp32; the backward computes dx
row by row and dweight as per-program fp32 partial sums (a few programs per SM loop over rows),
reduced by one torch sum: no atomics.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import device_guard, next_pow2, num_programs_for


@triton.jit
def _rmsnorm_fwd(X, W, Y, RSTD, stride_x, stride_y, D, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
    xhat = (x * rstd).to(X.dtype.element_ty).to(tl.float32)  # the reference rounds here
    tl.store(Y + row * stride_y + cols, (xhat * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rmsnorm_bwd(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, N, D, rows_per_program,
                 BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, N)
    for row in range(row_start, row_end):
        row64 = tl.cast(row, tl.int64)
        x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row64)
        xhat = x * rstd
        dyw = dy * w
        dx = rstd * (dyw - xhat * (tl.sum(dyw * xhat, 0) / D))
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
    tl.store(DW_PARTIAL + pid * D + cols, dw, mask=mask)


def _rows(t):
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _warps(block):
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


@torch.library.custom_op("minillm_kernels::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    D = x.shape[-1]
    x2 = _rows(x)
    y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
    rstd = torch.empty(x.shape[:-1], device=x.device, dtype=torch.float32)
    block = next_pow2(D)
    with device_guard(x):
        _rmsnorm_fwd[(x2.shape[0],)](x2, weight, y, rstd, x2.stride(0), D, D, eps,
                                     BLOCK_D=block, num_warps=_warps(block))
    return y, rstd


@rms_norm_fwd.register_fake
def _(x, weight, eps):
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


@torch.library.custom_op("minillm_kernels::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    D = x.shape[-1]
    x2, dy2 = _rows(x), _rows(dy)
    N = x2.shape[0]
    dx = x.new_empty(x.shape)
    programs = num_programs_for(x, N)
    rows_per_program = triton.cdiv(N, programs)
    dw_partial = torch.empty(programs, D, device=x.device, dtype=torch.float32)
    block = next_pow2(D)
    with device_guard(x):
        _rmsnorm_bwd[(programs,)](dy2, x2, weight, rstd, dx, dw_partial, dy2.stride(0), x2.stride(0), D,
                                  N, D, rows_per_program, BLOCK_D=block, num_warps=_warps(block))
    return dx, dw_partial.sum(0).to(weight.dtype)


@rms_norm_bwd.register_fake
def _(dy, x, weight, rstd):
    return x.new_empty(x.shape), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx, dy, drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = rms_norm_bwd(dy, x, weight, rstd)
    return dx, dw, None


rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x, weight, eps=1e-6):
    """x [..., D], weight [D] -> weight * normalize(x), dtype promote(x, weight)."""
    return rms_norm_fwd(x, weight, eps)[0]
