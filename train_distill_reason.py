"""Stage 5: reasoning distillation. SFT on replies with a think block: MiniMind2's inline
`<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>` content, or MiniMind-3's `reasoning_content` field,
which the tokenizer renders as `<think>\\n...\\n</think>\\n\\n` before the reply. The loss at the tag tokens
(<think> </think> <answer> </answer>) is weighted up so the small model keeps the format, as
MiniMind's train_distill_reason.py does.

    python train_distill_reason.py                             # demo: from out/full_sft on dataset/demo/r1.jsonl
    python train_distill_reason.py --tag_weight 1              # plain SFT, for comparison
    torchrun --nproc_per_node 8 train_distill_reason.py --data_path r1_mix_1024.jsonl --max_seq_len 1024

After training, greedy replies to held-out questions (--report_path; the demo's set when training on
the demo data) are checked for a well-formed think/answer block and the right answer.
"""
import torch

from minillm.data import IGNORE_INDEX, LengthGroupedBatchSampler, SFTDataset, pad_collate
from minillm.evaluation import read_heldout
from minillm.reasoning import evaluate_reasoning
from minillm.config import stage_group
from minillm.trainer import Trainer, load_datasets, main_guard, prepare_stage

STAGE_DEFAULTS = dict(
    init_from="out/full_sft", data_path="dataset/demo/r1.jsonl", save_weight="reason", epochs=2,
    batch_size=16, max_seq_len=512, learning_rate=1e-3, accumulation_steps=1,
    log_interval=10, save_interval=100,
)
DEMO_REPORT = "dataset/demo/heldout_reason.jsonl"


def add_reason_args(parser):
    group = stage_group(parser, "reasoning")
    group.add_argument("--tag_weight", type=float, default=10.0,
                       help="loss weight at targets that are <think> </think> <answer> </answer> (1 = plain SFT)")
    group.add_argument("--report_path", default="auto",
                       help="held-out {question, answer} rows for the format / accuracy report after training; "
                            "auto = the demo's set when training on the demo data, '' = none")
    group.add_argument("--report_max_new_tokens", type=int, default=128, help="reply length limit in the report")


def tag_loss_weights(labels: torch.Tensor, tag_ids, tag_weight: float) -> torch.Tensor:
    """[B, T] weights: `tag_weight` where the target token is one of `tag_ids`, 1 elsewhere.

    Decided from the labels (the ids the model must predict), not from text, so a tag is
    weighted exactly where predicting it is the lesson; -100 positions stay out of the loss anyway.
    """
    is_tag = torch.isin(labels, torch.as_tensor(list(tag_ids), device=labels.device))
    return torch.where(is_tag, tag_weight, 1.0)


class TagCountingCollate:
    """pad_collate plus `n_tag_targets`, how many of the batch's targets are tags (a host int), so the
    trainer can total the step's loss weights before any backward."""

    def __init__(self, pad_id: int, tag_ids):
        self.pad, self.tag_ids = pad_collate(pad_id), torch.tensor(list(tag_ids))

    def __call__(self, items):
        batch = self.pad(items)
        targets = batch["ids"][:, 1:][batch["loss_mask"][:, 1:]]
        batch["n_tag_targets"] = int(torch.isin(targets, self.tag_ids).sum())
        return batch


def make_reason_loss(tag_ids, tag_weight: float):
    def reason_loss(model, batch, totals):
        """Per-token cross-entropy on the assistant's targets, weighted by tag: the weighted mean
        Σ w·ce / Σ w over the whole optimizer step (MiniMind's weighting, exact across micro-batches)."""
        ids, loss_mask = batch["ids"], batch["loss_mask"]
        labels = ids[:, 1:].masked_fill(~loss_mask[:, 1:], IGNORE_INDEX)  # predict t+1 where it is the assistant's
        out = model(ids[:, :-1], labels=labels, reduction="none")        # [B, T] cross-entropy, 0 at -100
        weights = tag_loss_weights(labels, tag_ids, tag_weight)
        # Σ w over the step's targets: 1 per target, tag_weight - 1 more per tag target
        weight_sum = totals["n_targets"] + (tag_weight - 1) * totals["n_tag_targets"]
        loss = (out.ce_loss * weights).sum() / weight_sum + out.balance_loss / totals["micro_batches"]
        return loss, out.aux_metrics(totals)
    return reason_loss


def main(argv=None):
    stage, args = prepare_stage(__doc__, STAGE_DEFAULTS, argv, extra_args=add_reason_args)
    cfg, tok = stage.cfg, stage.tokenizer

    dataset, eval_set = load_datasets(stage, lambda path: SFTDataset(
        path, tok, cfg.max_seq_len, skip_bad=bool(cfg.skip_bad_lines)))
    sampler = LengthGroupedBatchSampler(dataset.lengths, cfg.batch_size, stage.dist.rank,
                                        stage.dist.world_size, cfg.accumulation_steps, seed=cfg.seed)
    collate = TagCountingCollate(tok.pad_id, tok.think_tag_ids)
    if stage.dist.is_main:
        print(f"model: {stage.model.num_params() / 1e6:.2f}M parameters from {cfg.init_from or 'scratch'}; "
              f"data: {dataset.report()}; tag weight {args.tag_weight} on "
              f"{', '.join(tok.id_to_piece(i) for i in tok.think_tag_ids)}")

    trainer = Trainer(stage, dataset, sampler, collate)
    trainer.fit(make_reason_loss(tok.think_tag_ids, args.tag_weight), eval_set)

    report_path = DEMO_REPORT if args.report_path == "auto" and stage.on_demo_data else \
        ("" if args.report_path == "auto" else args.report_path)
    if stage.dist.is_main and report_path:
        rows = read_heldout(report_path)
        trainer.reasoning_report = evaluate_reasoning(trainer.model, tok, rows,
                                                      max_new_tokens=args.report_max_new_tokens)
        trainer.log(f"held-out ({len(rows)} prompts from {report_path}): {trainer.reasoning_report}")
    trainer.log(f"done: checkpoint in {trainer.run_dir}")
    return trainer


if __name__ == "__main__":
    main_guard(main)
