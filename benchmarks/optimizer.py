"""AdamW vs Muon: held-out bits per byte after the same number of training tokens, each optimizer at its own
best learning rate from a small sweep (every run of the sweep is printed, not just the winners).

    python benchmarks/optimizer.py                                  # demo preset, 200 steps of 4 x 256 tokens
    python benchmarks/optimizer.py --preset minimind2-small --dtype bfloat16 \\
        --adamw_lrs 1.25e-4,2.5e-4,5e-4,1e-3 --muon_lrs 0.01,0.02,0.04 --results /tmp/m2s.jsonl
    python benchmarks/optimizer.py --preset minimind2-small --dtype bfloat16 \\
        --optimizers muon --muon_lrs 0.08 --results /tmp/m2s.jsonl   # widen a sweep later; table = all runs

Every run is train_pretrain.py itself on the demo corpus (same seed, same rows in the same order, 2% held
out), so the only difference between runs is the optimizer and its learning rate. Muon's runs keep AdamW
(for the embeddings, head and norms) at --muon_adamw_lr. With --results every run is appended to a jsonl
file as it finishes, and the table covers every run in that file with the same setup (preset, steps,
batch, length, dtype, data), so a sweep can be widened later without repeating it.
"""
import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_pretrain  # noqa: E402


def run(setup, optimizer, lr, muon_lr):
    with tempfile.TemporaryDirectory() as tmp:
        steps = setup["steps"]
        argv = ["--preset", setup["preset"], "--data_path", setup["data_path"], "--save_dir", tmp,
                "--max_steps", str(steps), "--batch_size", str(setup["batch_size"]),
                "--max_seq_len", str(setup["seq_len"]), "--dtype", setup["dtype"], "--eval_split", "0.02",
                "--eval_interval", str(steps), "--save_interval", "0", "--use_tensorboard", "0",
                "--log_interval", str(steps), "--optimizer", optimizer, "--learning_rate", str(lr),
                "--muon_lr", str(muon_lr), "--num_workers", "0"]
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            trainer = train_pretrain.main(argv)
        seconds = time.perf_counter() - start
    step, metrics = trainer.eval_metrics[-1]
    params = sum(p.numel() for p in trainer.model.parameters())
    return {"loss": trainer.eval_history[-1][1], "bpb": metrics["bits_per_byte"], "seconds": seconds,
            "train_loss": trainer.history[-1], "params": params}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", help="model preset (train_pretrain.py --preset)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    p.add_argument("--batch_size", type=int, default=4, help="rows per step")
    p.add_argument("--seq_len", type=int, default=256, help="tokens per row")
    p.add_argument("--dtype", default="float32", help="autocast dtype, the same for every run: float32 | bfloat16")
    p.add_argument("--data_path", default="dataset/demo/pretrain.jsonl", help="pretraining jsonl (2%% held out)")
    p.add_argument("--optimizers", default="adamw,muon", help="which arms to run: adamw, muon or both")
    p.add_argument("--adamw_lrs", default="1e-3,2e-3,4e-3", help="AdamW learning rates to sweep")
    p.add_argument("--muon_lrs", default="0.01,0.02,0.04", help="Muon learning rates to sweep")
    p.add_argument("--muon_adamw_lr", type=float, default=2e-3, help="AdamW's learning rate inside Muon runs")
    p.add_argument("--results", default="", help="jsonl to append each run to; the table then covers every "
                   "run in it with this setup ('' = this invocation's runs only)")
    args = p.parse_args()
    setup = {"preset": args.preset, "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
             "dtype": args.dtype, "data_path": args.data_path}
    sweeps = {"adamw": args.adamw_lrs, "muon": args.muon_lrs}
    rows = []
    for optimizer in args.optimizers.split(","):
        if optimizer not in sweeps:
            p.error(f"--optimizers: unknown optimizer {optimizer!r} (adamw or muon)")
        for lr in (float(x) for x in sweeps[optimizer].split(",")):
            adamw_lr = lr if optimizer == "adamw" else args.muon_adamw_lr
            r = run(setup, optimizer, adamw_lr, lr)
            row = {"setup": setup, "optimizer": optimizer, "lr": lr, "muon_adamw_lr": args.muon_adamw_lr, **r}
            rows.append(row)
            if args.results:
                with open(args.results, "a") as f:
                    f.write(json.dumps(row) + "\n")
            print(f"{optimizer} lr {lr:g}: held-out loss {r['loss']:.4f}, bits per byte {r['bpb']:.4f}, "
                  f"{r['seconds']:.0f} s", flush=True)
    if args.results:
        with open(args.results) as f:
            rows = [r for r in map(json.loads, f) if r["setup"] == setup]
    rows.sort(key=lambda r: (r["optimizer"], r["lr"]))
    tokens = args.steps * args.batch_size * args.seq_len
    params = f"{rows[0]['params'] / 1e6:.1f}M parameters, " if rows else ""
    print(f"\n{args.preset} ({params}{args.dtype}), {args.steps} steps x {args.batch_size} x {args.seq_len} = "
          f"{tokens:,} tokens, held-out 2% of {args.data_path}\n")
    print("| optimizer | learning rate | held-out loss | held-out bits per byte | wall s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['optimizer']} | {r['lr']:g} | {r['loss']:.4f} | {r['bpb']:.4f} | {r['seconds']:.0f} |")
    arms = [o for o in ("adamw", "muon") if any(r["optimizer"] == o for r in rows)]
    for o in arms:
        sweep = [r for r in rows if r["optimizer"] == o]
        best = min(sweep, key=lambda r: r["bpb"])
        edge = "" if sweep[0]["lr"] < best["lr"] < sweep[-1]["lr"] else " (at the edge of the sweep: widen it)"
        print(f"best {o}: lr {best['lr']:g}, {best['bpb']:.4f} bits per byte{edge}")
    if len(arms) == 2:
        mean = {o: statistics.mean(r["seconds"] for r in rows if r["optimizer"] == o) for o in arms}
        print(f"Muon / AdamW wall time per run: {mean['muon'] / mean['adamw']:.2f}")


if __name__ == "__main__":
    main()
