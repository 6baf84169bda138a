"""SwiGLU forward + backward in Triton: out = silu(gate) * up, computed in fp32.

The backward recomputes silu from gate instead of saving it, so the only activations kept are
gate and up (the inputs). Inputs may be row-strided views (e.g. halves of a fused gate/up
projection); the last dim must be contiguous (copied if not).
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import INTERPRET, device_guard

BLOCK = 128 if INTERPRET else 1024


@triton.jit
def _swiglu_fwd(G, U, O, stride_g, stride_u, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(O + row * n_cols + cols, out.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DO, G, U, DG, DU, stride_do, stride_g, stride_u, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    do = tl.load(DO + row * stride_do + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dg = do * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DG + row * n_cols + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * n_cols + cols, (do * silu).to(DU.dtype.element_ty), mask=mask)


def _rows(t):
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _grid(rows, n_cols):
    return (rows, triton.cdiv(n_cols, BLOCK))


@torch.library.custom_op("minillm_kernels::swiglu_fwd", mutates_args=())
def swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    g2, u2 = _rows(gate), _rows(up)
    out = gate.new_empty(gate.shape)
    n = gate.shape[-1]
    with device_guard(gate):
        _swiglu_fwd[_grid(g2.shape[0], n)](g2, u2, out, g2.stride(0), u2.stride(0), n, BLOCK=BLOCK)
    return out


@swiglu_fwd.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("minillm_kernels::swiglu_bwd", mutates_args=())
def swiglu_bwd(dout: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    d2, g2, u2 = _rows(dout), _rows(gate), _rows(up)
    dgate, dup = gate.new_empty(gate.shape), up.new_empty(up.shape)
    n = gate.shape[-1]
    with device_guard(gate):
        _swiglu_bwd[_grid(g2.shape[0], n)](d2, g2, u2, dgate, dup, d2.stride(0), g2.stride(0), u2.stride(0),
                                           n, BLOCK=BLOCK)
    return dgate, dup


@swiglu_bwd.register_fake
def _(dout, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dout):
    gate, up = ctx.saved_tensors
    return swiglu_bwd(dout, gate, up)


swiglu_fwd.register_autograd(_backward, setup_context=_setup_context)


def swiglu(gate, up):
    """silu(gate) * up for gate/up of the same shape [..., I] and dtype."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu needs gate and up of one shape and dtype, got "
                         f"{tuple(gate.shape)} {gate.dtype} and {tuple(up.shape)} {up.dtype}")
    return swiglu_fwd(gate, up)
