"""Rotate-half RoPE forward + backward in Triton (the transformers Llama layout).

out[:h] = x1 * cos[:h] - x2 * sin[:h],  out[h:] = x2 * cos[h:] + x1 * sin[h:]   (h = D / 2)

The backward is the inverse rotation, the same kernel with the sign of sin flipped and the
halves swapped: dx1 = d1 * cos[:h] + d2 * sin[h:],  dx2 = d2 * cos[h:] - d1 * sin[:h].
One program per (batch, position) rotates every head of that position, so cos/sin are read
once per position. q/k may be strided views ([B, T, H, D] projections seen as [B, H, T, D]);
outputs keep the input's memory layout.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import device_guard, next_pow2


@triton.jit
def _rope_kernel(X, COS, SIN, OUT, stride_xb, stride_xh, stride_xt, stride_ob, stride_oh, stride_ot,
                 stride_cb, stride_ct, H, T, HALF, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 BACKWARD: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    col_ok = cols < HALF
    mask = (heads[:, None] < H) & col_ok[None, :]
    cs_base = b * stride_cb + t * stride_ct
    # cos/sin are rounded to the input dtype first, as the reference does
    c1 = tl.load(COS + cs_base + cols, mask=col_ok, other=0.0).to(X.dtype.element_ty).to(tl.float32)
    c2 = tl.load(COS + cs_base + HALF + cols, mask=col_ok, other=0.0).to(X.dtype.element_ty).to(tl.float32)
    s1 = tl.load(SIN + cs_base + cols, mask=col_ok, other=0.0).to(X.dtype.element_ty).to(tl.float32)
    s2 = tl.load(SIN + cs_base + HALF + cols, mask=col_ok, other=0.0).to(X.dtype.element_ty).to(tl.float32)
    x_ptr = X + b * stride_xb + t * stride_xt + heads[:, None] * stride_xh + cols[None, :]
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = x1 * c1[None, :] + x2 * s2[None, :]
        o2 = x2 * c2[None, :] - x1 * s1[None, :]
    else:
        o1 = x1 * c1[None, :] - x2 * s1[None, :]
        o2 = x2 * c2[None, :] + x1 * s2[None, :]
    o_ptr = OUT + b * stride_ob + t * stride_ot + heads[:, None] * stride_oh + cols[None, :]
    tl.store(o_ptr, o1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_ptr + HALF, o2.to(OUT.dtype.element_ty), mask=mask)


def _rotate(x, cos, sin, backward):
    """x [B, H, T, D]; cos/sin [Bc, T, D] with Bc 1 or B."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, H, T, D = x.shape
    out = torch.empty_like(x)
    cb = cos.stride(0) if cos.shape[0] > 1 else 0
    block_h = next_pow2(H)
    with device_guard(x):
        _rope_kernel[(B * T,)](x, cos, sin, out, x.stride(0), x.stride(1), x.stride(2),
                               out.stride(0), out.stride(1), out.stride(2), cb, cos.stride(1),
                               H, T, D // 2, BLOCK_H=block_h, BLOCK_HALF=next_pow2(D // 2),
                               BACKWARD=backward, num_warps=4 if block_h * D <= 2048 else 8)
    return out


@torch.library.custom_op("minillm_kernels::rope_fwd", mutates_args=())
def rope_fwd(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return _rotate(q, cos, sin, False), _rotate(k, cos, sin, False)


@rope_fwd.register_fake
def _(q, k, cos, sin):
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.custom_op("minillm_kernels::rope_bwd", mutates_args=())
def rope_bwd(dq: Tensor, dk: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return _rotate(dq, cos, sin, True), _rotate(dk, cos, sin, True)


@rope_bwd.register_fake
def _(dq, dk, cos, sin):
    return torch.empty_like(dq), torch.empty_like(dk)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[2], inputs[3])


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq_in, dk_in = rope_bwd(dq, dk, cos, sin)
    return dq_in, dk_in, None, None


rope_fwd.register_autograd(_backward, setup_context=_setup_context)


def _as_batch_time_dim(t, B, T, D):
    """cos/sin as [T, D], [1, 1, T, D], [B, 1, T, D] or [B, T, D] -> contiguous [Bc, T, D]."""
    if t.dim() == 4:
        if t.shape[1] != 1:
            raise ValueError(f"rope cos/sin with a head dim must broadcast over heads, got {tuple(t.shape)}")
        t = t[:, 0]
    elif t.dim() == 2:
        t = t[None]
    if t.dim() != 3 or t.shape[1:] != (T, D) or t.shape[0] not in (1, B):
        raise ValueError(f"rope cos/sin of shape {tuple(t.shape)} do not match T={T}, D={D}")
    return t.contiguous()


def apply_rope(q, k, cos, sin):
    """q [B, H, T, D], k [B, Hkv, T, D], cos/sin [T, D] -> (q, k) rotated, same dtypes and layouts."""
    B, _, T, D = q.shape
    if D % 2 or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"rope needs an even head dim and q/k of one length, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    cos, sin = _as_batch_time_dim(cos, B, T, D), _as_batch_time_dim(sin, B, T, D)
    return rope_fwd(q, k, cos, sin)
