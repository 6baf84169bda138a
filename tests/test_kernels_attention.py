"""Flash attention (Triton, interpreted on CPU) against the torch reference: output and dq/dk/dv."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from minillm.kernels import dispatch  # noqa: E402
from minillm.kernels.reference import attention_ref  # noqa: E402

pytest.importorskip("triton")
from minillm.kernels.attention import flash_attention, flash_attn_fwd  # noqa: E402

# max |ours - fp32 reference| <= ATOL + RTOL * max |reference|   (see kernels/README.md)
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 1e-2)}


def assert_close(ours, want, dtype, what):
    atol, rtol = TOL[dtype]
    err = (ours.float() - want.float()).abs().max().item()
    bound = atol + rtol * want.float().abs().max().item()
    assert err <= bound, f"{what}: max abs err {err:.3g} > {bound:.3g}"


def make_qkv(B, H, Hkv, T, S, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    return q, k, v


def check_against_reference(q, k, v, causal):
    dtype = q.dtype
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = flash_attention(q, k, v, causal=causal)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = attention_ref(q32, k32, v32, causal=causal)
    want_grads = torch.autograd.grad(want, (q32, k32, v32), dout.float())

    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, want, dtype, "out")
    for name, ours, ref in zip(("dq", "dk", "dv"), grads, want_grads):
        assert ours.shape == ref.shape
        assert_close(ours, ref, dtype, name)


@pytest.mark.parametrize("H,Hkv,T,D,dtype", [
    (2, 2, 1, 64, torch.float32),     # single token
    (2, 1, 17, 64, torch.float16),    # GQA 2, odd length
    (4, 1, 33, 96, torch.float32),    # GQA 4, padded head dim
    (4, 4, 33, 96, torch.float16),
    (4, 2, 40, 128, torch.float16),
    (2, 2, 40, 128, torch.float32),
    (2, 1, 70, 64, torch.float16),    # several unmasked key/query blocks, then a ragged tail
    (2, 2, 64, 128, torch.float32),   # a multiple of every block: no tile is masked at all
])
def test_causal_matches_reference(H, Hkv, T, D, dtype):
    check_against_reference(*make_qkv(1, H, Hkv, T, T, D, dtype), causal=True)


@pytest.mark.parametrize("T,S,D,dtype", [(17, 23, 64, torch.float32), (33, 9, 64, torch.float16),
                                         (48, 64, 128, torch.float32), (50, 37, 96, torch.float16)])
def test_non_causal_matches_reference(T, S, D, dtype):
    check_against_reference(*make_qkv(1, 4, 2, T, S, D, dtype), causal=False)


def test_strided_views_from_transpose():
    """The model hands in q/k/v as [B, T, H, D] projections viewed as [B, H, T, D]."""
    B, T, H, Hkv, D = 2, 20, 4, 2, 64
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, T, H + 2 * Hkv, D, generator=g)
    q, k, v = qkv.split([H, Hkv, Hkv], dim=2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    assert not q.is_contiguous()
    check_against_reference(q, k, v, causal=True)
    out = flash_attention(q, k, v)
    # the output keeps q's [B, T, H, D] memory layout, so merging heads is a free view
    assert out.transpose(1, 2).is_contiguous()


def test_future_keys_do_not_leak():
    """Changing the last key/value must leave every earlier output row untouched."""
    q, k, v = make_qkv(1, 2, 1, 19, 19, 64, torch.float32)
    out = flash_attention(q, k, v, causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1] += 5.0
    v2[:, :, -1] -= 5.0
    out2 = flash_attention(q, k2, v2, causal=True)
    assert torch.equal(out[:, :, :-1], out2[:, :, :-1])
    assert not torch.equal(out[:, :, -1], out2[:, :, -1])


def test_dispatch_decode_falls_back_to_reference():
    """Causal T != S (a decode step against a KV cache) takes the reference, bottom-right aligned."""
    q, k, v = make_qkv(1, 4, 2, 3, 11, 64, torch.float32)
    out = dispatch.attention(q, k, v, causal=True, backend="triton")
    torch.testing.assert_close(out, attention_ref(q, k, v, causal=True))


def test_dispatch_auto_on_cpu_is_reference():
    q, k, v = make_qkv(1, 2, 2, 5, 5, 64, torch.float32)
    torch.testing.assert_close(dispatch.attention(q, k, v), attention_ref(q, k, v))


def test_custom_op_registrations():
    """Schema, fake (meta) impl, autograd registration and AOT dispatch are consistent."""
    q, k, v = make_qkv(1, 2, 1, 9, 9, 64, torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(flash_attn_fwd, (q, k, v, True, 0.125))


def test_torch_compile_keeps_one_graph():
    """fullgraph=True fails on a graph break; aot_eager runs the fake and backward registrations."""
    q, k, v = make_qkv(1, 2, 1, 9, 9, 64, torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def f(q, k, v):
        return flash_attention(q, k, v, causal=True).square().sum()

    loss = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    want = f(q, k, v)
    want_grads = torch.autograd.grad(want, (q, k, v))
    torch.testing.assert_close(loss, want)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)
