"""One function per op; each picks Triton on CUDA and the torch reference elsewhere.

`backend` is "auto" (Triton when the tensor is on CUDA and Triton imports), "triton" or
"torch". The Triton kernels live beside this file and are imported lazily, so importing
this package on a CPU-only machine compiles and autotunes nothing.
"""
import functools

import torch

from . import reference as ref


@functools.lru_cache(maxsize=None)
def triton_available():
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def use_triton(backend, tensor):
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' was forced but triton does not import; "
                               "install triton or use backend='torch'")
        return True
    if backend != "auto":
        raise ValueError(f"unknown kernel backend {backend!r}: use 'auto', 'triton' or 'torch'")
    return tensor.is_cuda and triton_available()


def _autocast_inputs(*tensors):
    """Custom ops skip autocast, so cast their inputs as the torch op (SDPA, a matmul) would."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)


def attention(q, k, v, causal=True, backend="auto"):
    """Scaled dot-product attention. q [B, H, T, D], k/v [B, Hkv, S, D] -> [B, H, T, D].

    The Triton kernel takes T == S (training, prefill) or non-causal calls, head dim <= 128;
    anything else (a causal decode step against a KV cache) goes to the reference.
    """
    if use_triton(backend, q):
        from .attention import flash_attention, supported
        q, k, v = _autocast_inputs(q, k, v)
        if supported(q, k, v, causal):
            return flash_attention(q, k, v, causal=causal)
    return ref.attention_ref(q, k, v, causal=causal)


def rms_norm(x, weight, eps=1e-6, backend="auto"):
    """weight * normalize(x) over the last dim; normalised in fp32, scaled in the input dtype."""
    if use_triton(backend, x):
        from .rmsnorm import rms_norm as fused
        return fused(x, weight, eps)
    return ref.rms_norm_ref(x, weight, eps)


def apply_rope(q, k, cos, sin, backend="auto"):
    """Rotate-half RoPE. q [B, H, T, D], k [B, Hkv, T, D], cos/sin [T, D] -> (q, k) rotated."""
    if use_triton(backend, q):
        from .rope import apply_rope as fused
        return fused(q, k, cos, sin)
    return ref.apply_rope_ref(q, k, cos, sin)


def swiglu(gate, up, backend="auto"):
    """silu(gate) * up, elementwise."""
    if use_triton(backend, gate):
        from .swiglu import swiglu as fused
        return fused(gate, up)
    return ref.swiglu_ref(gate, up)


def linear_cross_entropy(hidden, weight, targets, ignore_index=-100, backend="auto"):
    """Mean cross-entropy of hidden [N, D] @ weight[V, D].T against targets [N].

    The fused path chunks over tokens and never holds the full [N, V] logits.
    """
    if use_triton(backend, hidden):
        from .cross_entropy import linear_cross_entropy as fused
        return fused(hidden, weight, targets, ignore_index)
    return ref.linear_cross_entropy_ref(hidden, weight, targets, ignore_index)


def grouped_mm(x, w, counts, backend="auto"):
    """Mixture-of-experts matmul: x [M, K] sorted by expert, w [E, K, N], counts [E] rows per
    expert (a device tensor) -> [M, N]. The Triton kernel never reads the counts on the host."""
    if use_triton(backend, x):
        from .moe import grouped_mm as fused
        x, w = _autocast_inputs(x, w)
        return fused(x, w, counts)
    return ref.grouped_mm_ref(x, w, counts)
