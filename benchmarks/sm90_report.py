"""Compile every Triton kernel for the H100 (sm_90a) on a machine without a GPU, and report
what the compiler made of it: registers, spilled bytes, shared memory, tensor-core
instructions and the widths of the global loads.

    python -m benchmarks.sm90_report                 # every kernel, every config, at model shapes
    python -m benchmarks.sm90_report --only attn     # kernels whose name contains "attn"

How: the kernels are launched through their real launchers (the custom ops in kernels/) on
CPU tensors, with Triton's driver replaced by one that names an sm_90 target and never runs
anything. Every launch compiles (each config of an autotuned kernel) and is disassembled with
the ptxas / nvdisasm that ship with Triton. The specialisation (16-byte alignment, strides
divisible by 16) is Triton's own, from the real argument values.

What it shows and what it does not: whether a config spills registers (slow: local memory),
whether it fits in shared memory (a config that does not fails at launch), and whether the
inner products use Hopper's wgmma (HGMMA) and 16-byte asynchronous copies (LDGSTS.128).
It says nothing about speed; that needs the GPU (benchmarks/attention.py, kernels.py).
Needs a Triton build with the NVIDIA backend (the CPU wheel has it); no CUDA driver.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("sm90_report compiles for the GPU: unset TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 232448  # bytes of shared memory one block may use on an H100 (227 KB)
REGS_PER_SM = 65536
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


class _CompileOnlyDriver:
    """Stands in for the CUDA driver: names an sm_90 target, never launches."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        return torch.device("cpu")


def _ptxas():
    """The newest ptxas Triton ships (its PTX version can be newer than the CUDA 12 ptxas)."""
    for name in ("ptxas-blackwell", "ptxas"):
        path = os.path.join(BIN, name)
        if os.path.exists(path):
            return path
    raise SystemExit(f"no ptxas under {BIN}: this Triton build has no NVIDIA backend")


def analyse(kernel):
    """registers, spill bytes, shared bytes and instruction counts of one compiled kernel."""
    ptx = kernel.asm["ptx"]
    arch = re.search(r"\.target\s+(\S+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as d:
        src, out = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        info = subprocess.run([_ptxas(), "-v", f"--gpu-name={arch}", src, "-o", out],
                              capture_output=True, text=True, check=True).stderr
        with open(out, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), out], capture_output=True, text=True,
                              check=True).stdout
    ops = {}
    for m in re.finditer(r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_.]+)", sass, re.M):
        ops[m.group(1)] = ops.get(m.group(1), 0) + 1
    count = lambda *prefixes: sum(c for op, c in ops.items() if op.startswith(prefixes))  # noqa: E731
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    threads = 32 * kernel.metadata.num_warps
    shared = kernel.metadata.shared
    blocks = min(REGS_PER_SM // max(regs * threads, 1), SMEM_LIMIT // shared if shared else 32)
    return dict(
        arch=arch, regs=regs, shared=shared, blocks_per_sm=blocks,
        spill=sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", info)),
        wgmma=count("HGMMA"), mma=count("HMMA"),
        cp_async_16=count("LDGSTS.E.BYPASS.128", "LDGSTS.E.128"), tma=count("UTMALDG"),
        ldg_16=count("LDG.E.128", "LDG.E.ENL2.128"),
        ldg_narrow=count("LDG.E") - count("LDG.E.128", "LDG.E.ENL2.128", "LDG.E.64"),
        stg_16=count("STG.E.128"))


class Recorder:
    """Patches Triton so every launch compiles each candidate config and records it."""

    def __init__(self):
        self.rows = []
        self.case = ""
        self._seen = set()

    def __enter__(self):
        self._jit_run, self._tune_run = JITFunction.run, Autotuner.run
        self._driver = driver._active  # None on a machine without a GPU
        recorder = self

        def jit_run(fn, *args, grid, warmup, **kwargs):
            return recorder._compile(fn, args, kwargs, config=None)

        def tune_run(tuner, *args, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args))
            for config in tuner.prune_configs(kwargs):
                recorder._compile(tuner.fn, args, {**kwargs, **config.all_kwargs()}, config=config)
            tuner.nargs = None

        JITFunction.run, Autotuner.run = jit_run, tune_run
        driver.set_active(_CompileOnlyDriver())
        return self

    def __exit__(self, *exc):
        JITFunction.run, Autotuner.run = self._jit_run, self._tune_run
        driver._active = self._driver

    def _compile(self, fn, args, kwargs, config):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        kernel = self._jit_run(fn, *args, grid=(1,), warmup=True, **kwargs)
        if (self.case, kernel.hash) in self._seen:  # a chunk loop launches the same binary again
            return kernel
        self._seen.add((self.case, kernel.hash))
        if config is None:
            label = f"w{kernel.metadata.num_warps} s{kernel.metadata.num_stages}"
        else:
            blocks = " ".join(f"{k[len('BLOCK_'):] if k.startswith('BLOCK_') else k}{v}"
                              for k, v in config.kwargs.items())
            label = f"{blocks} w{config.num_warps} s{config.num_stages}"
        self.rows.append(dict(case=self.case, kernel=fn.__name__, config=label, **analyse(kernel)))
        return kernel


