"""Pretraining tokens/s of MiniMind's own train_pretrain.py and ours, interleaved on one machine.

    python benchmarks/vs_minimind.py --minimind_dir PATH            # 3 rounds, MiniMind-3's shape at hidden 512
    python benchmarks/vs_minimind.py --minimind_dir PATH --rounds 1 --steps 20

PATH is a copy of MiniMind's source tree (the folder holding trainer/, model/, dataset/); nothing is
downloaded. Both scripts train the same model shape (MiniMind-3's layout: 8/4 heads, head dim 64,
q/k norm, RMSNorm eps 1e-6, SwiGLU width ceil(hidden * pi / 64) * 64, tied 6,400-token vocabulary)
on the same corpus (the demo's pretrain.jsonl, MiniMind's {"text": ...} format), with their data
loaders (one worker each), logging every 10 steps and no checkpoint in the timed window. Each is
timed the same way: wall time from its step W to its step W + S, read off its own log lines
(MiniMind's: the time each "(step/iters)" line arrives; ours: `--benchmark S --benchmark_warmup W`),
tokens = S x batch x seq_len positions (MiniMind pads its rows to seq_len; ours packs them: the same
positions through the model either way). Two more columns say what those positions train: the
tokens with a loss target per second (MiniMind's padding carries none: each row is one document,
cut at seq_len, padded to it; ours packs documents into full rows) and the UTF-8 bytes of corpus
text per second (tokenizer-independent: the two tokenizers split the text differently), both from
each script's own tokenizer run over the corpus. The rounds interleave the runs (MiniMind, ours fp32, ours
bf16 autocast, then again), so slow spells of a shared machine fall on all of them; the table gives
each round, the median, and the median of the per-round ratios to MiniMind (paired, as farm-bench pairs).
"""
import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MM_LOG = re.compile(r"\((\d+)/\d+\), loss")
OURS_RESULT = re.compile(r"benchmark: ([\d,.]+) tokens/s over (\d+) steps \(([\d.]+) s\)")


def minimind_run(args, data: str) -> float:
    """Run MiniMind's trainer/train_pretrain.py; tokens/s between its step W and step W + S log lines."""
    trainer = Path(args.minimind_dir) / "trainer"
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "train_pretrain.py", "--save_dir", out, "--epochs", "1",
               "--batch_size", str(args.batch_size), "--learning_rate", "5e-4", "--device", "cpu",
               "--dtype", "float32", "--num_workers", "1", "--accumulation_steps", "1",
               "--log_interval", "10", "--save_interval", "100000000",
               "--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers),
               "--max_seq_len", str(args.seq_len), "--data_path", data]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(cmd, cwd=trainer, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        stamps, tail = {}, []
        try:
            for line in proc.stdout:
                tail = (tail + [line])[-20:]
                m = MM_LOG.search(line)
                if m:
                    stamps[int(m.group(1))] = time.perf_counter()
                    if args.warmup + args.steps in stamps:
                        break
        finally:
            proc.kill()
            proc.wait()
    end = args.warmup + args.steps
    if args.warmup not in stamps or end not in stamps:
        sys.exit("MiniMind's train_pretrain.py stopped before step %d:\n%s" % (end, "".join(tail)))
    return args.steps * args.batch_size * args.seq_len / (stamps[end] - stamps[args.warmup])


def ours_run(args, data: str, dtype: str) -> float:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(ROOT / "train_pretrain.py"), "--preset", "minimind-3",
               "--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers),
               "--set", f"head_dim={args.hidden_size // 8}",
               "--set", f"intermediate_size={math.ceil(args.hidden_size * math.pi / 64) * 64}",
               "--vocab_size", "6400", "--batch_size", str(args.batch_size), "--max_seq_len", str(args.seq_len),
               "--data_path", data, "--dtype", dtype, "--num_workers", "1", "--log_interval", "10",
               "--benchmark", str(args.steps), "--benchmark_warmup", str(args.warmup), "--save_dir", out,
               "--optimizer", "adamw"]  # MiniMind trains with AdamW: the same optimizer work
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    m = OURS_RESULT.search(res.stdout + res.stderr)
    if res.returncode or not m:
        sys.exit(f"train_pretrain.py --benchmark failed (exit {res.returncode}):\n{(res.stdout + res.stderr)[-3000:]}")
    return float(m.group(1).replace(",", ""))


