"""AdamW vs Muon: held-out bits per byte after the same number of training tokens, each optimizer at its own
best learning rate from a small sweep (every run of the sweep is printed, not just the winners).

    python benchmarks/optimizer.py                                  # demo preset, 200 steps of 4 x 256 tokens
    python benchmarks/optimizer.py --preset minimind2-small --steps 60 --adamw_lrs 5e-4,1e-3 --muon_lrs 0.01,0.02

Every run is train_pretrain.py itself on the demo corpus (same seed, same rows in the same order, 2% held
out), so the only difference between runs is the optimizer and its learning rate. Muon's runs keep AdamW
(for the embeddings, head and norms) at --muon_adamw_lr.
"""
import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_pretrain  # noqa: E402


def run(preset, steps, batch, seq_len, optimizer, lr, muon_lr, data_path):
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--preset", preset, "--data_path", data_path, "--save_dir", tmp, "--max_steps", str(steps),
                "--batch_size", str(batch), "--max_seq_len", str(seq_len), "--eval_split", "0.02",
                "--eval_interval", str(steps), "--save_interval", "0", "--use_tensorboard", "0",
                "--log_interval", str(steps), "--optimizer", optimizer, "--learning_rate", str(lr),
                "--muon_lr", str(muon_lr), "--num_workers", "0"]
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            trainer = train_pretrain.main(argv)
        seconds = time.perf_counter() - start
    step, metrics = trainer.eval_metrics[-1]
    return {"loss": trainer.eval_history[-1][1], "bpb": metrics["bits_per_byte"], "seconds": seconds,
            "train_loss": trainer.history[-1]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--data_path", default="dataset/demo/pretrain.jsonl")
    p.add_argument("--adamw_lrs", default="1e-3,2e-3,4e-3")
    p.add_argument("--muon_lrs", default="0.01,0.02,0.04")
    p.add_argument("--muon_adamw_lr", type=float, default=2e-3, help="AdamW's learning rate inside Muon runs")
    args = p.parse_args()
    rows = []
    for optimizer, lrs in (("adamw", args.adamw_lrs), ("muon", args.muon_lrs)):
        for lr in (float(x) for x in lrs.split(",")):
            adamw_lr = lr if optimizer == "adamw" else args.muon_adamw_lr
            r = run(args.preset, args.steps, args.batch_size, args.seq_len, optimizer, adamw_lr, lr, args.data_path)
            rows.append((optimizer, lr, r))
            print(f"{optimizer} lr {lr:g}: held-out loss {r['loss']:.4f}, bits per byte {r['bpb']:.4f}, "
                  f"{r['seconds']:.0f} s", flush=True)
    tokens = args.steps * args.batch_size * args.seq_len
    print(f"\n{args.preset}, {args.steps} steps x {args.batch_size} x {args.seq_len} = {tokens:,} tokens, "
          f"held-out 2% of {args.data_path}\n")
    print("| optimizer | learning rate | held-out loss | held-out bits per byte | wall s |")
    print("|---|---|---|---|---|")
    for optimizer, lr, r in rows:
        print(f"| {optimizer} | {lr:g} | {r['loss']:.4f} | {r['bpb']:.4f} | {r['seconds']:.0f} |")
    best = {o: min((r for q, _, r in rows if q == o), key=lambda r: r["bpb"]) for o in ("adamw", "muon")}
    print(f"\nbest: AdamW {best['adamw']['bpb']:.4f} vs Muon {best['muon']['bpb']:.4f} bits per byte "
          f"(Muon / AdamW time per run: {statistics.mean(r['seconds'] for q, _, r in rows if q == 'muon') / statistics.mean(r['seconds'] for q, _, r in rows if q == 'adamw'):.2f})")


if __name__ == "__main__":
    main()
