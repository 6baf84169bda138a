"""Fused linear + cross-entropy that never materialises the full [N, V] logits.

The forward walks over chunks of tokens: logits = hidden_chunk @ weight.T (a torch matmul, in
the input dtype), then one Triton program per row computes the logsumexp and the row's loss
and overwrites the logits in place with d loss / d logits = softmax - onehot (0 for ignored
rows). Two more matmuls turn that into this chunk's part of grad_hidden and grad_weight
(accumulated in fp32), and the chunk's logits are dropped. The gradients are therefore
computed in the forward and saved; the backward only scales them by the incoming gradient
(as Liger-Kernel does). The loss is the mean over non-ignored targets (0 if there are none).

Under torch.no_grad (or when neither input needs a gradient) only the loss is computed.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import INTERPRET, device_guard, next_pow2

# Peak memory of one chunk's logits; bigger chunks mean fewer, larger matmuls.
MAX_CHUNK_LOGITS_BYTES = 128 * 2**20


@triton.jit
def _ce_rows(LOGITS, TARGETS, LOSS, stride_l, V, ignore_index,
             BLOCK_V: tl.constexpr, COMPUTE_GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_l
    target = tl.load(TARGETS + row)
    ignored = target == ignore_index
    cols0 = tl.arange(0, BLOCK_V)

    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    safe_target = tl.where(ignored, 0, target)
    x_target = tl.load(base + safe_target).to(tl.float32)
    tl.store(LOSS + row, tl.where(ignored, 0.0, lse - x_target))

    if COMPUTE_GRAD:
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            mask = cols < V
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            grad = tl.where(ignored, 0.0, grad)
            tl.store(base + cols, grad.to(LOGITS.dtype.element_ty), mask=mask)


def _chunk_rows(N, V, element_size, chunk_size):
    if chunk_size <= 0:
        chunk_size = max(1, MAX_CHUNK_LOGITS_BYTES // (V * element_size))
    n_chunks = triton.cdiv(N, chunk_size)
    return triton.cdiv(N, n_chunks)  # equal chunks: no tiny last one


@torch.library.custom_op("minillm_kernels::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int,
                             need_grad_hidden: bool, need_grad_weight: bool,
                             chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
    N, D = hidden.shape
    V = weight.shape[0]
    need_grad = need_grad_hidden or need_grad_weight
    loss_rows = torch.empty(N, device=hidden.device, dtype=torch.float32)
    grad_hidden = hidden.new_empty(hidden.shape) if need_grad_hidden else hidden.new_empty(0)
    grad_weight = (torch.zeros(V, D, device=weight.device, dtype=torch.float32)
                   if need_grad_weight else weight.new_empty(0))
    block_v = min(next_pow2(V), 64 if INTERPRET else 4096)
    rows = _chunk_rows(N, V, hidden.element_size(), chunk_size)
    with device_guard(hidden):
        for start in range(0, N, rows):
            end = min(start + rows, N)
            h = hidden[start:end]
            logits = h @ weight.t()  # [rows, V], becomes d loss / d logits in place
            _ce_rows[(end - start,)](logits, targets[start:end], loss_rows[start:end], logits.stride(0), V,
                                     ignore_index, BLOCK_V=block_v, COMPUTE_GRAD=need_grad,
                                     num_warps=8 if block_v >= 2048 else 4)
            if need_grad_hidden:
                torch.mm(logits, weight, out=grad_hidden[start:end])
            if need_grad_weight:
                if logits.dtype == torch.float32:
                    grad_weight.addmm_(logits.t(), h)
                else:  # bf16/fp16 product per chunk, fp32 sum across chunks
                    grad_weight += logits.t() @ h
            del logits
    n_valid = (targets != ignore_index).sum().clamp(min=1).to(torch.float32)
    loss = loss_rows.sum() / n_valid
    if need_grad_hidden:
        grad_hidden.mul_((1.0 / n_valid).to(grad_hidden.dtype))
    if need_grad_weight:
        grad_weight = grad_weight.div_(n_valid).to(weight.dtype)
    return loss, grad_hidden, grad_weight


@linear_cross_entropy_fwd.register_fake
def _(hidden, weight, targets, ignore_index, need_grad_hidden, need_grad_weight, chunk_size):
    loss = hidden.new_empty((), dtype=torch.float32)
    grad_hidden = hidden.new_empty(hidden.shape if need_grad_hidden else (0,))
    grad_weight = weight.new_empty(weight.shape if need_grad_weight else (0,))
    return loss, grad_hidden, grad_weight


def _setup_context(ctx, inputs, output):
    _, _, _, _, need_grad_hidden, need_grad_weight, _ = inputs
    ctx.need_grad_hidden, ctx.need_grad_weight = need_grad_hidden, need_grad_weight
    ctx.save_for_backward(output[1], output[2])


def _backward(ctx, dloss, _dgrad_hidden, _dgrad_weight):
    grad_hidden, grad_weight = ctx.saved_tensors
    dh = grad_hidden * dloss.to(grad_hidden.dtype) if ctx.need_grad_hidden else None
    dw = grad_weight * dloss.to(grad_weight.dtype) if ctx.need_grad_weight else None
    return dh, dw, None, None, None, None, None


linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(hidden, weight, targets, ignore_index=-100, chunk_size=0):
    """Mean cross-entropy of hidden [N, D] @ weight [V, D].T against targets [N].

    chunk_size: tokens per chunk (0: as many as fit MAX_CHUNK_LOGITS_BYTES of logits).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).contiguous()
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"linear_cross_entropy: {hidden.shape[0]} hidden rows but {targets.shape[0]} targets")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # custom ops are not autocast: cast as a matmul would
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    grad = torch.is_grad_enabled()
    loss, _, _ = linear_cross_entropy_fwd(hidden, weight, targets, ignore_index,
                                          grad and hidden.requires_grad, grad and weight.requires_grad,
                                          chunk_size)
    return loss
