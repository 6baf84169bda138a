"""Held-out loss and fact accuracy of demo checkpoints: does a distilled student beat the same
student trained with cross-entropy alone?

    python benchmarks/distill_demo.py out/full_dist out/full_dist_ce out/full_sft
    python benchmarks/distill_demo.py --markdown out/dist_s* out/ce_s*

The comparison in the README (the same student, the same seeds and steps, distilled or CE alone; ~4.5 min
a run on 2 cores):

    for seed in 42 7 1; do   # the default student: new, 0.64M (preset demo-student), lr 1e-3
      python train_distillation.py --seed $seed --save_weight dist_s$seed
      python train_distillation.py --seed $seed --alpha 1 --save_weight ce_s$seed
    done
    python benchmarks/distill_demo.py --markdown out/dist_s* out/ce_s*

(and with --init_from out/pretrain --init_layers 0,2: a student cut from the pretrained model, lr 1e-4)

Per checkpoint, on the demo's held-out facts (entities pretraining describes but no Q&A row asks about):
- loss / bpb: cross-entropy (nats per token) and bits per byte of the reference answers, on the assistant
  tokens only, teacher-forced. The questions and reference answers are heldout_dpo's (each question with
  its "chosen" reply: the canonical answer sentence, e.g. "The capital of Morkeia is Yagor.");
- facts: greedy answers to the 64 heldout_sft questions that contain the answer (what
  scripts/demo_report.py reports). One question is 1.6 points: a 1-2 question gap is noise.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minillm.checkpoint import load_checkpoint  # noqa: E402
from minillm.evaluation import eval_loss, heldout_accuracy, is_correct, read_heldout  # noqa: E402


def heldout_chat_rows(pairs_path) -> list[dict]:
    """heldout_dpo rows as SFT chats: the question and its chosen (correct, polite) reply, each once."""
    rows, seen = [], set()
    with open(pairs_path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            obj = json.loads(line)
            key = (obj["question"], obj["chosen"])
            if key in seen:
                continue
            seen.add(key)
            rows.append({"conversations": [{"role": "user", "content": obj["question"]},
                                           {"role": "assistant", "content": obj["chosen"]}]})
    return rows


def measure(folder, chat_path, fact_rows) -> dict:
    model, tok = load_checkpoint(folder)
    model.eval()
    loss = eval_loss(model, tok, chat_path)
    facts = heldout_accuracy(model, tok, fact_rows)
    return {"checkpoint": str(folder), "params_m": model.num_params() / 1e6, "loss": loss["loss"],
            "bpb": loss["bits_per_byte"], "tokens": loss["tokens"], "facts_correct": facts.correct,
            "facts_total": facts.total,
            "facts_right": [i for i, (row, reply) in enumerate(zip(fact_rows, facts.replies))
                            if is_correct(reply, row["answer"])]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoint folders (any stage's)")
    parser.add_argument("--demo_dir", default="dataset/demo", help="folder with heldout_sft.jsonl and heldout_dpo.jsonl")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--json", default="", help="also write the figures to this json file")
    args = parser.parse_args(argv)

    demo = Path(args.demo_dir)
    fact_rows = read_heldout(demo / "heldout_sft.jsonl")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        chat_path = Path(tmp) / "heldout_chat.jsonl"
        chat_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                     for r in heldout_chat_rows(demo / "heldout_dpo.jsonl")), encoding="utf-8")
        for folder in args.checkpoints:
            r = measure(folder, chat_path, fact_rows)
            results.append(r)
            print(f"{r['checkpoint']}: {r['params_m']:.2f}M, held-out loss {r['loss']:.4f} ({r['bpb']:.4f} bpb, "
                  f"{r['tokens']} tokens), facts {r['facts_correct']}/{r['facts_total']}", flush=True)
    if args.markdown:
        print("\n| checkpoint | held-out loss | bpb | facts |\n|---|---|---|---|")
        for r in results:
            print(f"| {r['checkpoint']} | {r['loss']:.4f} | {r['bpb']:.4f} | "
                  f"{100 * r['facts_correct'] / r['facts_total']:.1f}% ({r['facts_correct']}/{r['facts_total']}) |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    from minillm.trainer import main_guard
    main_guard(main)  # a wrong folder is one line naming it, not a traceback
