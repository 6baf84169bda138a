"""Grouped matmul for mixture-of-experts layers, in Triton, with no host sync.

Rows of `x` [M, K] are sorted by expert: expert e owns rows [ends[e] - counts[e], ends[e]).
`grouped_mm(x, w, counts)` computes y[r] = x[r] @ w[e(r)] for w [E, K, N], every expert's rows
in one launch. The row counts stay on the device: the grid is sized for the worst case
(cdiv(M, BLOCK_M) + E row tiles) and each program looks its tile up in a small device-side
table, exiting when it has none. So an MoE layer needs no `.tolist()` of the counts and
torch.compile keeps it in one graph.

Backward: dx = grouped_mm(dy, w^T) (the same kernel on a transposed view of w, no copy) and
dw[e] = x_e^T @ dy_e (a second kernel: one program per (expert, K tile, N tile) looping over
the expert's rows). An expert with no rows gets a zero gradient.

Wrapped as torch.library custom ops ("minillm_kernels::grouped_mm" / "..._wgrad") with fake
and autograd registrations.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import INTERPRET, device_guard, dot_precision

# The row tile is fixed (the device-side tile table depends on it); the rest is autotuned on a GPU.
BLOCK_M = 16 if INTERPRET else 64


def _cfg(num_warps, num_stages, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


if INTERPRET:
    _FWD_CONFIGS = [_cfg(4, 1, BLOCK_N=32, BLOCK_K=16)]
    _WGRAD_CONFIGS = [_cfg(4, 1, BLOCK_K=32, BLOCK_N=32)]
else:
    _FWD_CONFIGS = [
        _cfg(4, 3, BLOCK_N=128, BLOCK_K=64),
        _cfg(8, 3, BLOCK_N=128, BLOCK_K=64),
        _cfg(4, 4, BLOCK_N=64, BLOCK_K=64),
        _cfg(8, 4, BLOCK_N=256, BLOCK_K=32),
    ]
    _WGRAD_CONFIGS = [
        _cfg(4, 3, BLOCK_K=64, BLOCK_N=128),
        _cfg(8, 3, BLOCK_K=128, BLOCK_N=128),
        _cfg(4, 4, BLOCK_K=64, BLOCK_N=64),
    ]


@triton.autotune(configs=_FWD_CONFIGS, key=["K", "N"])
@triton.jit
def _grouped_mm_kernel(X, W, Y, ENDS, TILE_ENDS, M, K, N, E,
                       stride_xm, stride_we, stride_wk, stride_wn, stride_ym,
                       PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    tile = tl.program_id(0)
    if tile >= tl.load(TILE_ENDS + E - 1):
        return
    # expert of this tile: how many experts' tile ranges end at or before it
    e = 0
    for i in range(0, E):
        e += (tl.load(TILE_ENDS + i) <= tile).to(tl.int32)
    row_end = tl.load(ENDS + e)
    tile_end = tl.load(TILE_ENDS + e)
    n_rows = row_end - tl.load(ENDS + e - 1, mask=e > 0, other=0)
    n_tiles = (n_rows + BLOCK_M - 1) // BLOCK_M
    row0 = row_end - n_rows + (tile - (tile_end - n_tiles)) * BLOCK_M

    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = (offs_m < row_end)[:, None]
    x_ptr = X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptr = W + e.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        x = tl.load(x_ptr, mask=row_ok & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        x_ptr += BLOCK_K
        w_ptr += BLOCK_K * stride_wk
    y_ptr = Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=row_ok & (offs_n[None, :] < N))


@triton.autotune(configs=_WGRAD_CONFIGS, key=["K", "N"])
@triton.jit
def _grouped_wgrad_kernel(X, DY, DW, ENDS, K, N,
                          stride_xm, stride_dym, stride_dwe, stride_dwk,
                          PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    e = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    hi = tl.load(ENDS + e)
    lo = tl.load(ENDS + e - 1, mask=e > 0, other=0)
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < hi
        xt = tl.load(X + offs_m[None, :].to(tl.int64) * stride_xm + offs_k[:, None],
                     mask=m_ok[None, :] & (offs_k[:, None] < K), other=0.0)
        dy = tl.load(DY + offs_m[:, None].to(tl.int64) * stride_dym + offs_n[None, :],
                     mask=m_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(xt, dy, acc, input_precision=PRECISION)
    dw_ptr = DW + e.to(tl.int64) * stride_dwe + offs_k[:, None] * stride_dwk + offs_n[None, :]
    tl.store(dw_ptr, acc.to(DW.dtype.element_ty), mask=(offs_k[:, None] < K) & (offs_n[None, :] < N))


def _rows(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _tables(counts):
    """Row ends per expert and tile ends per expert (int32, on the device; no sync)."""
    ends = counts.cumsum(0).to(torch.int32)
    tile_ends = ((counts + BLOCK_M - 1) // BLOCK_M).cumsum(0).to(torch.int32)
    return ends, tile_ends


@torch.library.custom_op("minillm_kernels::grouped_mm", mutates_args=())
def grouped_mm_op(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    x = _rows(x)
    M, K = x.shape
    E, _, N = w.shape
    y = x.new_empty(M, N)
    if M == 0:
        return y
    ends, tile_ends = _tables(counts)

    def grid(meta):
        return (triton.cdiv(M, BLOCK_M) + E, triton.cdiv(N, meta["BLOCK_N"]))
    with device_guard(x):
        _grouped_mm_kernel[grid](x, w, y, ends, tile_ends, M, K, N, E,
                                 x.stride(0), w.stride(0), w.stride(1), w.stride(2), y.stride(0),
                                 PRECISION=dot_precision(x.dtype), BLOCK_M=BLOCK_M)
    return y


@grouped_mm_op.register_fake
def _(x, w, counts):
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("minillm_kernels::grouped_mm_wgrad", mutates_args=())
def grouped_mm_wgrad(x: Tensor, dy: Tensor, counts: Tensor, k: int, n: int) -> Tensor:
    """dw [E, K, N] with dw[e] = x_e^T @ dy_e (fp32 accumulation, stored in x's dtype)."""
    x, dy = _rows(x), _rows(dy)
    E = counts.shape[0]
    dw = x.new_empty(E, k, n)
    ends, _ = _tables(counts)

    def grid(meta):
        return (E, triton.cdiv(k, meta["BLOCK_K"]), triton.cdiv(n, meta["BLOCK_N"]))
    with device_guard(x):
        _grouped_wgrad_kernel[grid](x, dy, dw, ends, k, n, x.stride(0), dy.stride(0), dw.stride(0), dw.stride(1),
                                    PRECISION=dot_precision(x.dtype), BLOCK_M=BLOCK_M)
    return dw


@grouped_mm_wgrad.register_fake
def _(x, dy, counts, k, n):
    return x.new_empty(counts.shape[0], k, n)


def _setup_context(ctx, inputs, output):
    x, w, counts = inputs
    ctx.save_for_backward(x, w, counts)


def _backward(ctx, dy):
    x, w, counts = ctx.saved_tensors
    dx = grouped_mm_op(dy, w.transpose(1, 2), counts) if ctx.needs_input_grad[0] else None
    dw = None
    if ctx.needs_input_grad[1]:
        dw = grouped_mm_wgrad(x, dy, counts, w.shape[1], w.shape[2])  # x's dtype, which is w's
    return dx, dw, None


grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)


def grouped_mm(x, w, counts):
    """x [M, K] sorted by expert, w [E, K, N] (any strides), counts [E] integer rows per expert
    (summing to M) -> [M, N] with y[r] = x[r] @ w[expert of r]. x and w of one dtype."""
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1] or counts.shape != (w.shape[0],):
        raise ValueError(f"grouped_mm: x [M, K], w [E, K, N], counts [E]; got x {tuple(x.shape)}, "
                         f"w {tuple(w.shape)}, counts {tuple(counts.shape)}")
    if x.dtype != w.dtype:
        raise ValueError(f"grouped_mm: x is {x.dtype} but w is {w.dtype}")
    return grouped_mm_op(x, w, counts)
