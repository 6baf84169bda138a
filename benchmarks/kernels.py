"""Fused layers (ours, Triton) vs the eager torch reference vs torch.compile of the reference.

Forward + backward, bf16, at MiniMind's shapes (ANCHORS.md): T tokens × hidden 768,
intermediate 2432, vocab 6400, RoPE on q 8 heads / k 4 heads of dim 96. Prints the median ms
and the peak extra memory (peak allocated during one forward+backward minus what was allocated
before it: inputs and weights are excluded, outputs and gradients included).

    python -m benchmarks.kernels              # needs a CUDA GPU
"""
import argparse
import os
import sys

if not __package__:
    # Run as `python benchmarks/kernels.py`, this file's folder comes first on sys.path, where this
    # file would shadow the PyPI package `kernels` for any library that imports it (ours is
    # minillm.kernels, which it cannot shadow).
    sys.path.remove(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

HIDDEN, INTER, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 768, 2432, 6400, 8, 4, 96


def cases(T, device="cuda", dtype=torch.bfloat16):
    """name -> (reference fn, fused fn, make_inputs); inputs needing grads are leaves."""
    from minillm.kernels import reference as ref
    from minillm.kernels.cross_entropy import linear_cross_entropy
    from minillm.kernels.rmsnorm import rms_norm
    from minillm.kernels.rope import apply_rope
    from minillm.kernels.swiglu import swiglu

    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0, grad=True):
        return (scale * torch.randn(*shape, device=device, dtype=dtype, generator=g)).requires_grad_(grad)

    def rope_inputs():
        inv = 1.0 / 1e6 ** (torch.arange(0, HEAD_DIM, 2, device=device).float() / HEAD_DIM)
        freqs = torch.outer(torch.arange(T, device=device).float(), inv)
        emb = torch.cat((freqs, freqs), -1)
        return [randn(1, HEADS, T, HEAD_DIM), randn(1, KV_HEADS, T, HEAD_DIM), emb.cos(), emb.sin()]

    targets = torch.randint(0, VOCAB, (T,), device=device, generator=g)
    return {
        "RMSNorm": (lambda x, w: ref.rms_norm_ref(x, w, 1e-6), lambda x, w: rms_norm(x, w, 1e-6),
                    lambda: [randn(T, HIDDEN), (1 + randn(HIDDEN, scale=0.1, grad=False)).requires_grad_()]),
        "SwiGLU": (ref.swiglu_ref, swiglu, lambda: [randn(T, INTER), randn(T, INTER)]),
        "linear + cross-entropy": (lambda h, w: ref.linear_cross_entropy_ref(h, w, targets),
                                   lambda h, w: linear_cross_entropy(h, w, targets),
                                   lambda: [randn(T, HIDDEN), randn(VOCAB, HIDDEN, scale=0.02)]),
        "RoPE (q 8, k 4 heads, d 96)": (ref.apply_rope_ref, apply_rope, rope_inputs),
    }


def fwd_bwd(fn, inputs, grads_out):
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, grads_out)


def measure(fn, inputs):
    """(median ms, peak extra MB) of one forward+backward, or (None, None) if fn fails."""
    from triton.testing import do_bench
    try:
        with torch.no_grad():
            out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        grads_out = [torch.randn_like(o) if o.dim() else torch.ones_like(o) for o in outs]
        del out, outs
        fwd_bwd(fn, inputs, grads_out)  # compile / autotune outside the timing
        torch.cuda.synchronize()
        ms = do_bench(lambda: fwd_bwd(fn, inputs, grads_out), warmup=25, rep=100, return_mode="median")
        for t in inputs:
            t.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd(fn, inputs, grads_out)
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        return ms, peak_mb
    except Exception as e:  # e.g. torch.compile unavailable: report, keep going
        print(f"    ({type(e).__name__}: {str(e).splitlines()[0][:120]})", file=sys.stderr)
        return None, None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[10880, 16384], help="T values to run")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU (none found); nothing was measured.")

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, forward+backward: "
          f"median ms / peak extra MB")
    print(f"{'op':<30}{'T':>7}{'eager':>18}{'compiled':>18}{'fused (ours)':>18}{'speedup vs eager':>18}")
    for T in args.tokens:
        for name, (reference, fused, make_inputs) in cases(T).items():
            variants = {"eager": reference, "compiled": None if args.no_compile else torch.compile(reference),
                        "fused": fused}
            results = {}
            for label, fn in variants.items():
                if fn is None:
                    results[label] = (None, None)
                    continue
                torch.cuda.empty_cache()
                results[label] = measure(fn, make_inputs())

            def cell(r):
                return "n/a" if r[0] is None else f"{r[0]:.3f} / {r[1]:.0f}"
            speedup = ("n/a" if None in (results["eager"][0], results["fused"][0])
                       else f"{results['eager'][0] / results['fused'][0]:.2f}x")
            print(f"{name:<30}{T:>7}" + "".join(f"{cell(results[k]):>18}" for k in variants) + f"{speedup:>18}",
                  flush=True)


if __name__ == "__main__":
    main()
