"""Flash attention (ours, Triton) vs torch SDPA's flash and cuDNN backends: causal, bf16.

Prints TFLOP/s for the forward and forward+backward at the six ANCHORS.md shapes (plus
minimind-3's head_dim-96 shape), and the max abs difference of our output and gradients from
SDPA's. FLOPs as in the FlashAttention papers: fwd = 2·B·H·S²·D (causal), fwd+bwd = 3.5 × fwd.

    python benchmarks/attention.py            # needs a CUDA GPU
"""
import argparse
import sys

import torch
import torch.nn.functional as F

SHAPES = [  # B, H, H_kv, S, D
    (32, 8, 2, 512, 64),
    (16, 8, 2, 1024, 64),
    (8, 16, 4, 2048, 64),
    (8, 16, 16, 2048, 128),
    (4, 16, 4, 4096, 128),
    (2, 32, 8, 8192, 128),
]
MINIMIND3 = (32, 8, 4, 340, 96)


def bench_ms(fn):
    from triton.testing import do_bench
    fn()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def sdpa_fn(backend):
    """SDPA restricted to one backend; GQA natively if that backend takes it, else K/V repeated."""
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        group = q.shape[1] // k.shape[1]
        with sdpa_kernel(backend):
            if group > 1:
                try:
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                except RuntimeError:
                    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return run


def measure(fn, q, k, v, do):
    """(fwd ms, fwd+bwd ms) or (None, None) when this backend cannot run these inputs."""
    def fwd():
        with torch.no_grad():
            fn(q, k, v)

    def fwd_bwd():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(do)
    try:
        return bench_ms(fwd), bench_ms(fwd_bwd)
    except RuntimeError as e:
        print(f"    ({getattr(fn, '__name__', fn)}: {str(e).splitlines()[0][:100]})", file=sys.stderr)
        return None, None


def parity(ours, reference, q, k, v, do):
    """Max abs difference of output, dq, dk, dv between ours and the reference (both bf16)."""
    results = []
    for fn in (ours, reference):
        for t in (q, k, v):
            t.grad = None
        out = fn(q, k, v)
        out.backward(do)
        results.append([out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()])
    return [(a.float() - b.float()).abs().max().item() for a, b in zip(*results)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-minimind3", action="store_true", help="skip the extra head_dim-96 shape")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py needs a CUDA GPU (none found); nothing was measured.")

    from torch.nn.attention import SDPBackend

    from minillm.kernels.attention import flash_attention

    def ours(q, k, v):
        return flash_attention(q, k, v, causal=True)

    backends = {"ours": ours, "sdpa-flash": sdpa_fn(SDPBackend.FLASH_ATTENTION),
                "sdpa-cudnn": sdpa_fn(SDPBackend.CUDNN_ATTENTION)}
    shapes = SHAPES + ([] if args.no_minimind3 else [MINIMIND3])
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, causal; TFLOP/s (fwd / fwd+bwd)")
    header = f"{'B, H, Hkv, S, D':<22}" + "".join(f"{name:>22}" for name in backends)
    header += f"{'ours/flash':>12}{'ours/cudnn':>12}   max|ours - sdpa| out dq dk dv"
    print(header)
    for B, H, Hkv, S, D in shapes:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        k = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        v = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        do = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
        flops_fwd = 2 * B * H * S * S * D
        tflops = {}
        for name, fn in backends.items():
            fwd_ms, fb_ms = measure(fn, q, k, v, do)
            tflops[name] = (None if fwd_ms is None else flops_fwd / fwd_ms * 1e-9,
                            None if fb_ms is None else 3.5 * flops_fwd / fb_ms * 1e-9)
        errs = parity(ours, sdpa_fn(SDPBackend.FLASH_ATTENTION), q, k, v, do)

        def cell(pair):
            return "".join("   n/a" if x is None else f"{x:6.0f}" for x in pair) if pair else ""

        def ratio(a, b):
            if a is None or b is None:
                return "n/a"
            return f"{a / b:.2f}"
        row = f"{f'{B}, {H}, {Hkv}, {S}, {D}':<22}"
        row += "".join(f"{cell(tflops[n]):>22}" for n in backends)
        o, f_, c = tflops["ours"], tflops["sdpa-flash"], tflops["sdpa-cudnn"]
        row += f"{ratio(o[0], f_[0]) + '/' + ratio(o[1], f_[1]):>12}{ratio(o[0], c[0]) + '/' + ratio(o[1], c[1]):>12}"
        row += "   " + " ".join(f"{e:.2g}" for e in errs)
        print(row, flush=True)
        del q, k, v, do
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
