"""Loss beyond the training length, with and without YaRN: a checkpoint trained at --max_seq_len L is read
at 4·L tokens, and the loss is reported per position range (plain RoPE vs YaRN factor 4 over L).

    python benchmarks/yarn_context.py --checkpoint out/pretrain --length 1024 --windows 32

The text is the demo's pretraining corpus read in long windows (the model saw it only in L-token rows), so
what changes between the columns is how positions beyond L are encoded, not the text.
"""
import argparse
import math

import torch

from minillm.checkpoint import load_checkpoint
from minillm.cli import trained_seq_len, use_yarn
from minillm.data.jsonl import read_jsonl


def position_losses(model, windows, edges):
    sums = torch.zeros(len(edges) - 1)
    counts = torch.zeros(len(edges) - 1)
    with torch.no_grad():
        for ids in windows:
            ce = model(ids[None, :-1], labels=ids[None, 1:], reduction="none").ce_loss[0]
            for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
                sums[i] += ce[a:b].sum()
                counts[i] += ce[a:b].numel()
    return (sums / counts).tolist()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="out/pretrain")
    p.add_argument("--data_path", default="dataset/demo/pretrain.jsonl")
    p.add_argument("--length", type=int, default=1024, help="tokens per window")
    p.add_argument("--windows", type=int, default=32)
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = load_checkpoint(args.checkpoint)
    model.eval()
    trained = trained_seq_len(args.checkpoint) or 256
    stream = []
    for _, obj in read_jsonl(args.data_path, {"text": str}):
        stream += tok.encode(obj["text"]) + [tok.eos_id]
        if len(stream) > (args.length + 1) * args.windows:
            break
    windows = [torch.tensor(stream[i * (args.length + 1):(i + 1) * (args.length + 1)]) for i in range(args.windows)]
    edges = [0, trained, 2 * trained, args.length]
    plain = position_losses(model, windows, edges)
    factor = args.length / trained
    use_yarn(model, str(factor), trained)
    yarn = position_losses(model, windows, edges)
    print(f"{args.checkpoint} (trained at {trained} tokens), {args.windows} windows of {args.length} tokens "
          f"from {args.data_path}; mean loss (perplexity) per position range")
    print("| positions | plain RoPE | YaRN factor %g over %d |" % (factor, trained))
    print("|---|---|---|")
    for (a, b), x, y in zip(zip(edges[:-1], edges[1:]), plain, yarn):
        print(f"| {a}–{b} | {x:.3f} ({math.exp(x):.1f}) | {y:.3f} ({math.exp(y):.1f}) |")


if __name__ == "__main__":
    main()
