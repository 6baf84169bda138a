"""The compiled Triton kernels on a CUDA GPU, bf16 and fp16 at real shapes.

    python -m pytest -q tests/gpu          # on a CUDA machine; skipped without one, never collected by `pytest tests`

The bar for low precision: ours is as accurate as torch's own kernel in the same dtype. Both are
compared with an fp32 reference on the same inputs and
    max|ours - ref32| <= 2 * max|torch_lowp - ref32| + 1e-3 * max|ref32|
for the output and every gradient (flash-style kernels reorder sums, so equality is not expected;
twice torch's rounding error leaves room for that and catches any real indexing or masking bug,
which shows up as errors of order max|ref32|).
"""
import pytest
import torch
import torch.nn.functional as F

from minillm.kernels import reference as ref
from minillm import MiniLLM, ModelConfig

DEV = "cuda"
LOWP = [torch.bfloat16, torch.float16]


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(shape, generator=g, device=DEV, dtype=torch.float32).to(dtype)


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def as_accurate_as_torch(ours_fn, torch_fn, ref_fn, inputs, what):
    """Run ours and torch's implementation in the inputs' dtype and the fp32 reference; compare the
    output and every input gradient against the reference."""
    def run(fn, cast):
        xs = [cast(t).detach().requires_grad_(t.is_floating_point()) for t in inputs]
        out = fn(*xs)
        outs = out if isinstance(out, tuple) else (out,)
        douts = [randn(*o.shape, dtype=o.dtype, seed=11 + i) for i, o in enumerate(outs)]
        grads = torch.autograd.grad(outs, [x for x in xs if x.requires_grad], douts)
        return [o.detach() for o in outs] + list(grads)

    ours = run(ours_fn, lambda t: t)
    lowp = run(torch_fn, lambda t: t)
    want = run(ref_fn, lambda t: t.float() if t.is_floating_point() else t)
    assert len(ours) == len(want)
    for i, (o, t, w) in enumerate(zip(ours, lowp, want)):
        assert o.shape == w.shape, f"{what} tensor {i}: shape {tuple(o.shape)} != {tuple(w.shape)}"
        bound = 2 * max_err(t, w) + 1e-3 * w.float().abs().max().item()
        err = max_err(o, w)
        assert err <= bound, f"{what} tensor {i} (0 = output, then grads): max err {err:.3g} > {bound:.3g}"


# ------------------------------------------------------------------ attention
def sdpa(q, k, v, causal=True):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("B,H,Hkv,T,D", [
    (4, 8, 4, 340, 96),      # minimind-3's shape
    (4, 8, 2, 512, 64),      # GQA 4
    (2, 16, 4, 1027, 128),   # odd length
    (1, 8, 8, 2048, 64),     # MHA
    (1, 8, 2, 4096, 128),
])
def test_attention_causal(B, H, Hkv, T, D, dtype):
    from minillm.kernels.attention import flash_attention
    q, k, v = randn(B, H, T, D, dtype=dtype), randn(B, Hkv, T, D, dtype=dtype, seed=1), \
        randn(B, Hkv, T, D, dtype=dtype, seed=2)
    as_accurate_as_torch(lambda q, k, v: flash_attention(q, k, v, causal=True), sdpa,
                         lambda q, k, v: ref.attention_ref(q, k, v, causal=True), [q, k, v], "attention")


def test_attention_non_causal_and_cross_lengths():
    from minillm.kernels.attention import flash_attention
    q, k, v = randn(2, 8, 200, 64, dtype=torch.bfloat16), randn(2, 4, 333, 64, dtype=torch.bfloat16, seed=1), \
        randn(2, 4, 333, 64, dtype=torch.bfloat16, seed=2)
    as_accurate_as_torch(lambda q, k, v: flash_attention(q, k, v, causal=False),
                         lambda q, k, v: sdpa(q, k, v, causal=False),
                         lambda q, k, v: ref.attention_ref(q, k, v, causal=False), [q, k, v], "attention")


# ------------------------------------------------------------------ fused layers (MiniMind's shapes)
T_TOKENS = 4 * 340


@pytest.mark.parametrize("dtype", LOWP)
def test_rms_norm(dtype):
    from minillm.kernels.rmsnorm import rms_norm
    x, w = randn(T_TOKENS, 768, dtype=dtype), 1 + 0.1 * randn(768, seed=1)  # fp32 weight, as under autocast
    as_accurate_as_torch(lambda x, w: rms_norm(x, w, 1e-6), lambda x, w: ref.rms_norm_ref(x, w, 1e-6),
                         lambda x, w: ref.rms_norm_ref(x, w, 1e-6), [x, w], "rms_norm")


@pytest.mark.parametrize("dtype", LOWP)
def test_swiglu(dtype):
    from minillm.kernels.swiglu import swiglu
    g, u = randn(T_TOKENS, 2432, dtype=dtype), randn(T_TOKENS, 2432, dtype=dtype, seed=1)
    as_accurate_as_torch(swiglu, ref.swiglu_ref, ref.swiglu_ref, [g, u], "swiglu")


