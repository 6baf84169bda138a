"""Held-out figures for every demo checkpoint, in one table: did each stage change behaviour?

    python scripts/demo_report.py                    # after the demo stages (README: the demo pipeline)
    python scripts/demo_report.py --save_dir out --markdown

Rows are stages (a checkpoint folder, optionally with a LoRA adapter), columns the demo's held-out
sets; a stage whose checkpoint is missing is listed as "not trained". Every figure is a greedy
generation (or, for the preference set, log-probs) on questions that appear in no training file:
- facts: heldout_sft, questions about entities pretraining describes but no Q&A ever asks about;
- medical / identity: heldout_medical / heldout_identity, phrasings the LoRA files never use;
- preference: heldout_dpo, share of pairs where log π(chosen) > log π(rejected), and the mean margin;
- reasoning: heldout_reason, think/answer format compliance and answer accuracy (arithmetic never trained);
- rl prompts: the first 64 rlaif.jsonl prompts (training prompts of the RL stages, not held out), the share
  of greedy replies that contain the answer: what GRPO / PPO optimise.
The reward model (out/reward) gets a line of its own: held-out pairwise accuracy on heldout_dpo.
The distilled student (out/full_dist: `train_distillation.py`, a new 0.64M model) is followed by the same
student trained with CE alone (`--alpha 1 --save_weight full_dist_ce`); their held-out loss is in benchmarks/distill_demo.py.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minillm.checkpoint import load_checkpoint  # noqa: E402
from minillm.preference import preference_margins  # noqa: E402
from minillm.evaluation import heldout_accuracy, read_heldout  # noqa: E402
from minillm.lora import load_lora  # noqa: E402
from minillm.reasoning import evaluate_reasoning  # noqa: E402

# (row label, checkpoint folder, LoRA adapter folder or None)
STAGES = [("pretrain", "pretrain", None), ("full SFT", "full_sft", None),
          ("SFT + lora_medical", "full_sft", "lora_medical"), ("SFT + lora_identity", "full_sft", "lora_identity"),
          ("DPO", "dpo", None), ("reasoning distill", "reason", None), ("GRPO", "grpo", None),
          ("PPO", "ppo_actor", None), ("distilled student (0.64M)", "full_dist", None),
          ("the same student, CE only", "full_dist_ce", None)]
COLUMNS = ["facts", "medical", "identity", "preference", "reasoning", "rl prompts"]
RL_PROMPTS = 64


def evaluate(model, tok, sets: dict) -> dict[str, str]:
    cells = {}
    for column, name in (("facts", "heldout_sft"), ("medical", "heldout_medical"), ("identity", "heldout_identity")):
        result = heldout_accuracy(model, tok, sets[name])
        cells[column] = f"{100 * result.accuracy:.1f}%"
    margins = preference_margins(model, tok, sets["heldout_dpo"], "cpu")
    cells["preference"] = f"{100 * (margins > 0).float().mean():.1f}% (margin {margins.mean():.1f})"
    report = evaluate_reasoning(model, tok, sets["heldout_reason"])
    cells["reasoning"] = f"format {100 * report.compliance:.0f}%, answer {100 * report.accuracy:.0f}%"
    cells["rl prompts"] = f"{100 * heldout_accuracy(model, tok, sets['rlaif']).accuracy:.1f}%"
    return cells


def rl_prompt_rows(path, limit: int) -> list[dict]:
    """The first `limit` rlaif rows as {question, answer} (one user turn each)."""
    from minillm.data.jsonl import read_jsonl
    rows = []
    for _, obj in read_jsonl(path, {"conversations": list, "answer": str}):
        rows.append({"question": obj["conversations"][0]["content"], "answer": obj["answer"]})
        if len(rows) == limit:
            break
    return rows


def reward_model_line(save_dir: Path, pairs_path: Path) -> str | None:
    """Held-out pairwise accuracy of the demo reward model, when out/reward exists."""
    from minillm.reward import load_reward_model, read_heldout_pairs, reward_margins
    if not (save_dir / "reward" / "model.safetensors").is_file():
        return None
    model = load_reward_model(save_dir / "reward")
    margins = reward_margins(model, model_tokenizer(save_dir / "reward"), read_heldout_pairs(pairs_path), "cpu")
    return (f"reward model ({save_dir / 'reward'}): held-out pairwise accuracy {100 * (margins > 0).float().mean():.1f}% "
            f"on {len(margins)} pairs, mean margin {margins.mean():.2f}")


def model_tokenizer(folder):
    from minillm.tokenizer import Tokenizer
    return Tokenizer.load(folder)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--save_dir", default="out", help="where the demo stages wrote their checkpoints")
    parser.add_argument("--demo_dir", default="dataset/demo", help="folder with the heldout_*.jsonl files")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table (for README/notes)")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N rows of each set (quick look)")
    args = parser.parse_args(argv)

    sets = {name: read_heldout(Path(args.demo_dir) / f"{name}.jsonl")
            for name in ("heldout_sft", "heldout_medical", "heldout_identity", "heldout_dpo", "heldout_reason")}
    sets["rlaif"] = rl_prompt_rows(Path(args.demo_dir) / "rlaif.jsonl", RL_PROMPTS)
    if args.limit:
        sets = {name: rows[:args.limit] for name, rows in sets.items()}
    table = []
    for label, folder, adapter in STAGES:
        folder = Path(args.save_dir) / folder
        if not (folder / "model.safetensors").is_file() or (adapter and not (Path(args.save_dir) / adapter).is_dir()):
            table.append((label, {c: "not trained" for c in COLUMNS}))
            continue
        model, tok = load_checkpoint(folder)
        if adapter:
            load_lora(model, Path(args.save_dir) / adapter)
        model.eval()
        table.append((label, evaluate(model, tok, sets)))
        print(f"{label}: " + "; ".join(f"{c} {v}" for c, v in table[-1][1].items()), flush=True)

    print()
    lines = []
    if args.markdown:
        lines += ["| stage | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
        lines += [f"| {label} | " + " | ".join(cells[c] for c in COLUMNS) + " |" for label, cells in table]
    else:
        width = max(len(label) for label, _ in table)
        lines += [f"{label:<{width}}  " + "  ".join(f"{c}: {cells[c]}" for c in COLUMNS) for label, cells in table]
    reward_line = reward_model_line(Path(args.save_dir), Path(args.demo_dir) / "heldout_dpo.jsonl")
    if reward_line:
        lines += ["", reward_line]
    print("\n".join(lines))
    return table


if __name__ == "__main__":
    main()