def corpus_yield(args, data: str) -> dict:
    """Per position of each script's rows on this corpus: the share that carries a loss target and the
    text bytes trained. MiniMind: row = [bos] + doc[:seq_len - 2] + [eos] + pads, targets = its non-pad
    tokens after the first. Ours: packed rows, every position a target; bytes per position = corpus bytes
    / cached tokens (documents + one EOS each)."""
    import json
    sys.path.insert(0, str(ROOT))
    from minillm.tokenizer import Tokenizer
    from transformers import AutoTokenizer
    texts = [str(json.loads(line)["text"]) for line in open(data, encoding="utf-8") if line.strip()]
    mm_tok = AutoTokenizer.from_pretrained(str(Path(args.minimind_dir) / "model"))
    mm_targets = mm_bytes = 0
    for ids in mm_tok(texts, add_special_tokens=False, max_length=args.seq_len - 2, truncation=True).input_ids:
        mm_targets += len(ids) + 1  # bos, the document, eos: every token after the first is a target
        mm_bytes += len(mm_tok.decode(ids).encode("utf-8"))
    ours = Tokenizer.load()
    our_tokens = sum(len(ids) + 1 for ids in ours.encode_batch(texts))
    our_bytes = sum(len(t.encode("utf-8")) for t in texts)
    rows = len(texts) * args.seq_len
    return {"minimind": (mm_targets / rows, mm_bytes / rows), "ours": (1.0, our_bytes / our_tokens)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minimind_dir", required=True, help="a copy of MiniMind's source (trainer/, model/, dataset/)")
    p.add_argument("--data_path", default=str(ROOT / "dataset" / "demo" / "pretrain.jsonl"),
                   help="pretraining jsonl both scripts read")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=30, help="timed steps (a multiple of 10: MiniMind logs every 10)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (a multiple of 10)")
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--runs", default="minimind,float32,bfloat16",
                   help="which runs, in order: minimind, float32, bfloat16 (ours with that --dtype)")
    args = p.parse_args()
    if args.steps % 10 or args.warmup % 10 or args.warmup < 10:
        p.error("--steps and --warmup must be multiples of 10 (MiniMind logs every 10 steps), --warmup >= 10")
    if not (Path(args.minimind_dir) / "trainer" / "train_pretrain.py").is_file():
        p.error(f"--minimind_dir {args.minimind_dir}: no trainer/train_pretrain.py there")
    data = str(Path(args.data_path).resolve())
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    for r in runs:
        if r not in ("minimind", "float32", "bfloat16"):
            p.error(f"--runs: unknown run {r!r}; choose from minimind, float32, bfloat16")
    results = {r: [] for r in runs}
    for rnd in range(args.rounds):
        for r in runs:
            tok_s = minimind_run(args, data) if r == "minimind" else ours_run(args, data, r)
            results[r].append(tok_s)
            print(f"round {rnd + 1} {r}: {tok_s:,.0f} tokens/s", flush=True)
    print(f"\nhidden {args.hidden_size}, {args.num_hidden_layers} layers, batch {args.batch_size} x {args.seq_len}, "
          f"{args.steps} timed steps after {args.warmup}, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}\n")
    per_position = corpus_yield(args, data)
    print("\n".join(table(results, per_position)))
    print(f"\nper position on {Path(data).name}: MiniMind {per_position['minimind'][0]:.1%} carry a target, "
          f"{per_position['minimind'][1]:.2f} text bytes; ours 100%, {per_position['ours'][1]:.2f} bytes")


NAMES = {"minimind": "MiniMind train_pretrain.py (fp32)", "float32": "minillm train_pretrain.py fp32",
         "bfloat16": "minillm train_pretrain.py bf16 autocast"}


def table(results: dict, per_position: dict) -> list[str]:
    """Markdown rows: each round's positions/s, the median, and three paired ratios to MiniMind (each
    round's run over the same round's MiniMind, then the median of those), in positions, target tokens
    and text bytes (the last two scale the positions ratio by what a position carries for each script)."""
    rounds = len(next(iter(results.values())))
    lines = ["| run | " + " | ".join(f"round {i + 1}" for i in range(rounds))
             + " | median positions/s | vs MiniMind | target tokens/s | vs MiniMind | text bytes/s | vs MiniMind |",
             "|---|" + "---|" * (rounds + 6)]
    mm = results.get("minimind")
    mm_share, mm_bytes = per_position["minimind"]
    for r, values in results.items():
        med = statistics.median(values)
        share, nbytes = per_position["minimind" if r == "minimind" else "ours"]
        ratio = statistics.median(v / m for v, m in zip(values, mm)) if mm else None
        cells = [f"{med:,.0f}", f"{ratio:.2f}x" if mm else "-",
                 f"{med * share:,.0f}", f"{ratio * share / mm_share:.2f}x" if mm else "-",
                 f"{med * nbytes:,.0f}", f"{ratio * nbytes / mm_bytes:.2f}x" if mm else "-"]
        lines.append(f"| {NAMES[r]} | " + " | ".join(f"{v:,.0f}" for v in values) + " | " + " | ".join(cells) + " |")
    return lines

if __name__ == "__main__":
    main()