@pytest.mark.parametrize("dtype", LOWP)
def test_rope(dtype):
    from minillm.kernels.rope import apply_rope
    from minillm.model import rope_tables
    cos, sin = (t.to(DEV)[:340] for t in rope_tables(96, 4096, 1e6))
    q, k = randn(4, 8, 340, 96, dtype=dtype), randn(4, 4, 340, 96, dtype=dtype, seed=1)
    as_accurate_as_torch(lambda q, k: apply_rope(q, k, cos, sin), lambda q, k: ref.apply_rope_ref(q, k, cos, sin),
                         lambda q, k: ref.apply_rope_ref(q, k, cos, sin), [q, k], "rope")


@pytest.mark.parametrize("dtype", LOWP)
def test_linear_cross_entropy(dtype):
    from minillm.kernels.cross_entropy import linear_cross_entropy
    N, D, V = 8192, 768, 6400
    h, w = randn(N, D, dtype=dtype), 0.05 * randn(V, D, dtype=dtype, seed=1)
    t = torch.randint(0, V, (N,), device=DEV, generator=torch.Generator(device=DEV).manual_seed(2))
    t[::7] = -100
    as_accurate_as_torch(lambda h, w: linear_cross_entropy(h, w, t, -100),
                         lambda h, w: ref.linear_cross_entropy_ref(h, w, t, -100),
                         lambda h, w: ref.linear_cross_entropy_ref(h, w, t, -100), [h, w], "linear_cross_entropy")


def test_linear_cross_entropy_never_holds_the_logits():
    """Peak memory above the inputs for forward + backward: the fused op stays below one fp32 copy
    of the [N, V] logits; the eager reference needs several."""
    from minillm.kernels.cross_entropy import linear_cross_entropy
    N, D, V = 16384, 768, 6400
    logits_bytes = N * V * 4
    h = randn(N, D, dtype=torch.bfloat16).requires_grad_()
    w = (0.05 * randn(V, D, dtype=torch.bfloat16, seed=1)).requires_grad_()
    t = torch.randint(0, V, (N,), device=DEV)

    def peak(fn):
        h.grad = w.grad = None
        fn(h, w, t, -100).backward()  # warm-up (autotune, allocator)
        h.grad = w.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(h, w, t, -100).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    fused, eager = peak(linear_cross_entropy), peak(ref.linear_cross_entropy_ref)
    assert fused < 0.75 * logits_bytes, f"fused peak {fused / 2**20:.0f} MiB vs logits {logits_bytes / 2**20:.0f} MiB"
    assert eager > logits_bytes  # the comparison means something
    print(f"linear+CE extra peak: fused {fused / 2**20:.0f} MiB, eager {eager / 2**20:.0f} MiB")


@pytest.mark.parametrize("dtype", LOWP)
def test_grouped_mm(dtype):
    from minillm.kernels.moe import grouped_mm
    counts = torch.tensor([700, 0, 1500, 33, 2048, 1, 600, 1200], device=DEV)
    M, K, N = int(counts.sum()), 640, 2 * 1728
    x, w = randn(M, K, dtype=dtype), 0.05 * randn(8, N, K, dtype=dtype, seed=1)
    w = w.transpose(1, 2)  # [E, K, N] as a transposed view, as the MoE layer passes it
    as_accurate_as_torch(lambda x, w: grouped_mm(x, w, counts), lambda x, w: ref.grouped_mm_ref(x, w, counts),
                         lambda x, w: ref.grouped_mm_ref(x, w, counts), [x, w], "grouped_mm")


# ------------------------------------------------------------------ the model on both paths
def minimind3(backend, layers=2):
    return ModelConfig.preset("minimind-3", kernel_backend=backend, num_hidden_layers=layers)


def loss_and_grads(model, ids, labels, dtype):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        loss = model(ids, labels=labels).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def test_model_triton_path_is_as_accurate_as_the_torch_path_in_bf16():
    torch.manual_seed(0)
    base = MiniLLM(minimind3("torch")).to(DEV)
    fast = MiniLLM(minimind3("triton")).to(DEV)
    fast.load_state_dict(base.state_dict())
    ids = torch.randint(0, 6400, (4, 341), device=DEV)
    ids, labels = ids[:, :-1], ids[:, 1:].clone()
    labels[:, :20] = -100
    want_loss, want = loss_and_grads(base, ids, labels, None)          # fp32 torch path: the reference
    torch_loss, torch_g = loss_and_grads(base, ids, labels, torch.bfloat16)
    ours_loss, ours_g = loss_and_grads(fast, ids, labels, torch.bfloat16)
    assert abs(ours_loss - want_loss) <= 2 * abs(torch_loss - want_loss) + 2e-3 * want_loss
    for name, w in want.items():
        scale = w.norm().item() + 1e-12
        err_ours, err_torch = (ours_g[name] - w).norm().item() / scale, (torch_g[name] - w).norm().item() / scale
        assert err_ours <= 2 * err_torch + 1e-3, f"grad of {name}: rel err {err_ours:.3g} vs torch {err_torch:.3g}"


