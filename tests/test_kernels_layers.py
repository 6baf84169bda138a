"""RMSNorm, SwiGLU, RoPE and fused linear cross-entropy (Triton, interpreted on CPU) against the
torch references: outputs and every gradient, fp32 and fp16, odd sizes."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from minillm.kernels import dispatch  # noqa: E402
from minillm.kernels import reference as ref  # noqa: E402

pytest.importorskip("triton")
from minillm.kernels.cross_entropy import linear_cross_entropy  # noqa: E402
from minillm.kernels.rmsnorm import rms_norm  # noqa: E402
from minillm.kernels.rope import apply_rope  # noqa: E402
from minillm.kernels.swiglu import swiglu  # noqa: E402

DTYPES = [torch.float32, torch.float16]
# max |ours - fp32 reference| <= ATOL + RTOL * max |reference|   (see kernels/README.md)
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 4e-3)}


def assert_close(ours, want, dtype, what, scale=1.0):
    atol, rtol = TOL[dtype]
    err = (ours.float() - want.float()).abs().max().item()
    bound = scale * (atol + rtol * want.float().abs().max().item())
    assert err <= bound, f"{what}: max abs err {err:.3g} > {bound:.3g}"


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def compare(fn, fn_ref, inputs, dtype, out_dtype=None):
    """fn(*inputs) vs fn_ref on fp32 copies: outputs and gradients of every input that needs one."""
    ours_in = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    ref_in = [t.detach().float().requires_grad_(t.is_floating_point()) for t in inputs]
    out, want = fn(*ours_in), fn_ref(*ref_in)
    outs, wants = (out, want) if isinstance(out, tuple) else ((out,), (want,))
    douts = [randn(*o.shape, dtype=o.dtype, seed=7 + i) for i, o in enumerate(outs)]
    diff_in = [t for t in ours_in if t.requires_grad]
    grads = torch.autograd.grad(outs, diff_in, douts)
    want_grads = torch.autograd.grad(wants, [t for t in ref_in if t.requires_grad], [d.float() for d in douts])
    for i, (o, w) in enumerate(zip(outs, wants)):
        assert o.dtype == (out_dtype or dtype) and o.shape == w.shape
        assert_close(o, w, dtype, f"output {i}")
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        assert g.shape == w.shape and g.dtype == dtype
        assert_close(g, w, dtype, f"grad {i}")


# ------------------------------------------------------------------ RMSNorm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 7, 96), (3, 100)])
def test_rms_norm_matches_reference(shape, dtype):
    x = randn(*shape, dtype=dtype)
    w = (1 + 0.1 * randn(shape[-1], seed=1)).to(dtype)
    compare(lambda x, w: rms_norm(x, w, 1e-6), lambda x, w: ref.rms_norm_ref(x, w, 1e-6), [x, w], dtype)


def test_rms_norm_strided_input_and_fp32_weight():
    """A column slice (row stride != D) and an fp32 weight with fp16 input (output promotes to fp32)."""
    x = randn(5, 2 * 48, dtype=torch.float16)[:, :48]
    w = 1 + 0.1 * randn(48, seed=1)
    out = rms_norm(x, w)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref.rms_norm_ref(x, w), atol=1e-3, rtol=1e-3)


# ------------------------------------------------------------------ SwiGLU
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 5), (2, 9, 200)])
def test_swiglu_matches_reference(shape, dtype):
    compare(swiglu, ref.swiglu_ref, [randn(*shape, dtype=dtype), randn(*shape, dtype=dtype, seed=1)], dtype)


def test_swiglu_halves_of_fused_projection():
    """gate/up as the two halves of one [.., 2I] projection (row-strided views)."""
    gate_up = randn(3, 4, 2 * 130, dtype=torch.float32)
    gate, up = gate_up.chunk(2, dim=-1)
    compare(swiglu, ref.swiglu_ref, [gate, up], torch.float32)


# ------------------------------------------------------------------ RoPE
def rope_tables(T, D, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
    freqs = torch.outer(torch.arange(T).float(), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,Hkv,T,D", [(2, 1, 1, 64), (4, 2, 17, 96), (4, 4, 33, 128)])
def test_rope_matches_reference(H, Hkv, T, D, dtype):
    cos, sin = rope_tables(T, D)
    q, k = randn(2, H, T, D, dtype=dtype), randn(2, Hkv, T, D, dtype=dtype, seed=1)
    compare(lambda q, k: apply_rope(q, k, cos, sin), lambda q, k: ref.apply_rope_ref(q, k, cos, sin),
            [q, k], dtype)


def test_rope_transposed_views_and_4d_tables():
    """q/k as [B, T, H, D] projections viewed [B, H, T, D]; cos/sin as [1, 1, T, D]; layout is kept."""
    B, T, H, D = 2, 9, 4, 64
    q = randn(B, T, H, D).transpose(1, 2)
    k = randn(B, T, 2, D, seed=1).transpose(1, 2)
    cos, sin = rope_tables(T, D)
    qo, ko = apply_rope(q, k, cos[None, None], sin[None, None])
    want_q, want_k = ref.apply_rope_ref(q, k, cos, sin)
    torch.testing.assert_close(qo, want_q)
    torch.testing.assert_close(ko, want_k)
    assert qo.stride() == q.stride()


def test_rope_backward_is_inverse_rotation():
    """RoPE is orthogonal: the gradient of sum(rope(x) * rope(x)) is 2x."""
    T, D = 11, 64
    cos, sin = rope_tables(T, D)
    q = randn(1, 2, T, D).requires_grad_()
    k = randn(1, 1, T, D, seed=1).requires_grad_()
    qo, ko = apply_rope(q, k, cos, sin)
    dq, dk = torch.autograd.grad(qo.square().sum() + ko.square().sum(), (q, k))
    torch.testing.assert_close(dq, 2 * q.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dk, 2 * k.detach(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ fused linear cross-entropy
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,V,chunk", [(37, 100, 16), (8, 67, 0)])
def test_linear_cross_entropy_matches_reference(N, V, chunk, dtype):
    D = 32
    hidden = randn(N, D, dtype=dtype)
    weight = (0.3 * randn(V, D, seed=1)).to(dtype)
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2))
    targets[::5] = -100  # ignored positions
    compare(lambda h, w: linear_cross_entropy(h, w, targets, chunk_size=chunk),
            lambda h, w: ref.linear_cross_entropy_ref(h, w, targets), [hidden, weight], dtype,
            out_dtype=torch.float32)


def test_linear_cross_entropy_ignored_rows_get_no_gradient():
    hidden = randn(20, 16).requires_grad_()
    weight = randn(50, 16, seed=1).requires_grad_()
    targets = torch.randint(0, 50, (20,), generator=torch.Generator().manual_seed(2))
    targets[3] = targets[11] = 7
    targets[[0, 4, 19]] = -1
    loss = linear_cross_entropy(hidden, weight, targets, ignore_index=-1, chunk_size=8)
    want = ref.linear_cross_entropy_ref(hidden, weight, targets, ignore_index=-1)
    torch.testing.assert_close(loss, want)
    (dh,) = torch.autograd.grad(loss, hidden)
    assert torch.all(dh[[0, 4, 19]] == 0) and torch.all(dh[[1, 2, 3]] != 0)


def test_linear_cross_entropy_all_ignored_is_zero():
    hidden, weight = randn(6, 16).requires_grad_(), randn(30, 16, seed=1)
    loss = linear_cross_entropy(hidden, weight, torch.full((6,), -100))
    assert loss.item() == 0.0
    (dh,) = torch.autograd.grad(loss, hidden)
    assert torch.all(dh == 0)


def test_linear_cross_entropy_no_grad_and_upstream_scale():
    hidden, weight = randn(9, 16), randn(30, 16, seed=1)
    targets = torch.randint(0, 30, (9,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets),
                                   ref.linear_cross_entropy_ref(hidden, weight, targets))
    h = hidden.clone().requires_grad_()
    (dh,) = torch.autograd.grad(3.0 * linear_cross_entropy(h, weight, targets), h)
    h2 = hidden.clone().requires_grad_()
    (want,) = torch.autograd.grad(3.0 * ref.linear_cross_entropy_ref(h2, weight, targets), h2)
    torch.testing.assert_close(dh, want)


# ------------------------------------------------------------------ dispatch + custom op checks
def test_dispatch_forced_triton_matches_torch():
    x, w = randn(3, 64), 1 + 0.1 * randn(64, seed=1)
    torch.testing.assert_close(dispatch.rms_norm(x, w, backend="triton"), dispatch.rms_norm(x, w, backend="torch"))
    g, u = randn(3, 40), randn(3, 40, seed=1)
    torch.testing.assert_close(dispatch.swiglu(g, u, backend="triton"), dispatch.swiglu(g, u, backend="torch"))
    with pytest.raises(ValueError):
        dispatch.swiglu(g, u, backend="cuda")


def test_custom_op_registrations():
    """Schema, fake impl, autograd registration and AOT dispatch of every fused-layer op."""
    from minillm.kernels.cross_entropy import linear_cross_entropy_fwd
    from minillm.kernels.rmsnorm import rms_norm_fwd
    from minillm.kernels.rope import rope_fwd
    from minillm.kernels.swiglu import swiglu_fwd

    x, w = randn(3, 32).requires_grad_(), (1 + randn(32, seed=1)).requires_grad_()
    torch.library.opcheck(rms_norm_fwd, (x, w, 1e-6))
    torch.library.opcheck(swiglu_fwd, (randn(3, 20).requires_grad_(), randn(3, 20, seed=1).requires_grad_()))
    cos, sin = rope_tables(5, 16)
    torch.library.opcheck(rope_fwd, (randn(1, 2, 5, 16).requires_grad_(), randn(1, 1, 5, 16).requires_grad_(),
                                     cos[None], sin[None]))
    targets = torch.tensor([1, -100, 3, 4, 0])
    torch.library.opcheck(linear_cross_entropy_fwd,
                          (randn(5, 16).requires_grad_(), randn(10, 16, seed=1).requires_grad_(), targets,
                           -100, True, True, 2))


# ------------------------------------------------------------------ MoE grouped matmul
def grouped_inputs(counts, K, N, dtype, transposed=False):
    counts = torch.tensor(counts)
    x = randn(int(counts.sum()), K, dtype=dtype)
    w = randn(len(counts), N, K, dtype=dtype, seed=1).transpose(1, 2) if transposed else \
        randn(len(counts), K, N, dtype=dtype, seed=1)
    return x, w, counts


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("counts,K,N,transposed", [
    ([5, 0, 33, 1], 40, 50, False),   # an empty expert, odd sizes, a group spanning several row tiles
    ([0, 0, 17], 16, 8, True),        # experts with no rows first; w a transposed view (as the MoE passes it)
    ([16, 16], 33, 65, False),        # groups that fill whole row tiles
])
def test_grouped_mm_matches_reference(counts, K, N, transposed, dtype):
    from minillm.kernels.moe import grouped_mm
    x, w, c = grouped_inputs(counts, K, N, dtype, transposed)
    compare(lambda x, w: grouped_mm(x, w, c), lambda x, w: ref.grouped_mm_ref(x, w, c), [x, w], dtype)


def test_grouped_mm_rows_go_to_their_own_expert():
    """Each expert's weight is a distinct scaled identity, so any row sent to the wrong expert shows."""
    from minillm.kernels.moe import grouped_mm
    counts = torch.tensor([3, 0, 20, 2])
    w = torch.stack([(e + 1) * torch.eye(8) for e in range(4)])
    x = torch.ones(25, 8)
    scale = torch.repeat_interleave(torch.tensor([1.0, 2, 3, 4]), counts)
    torch.testing.assert_close(grouped_mm(x, w, counts), scale[:, None].expand(25, 8))


def test_grouped_mm_bad_shapes_are_clear_errors():
    from minillm.kernels.moe import grouped_mm
    x, w, c = grouped_inputs([2, 3], 8, 4, torch.float32)
    with pytest.raises(ValueError, match="counts"):
        grouped_mm(x, w, torch.tensor([5]))
    with pytest.raises(ValueError, match="float16"):
        grouped_mm(x.half(), w, c)


def test_grouped_mm_custom_op_registration():
    from minillm.kernels.moe import grouped_mm_op
    x, w, c = grouped_inputs([3, 0, 4], 16, 8, torch.float32)
    torch.library.opcheck(grouped_mm_op, (x.requires_grad_(), w.requires_grad_(), c))