def cases(dtype):
    """(name, thunk) pairs; each thunk calls the real launchers at a model's shapes."""
    from minillm.kernels import attention, cross_entropy, moe, rmsnorm, rope, swiglu

    def e(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt)

    def attn(B, H, Hkv, T, D):
        def run():
            # [B, T, H, D] storage seen as [B, H, T, D]: the layout the model passes
            q = e(B, T, H, D).transpose(1, 2)
            k, v = (e(B, T, Hkv, D).transpose(1, 2) for _ in range(2))
            o, lse = e(B, T, H, D).transpose(1, 2), e(B, H, T, dt=torch.float32)
            attention.flash_attn_fwd(q, k, v, True, D ** -0.5)
            attention.flash_attn_bwd(o, q, k, v, o, lse, True, D ** -0.5)
        return run

    def layers(N, hidden, inter, vocab, heads, kv_heads, head_dim):
        def run():
            x, w = e(N, hidden), e(hidden)
            rmsnorm.rms_norm_fwd(x, w, 1e-6)
            rmsnorm.rms_norm_bwd(x, x, w, e(N, dt=torch.float32))
            g = e(N, inter)
            swiglu.swiglu_fwd(g, g)
            swiglu.swiglu_bwd(g, g, g)
            B, T = 32, N // 32
            q, k = e(B, T, heads, head_dim).transpose(1, 2), e(B, T, kv_heads, head_dim).transpose(1, 2)
            cos = e(1, T, head_dim, dt=torch.float32)  # [Bc, T, D], as apply_rope passes it
            rope.rope_fwd(q, k, cos, cos)
            rope.rope_bwd(q, k, cos, cos)
            cross_entropy.linear_cross_entropy_fwd(x, e(vocab, hidden), torch.zeros(N, dtype=torch.long),
                                                   -100, True, True, 0)
        return run

    def grouped(M, E, hidden, inter):
        def run():
            x, counts = e(M, hidden), torch.full((E,), M // E, dtype=torch.int32)
            w = e(E, 2 * inter, hidden)
            moe.grouped_mm_op(x, w.transpose(1, 2), counts)
            moe.grouped_mm_wgrad(x, e(M, 2 * inter), counts, hidden, 2 * inter)
        return run

    return [
        ("attn minimind-3 B32 H8/4 T340 D96", attn(32, 8, 4, 340, 96)),
        ("attn ANCHORS B16 H8/2 T1024 D64", attn(16, 8, 2, 1024, 64)),
        ("attn ANCHORS B4 H16/4 T4096 D128", attn(4, 16, 4, 4096, 128)),
        ("layers minimind-3 N10880 768/2432 V6400", layers(10880, 768, 2432, 6400, 8, 4, 96)),
        ("moe minimind2-moe M16384 E4 640/1728", grouped(16384, 4, 640, 1728)),
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--only", default="", help="keep cases or kernels whose name contains this")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"Triton {triton.__version__}, target sm_90 ({args.dtype}); ptxas {_ptxas()}")
    with Recorder() as rec:
        for name, run in cases(dtype):
            rec.case = name
            if args.only and args.only not in name:
                continue
            run()
    rows = [r for r in rec.rows if not args.only or args.only in r["case"] or args.only in r["kernel"]]
    header = (f"{'kernel':<24}{'config':<22}{'regs':>5}{'spill B':>8}{'smem KB':>8}{'blk/SM':>7}"
              f"{'wgmma':>6}{'cp.async16':>11}{'ldg16':>6}{'ldg<16':>7}{'stg16':>6}")
    problems = []
    for case in dict.fromkeys(r["case"] for r in rows):
        print(f"\n{case}\n{header}")
        for r in (r for r in rows if r["case"] == case):
            print(f"{r['kernel']:<24}{r['config']:<22}{r['regs']:>5}{r['spill']:>8}{r['shared'] / 1024:>8.0f}"
                  f"{r['blocks_per_sm']:>7}{r['wgmma']:>6}{r['cp_async_16']:>11}{r['ldg_16']:>6}"
                  f"{r['ldg_narrow']:>7}{r['stg_16']:>6}")
            if r["spill"] or r["shared"] > SMEM_LIMIT:
                problems.append(f"{case}: {r['kernel']} {r['config']}: spills {r['spill']} B, "
                                f"shared {r['shared']} B")
    print(f"\n{len(rows)} compiled kernels; " + (f"{len(problems)} spill or overflow:\n  " + "\n  ".join(problems)
                                                if problems else "none spills or overflows shared memory"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