def test_compiled_model_keeps_one_graph_and_matches_eager():
    torch.manual_seed(0)
    model = MiniLLM(minimind3("triton")).to(DEV)
    ids = torch.randint(0, 6400, (4, 341), device=DEV)
    eager_loss, eager_g = loss_and_grads(model, ids[:, :-1], ids[:, 1:], torch.bfloat16)
    compiled = torch.compile(model, fullgraph=True)  # a graph break is an error
    comp_loss, comp_g = loss_and_grads(compiled, ids[:, :-1], ids[:, 1:], torch.bfloat16)
    torch.testing.assert_close(comp_loss, eager_loss, atol=2e-2, rtol=5e-3)
    for name, g in eager_g.items():
        rel = (comp_g[name] - g).norm().item() / (g.norm().item() + 1e-12)
        assert rel < 3e-2, f"grad of {name}: compiled vs eager rel diff {rel:.3g}"


def test_dense_training_step_has_no_host_sync():
    """forward, backward, clipping and the fused AdamW step queue work without waiting for the GPU
    (torch raises on a synchronising call in sync-debug mode "error")."""
    torch.manual_seed(0)
    model = MiniLLM(minimind3("triton")).to(DEV)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, 6400, (4, 341), device=DEV)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    step()  # autotuning and first-call setup may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step() for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.stack(losses).isfinite().all()


def test_moe_training_step_has_no_host_sync_and_matches_the_loop():
    torch.manual_seed(0)
    cfg = dict(num_hidden_layers=2)
    base = MiniLLM(ModelConfig.preset("minimind2-moe", kernel_backend="torch", **cfg)).to(DEV)
    fast = MiniLLM(ModelConfig.preset("minimind2-moe", kernel_backend="triton", **cfg)).to(DEV)
    fast.load_state_dict(base.state_dict())
    ids = torch.randint(0, 6400, (4, 257), device=DEV)
    want_loss, _ = loss_and_grads(base, ids[:, :-1], ids[:, 1:], None)
    torch_loss, _ = loss_and_grads(base, ids[:, :-1], ids[:, 1:], torch.bfloat16)
    ours_loss, _ = loss_and_grads(fast, ids[:, :-1], ids[:, 1:], torch.bfloat16)
    assert abs(ours_loss - want_loss) <= 2 * abs(torch_loss - want_loss) + 2e-3 * want_loss
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss_and_grads(fast, ids[:, :-1], ids[:, 1:], torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_generation_on_the_triton_path_equals_the_torch_path():
    """fp32 prefill logits agree, and greedy decoding (prefill on Triton, decode steps on the reference
    against the KV cache) runs on both paths."""
    from minillm.generate import SamplingParams, generate_batch
    torch.manual_seed(0)
    base = MiniLLM(minimind3("torch")).to(DEV).eval()
    fast = MiniLLM(minimind3("triton")).to(DEV).eval()
    fast.load_state_dict(base.state_dict())
    prompt = torch.randint(0, 6400, (2, 77), device=DEV)
    with torch.no_grad():
        torch.testing.assert_close(fast(prompt), base(prompt), atol=1e-4, rtol=1e-4)
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    outs = [generate_batch(m, [prompt[0].tolist(), prompt[1, 30:].tolist()], params) for m in (base, fast)]
    assert [len(o) for o in outs[1]] == [16, 16]
    assert outs[0][0][:4] == outs[1][0][:4]  # the first greedy tokens cannot flip on fp32-level differences


def test_pretraining_on_cuda_end_to_end(tmp_path, capsys):
    """The trainer's defaults on CUDA (bf16 autocast, torch.compile, Triton path, fused AdamW) train
    the demo model: the loss falls and the log reports MFU and peak memory."""
    import re
    from pathlib import Path

    import train_pretrain
    root = Path(__file__).resolve().parents[2]
    train_pretrain.main(["--preset", "demo", "--data_path", str(root / "dataset/demo/pretrain.jsonl"),
                         "--save_dir", str(tmp_path), "--max_steps", "60", "--log_interval", "10",
                         "--batch_size", "16", "--use_tensorboard", "0", "--learning_rate", "2e-3"])
    out = capsys.readouterr().out
    assert "(bfloat16 autocast)" in out
    losses = [float(x) for x in re.findall(r"^step \d+/\d+ .*? loss ([0-9.]+)", out, re.M)]
    assert len(losses) >= 6 and losses[-1] < losses[0] - 2.0, losses
    assert re.search(r" mem [0-9.]+GiB mfu [0-9.]+%", out)
    assert (tmp_path / "pretrain").is_dir()
