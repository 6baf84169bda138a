"""Pretraining throughput: tokens/s, MFU, peak memory and a step-time breakdown.

    python benchmarks/train_throughput.py --preset minimind-3 --batch_size 32 --seq_len 340   # CUDA
    python benchmarks/train_throughput.py --preset demo --batch_size 8 --seq_len 256 --steps 5  # CPU
    python benchmarks/train_throughput.py --preset minimind-3 --backend torch --compile 0       # eager baseline

It runs the same step the trainer runs (autocast, model(ids, labels=...) loss, backward, clip,
AdamW) on random tokens after warm-up, timing each phase with device syncs between them (the
syncs cost a little; the tokens/s figure comes from separate un-synced steps).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from minillm.config import ModelConfig, add_set_flag, parse_set  # noqa: E402
from minillm.model import MiniLLM  # noqa: E402
from minillm.trainer import (COMPILE_MODES, H100_BF16_FLOPS, autocast_context, compile_mode,  # noqa: E402
                             flops_per_token, training_dtype)


def take_out_elementwise_ops():
    """--floor: replace the per-element layers by (almost) nothing, keeping every matmul and attention."""
    from kernels import dispatch
    dispatch.rms_norm = lambda x, weight, eps=1e-6, backend="auto": x
    dispatch.apply_rope = lambda q, k, cos, sin, backend="auto": (q, k)
    dispatch.swiglu = lambda gate, up, backend="auto": gate + up
    dispatch.linear_cross_entropy = lambda h, w, targets, ignore_index=-100, backend="auto": (h @ w.t()).mean()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--accumulation_steps", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", help="autocast dtype, as the trainer's --dtype (float32 = off)")
    p.add_argument("--backend", default="auto", help="kernel backend: auto | triton | torch")
    p.add_argument("--compile", type=int, default=-1, help="torch.compile (-1 = on for CUDA)")
    p.add_argument("--compile_mode", default="default", help=f"torch.compile mode: {' | '.join(COMPILE_MODES)}")
    p.add_argument("--floor", type=int, default=0,
                   help="1 = time the step with RMSNorm, RoPE and the softmax of the loss taken out (identity; the MLP "
                        "adds gate and up): only the matmuls, attention and the optimizer remain, the floor that no "
                        "elementwise fusion can go below (a wrong model: for this bound only)")
    add_set_flag(p, flags=("kernel_backend",))  # typed and checked as the stage scripts' --set; --backend sets kernels
    args = p.parse_args()
    args.set = getattr(args, "set", [])
    overrides = parse_set(args.set)
    if "kernel_backend" in overrides:
        p.error("--set kernel_backend=...: use --backend")

    if args.floor:
        take_out_elementwise_ops()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    cfg = ModelConfig.preset(args.preset, kernel_backend=args.backend, **overrides)
    torch.manual_seed(0)
    model = MiniLLM(cfg).to(device).train()
    mode = compile_mode(args.compile_mode)
    compile_on = args.compile == 1 or (args.compile == -1 and cuda)
    step_model = torch.compile(model, mode=mode) if compile_on else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    amp_dtype = training_dtype(args.dtype, device)
    # the data: random rows staged in pinned host memory, copied asynchronously as the loader does
    host = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), pin_memory=cuda)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step(timed: dict | None):
        marks = [time.perf_counter()]

        def mark():
            if timed is not None:
                sync()
                marks.append(time.perf_counter())
        for _ in range(args.accumulation_steps):
            batch = host.to(device, non_blocking=True)
            ids, labels = batch[:, :-1], batch[:, 1:]
            mark()
            with autocast_context(amp_dtype, device):
                loss = step_model(ids, labels=labels).loss
            mark()
            (loss / args.accumulation_steps).backward()
            mark()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark()
        if timed is not None:
            d = [b - a for a, b in zip(marks, marks[1:])]
            for i in range(args.accumulation_steps):
                timed["data"] += d[3 * i]
                timed["forward"] += d[3 * i + 1]
                timed["backward"] += d[3 * i + 2]
            timed["optimizer"] += d[-1]

    for _ in range(args.warmup):
        step(None)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(None)
    sync()
    elapsed = time.perf_counter() - t0
    phases = dict.fromkeys(("data", "forward", "backward", "optimizer"), 0.0)
    for _ in range(max(1, args.steps // 2)):
        step(phases)

    tokens = args.steps * args.accumulation_steps * args.batch_size * args.seq_len
    tok_s = tokens / elapsed
    fpt = flops_per_token(cfg, args.seq_len)
    extra = "".join(f" {item}" for item in args.set)
    print(f"preset {args.preset}{extra} ({model.num_params() / 1e6:.1f}M), batch {args.batch_size} x seq {args.seq_len} "
          f"x accum {args.accumulation_steps}, device {torch.cuda.get_device_name(device) if cuda else 'cpu'}, "
          f"dtype {str(amp_dtype).removeprefix('torch.') if amp_dtype else 'float32'}, backend {args.backend}, "
          f"compile {args.compile_mode if step_model is not model else 'off'}"
          + (", FLOOR: norms, RoPE, activation and softmax taken out" if args.floor else ""))
    print(f"tokens/s {tok_s:,.0f}")
    print(f"FLOPs/token {fpt / 1e6:.1f}M (6N + 12*L*H*Q*T)")
    if cuda:
        print(f"MFU {100 * tok_s * fpt / H100_BF16_FLOPS:.1f}% of {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s")
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB")
    else:
        print(f"achieved {tok_s * fpt / 1e9:.1f} GFLOP/s")
    total = sum(phases.values())
    print("step time breakdown (synced): " + ", ".join(
        f"{k} {100 * v / total:.0f}%" for k, v in phases.items()))


if __name__ == "__main__":
    main()
