"""Plain-torch references for every kernel: the CPU path and the test oracle."""
import torch
import torch.nn.functional as F


def attention_ref(q, k, v, causal=True):
    """q [B, H, T, D], k/v [B, Hkv, S, D] with H a multiple of Hkv -> [B, H, T, D].

    Causal masking aligns the last query with the last key (bottom-right), which is what a
    decode step against a KV cache needs; for T == S it is the ordinary causal mask.
    """
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if not causal or T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and T > 1, enable_gqa=gqa)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def rms_norm_ref(x, weight, eps=1e-6):
    """Normalise in fp32, scale in the input dtype (as Llama/Qwen do)."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_ref(q, k, cos, sin):
    """Rotate-half RoPE (the transformers Llama layout).

    q [B, H, T, D], k [B, Hkv, T, D]; cos/sin [T, D] (or broadcastable to [B, 1, T, D]).
    """
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def swiglu_ref(gate, up):
    return F.silu(gate) * up


def linear_cross_entropy_ref(hidden, weight, targets, ignore_index=-100, reduction="mean"):
    """Cross-entropy of `hidden @ weight.T` against `targets`, materialising the logits.

    hidden [N, D], weight [V, D], targets [N]. Mean over non-ignored targets (0 if none).
    """
    logits = (hidden @ weight.t()).float()
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return loss
    n = (targets != ignore_index).sum().clamp(min=1)
    return loss / n


def grouped_mm_ref(x, w, counts):
    """x [M, K] sorted by expert, w [E, K, N], counts [E] -> [M, N], y[r] = x[r] @ w[expert of r].
    One matmul per expert; reading the counts is a host sync."""
    pieces = torch.split(x, counts.tolist())
    return torch.cat([xe @ w[e] for e, xe in enumerate(pieces)]) if len(x) else x.new_empty(0, w.shape[2])
