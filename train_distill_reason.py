"""Stage 5: reasoning distillation. SFT on replies of the form
`<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>` (or `reasoning_content` messages, which the
tokenizer renders the same way), with the loss at the four tag tokens weighted up so the small
model keeps the format, as MiniMind's train_distill_reason.py does.

    python train_distill_reason.py                             # demo: from out/full_sft on dataset/demo/r1.jsonl
    python train_distill_reason.py --tag_weight 1              # plain SFT, for comparison
    torchrun --nproc_per_node 8 train_distill_reason.py --data_path r1_mix_1024.jsonl --max_seq_len 1024

After training, greedy replies to the held-out prompts (--eval_path) are checked for a well-formed
think/answer block and the right answer.
"""
import torch

from minillm.data import LengthGroupedBatchSampler, ReasoningDataset, pad_collate
from minillm.evaluation import read_heldout
from minillm.reasoning import evaluate_reasoning
from minillm.trainer import Trainer, build_on_main_first, main_guard, prepare_stage

STAGE_DEFAULTS = dict(
    init_from="out/full_sft", data_path="dataset/demo/r1.jsonl", save_weight="reason", epochs=2,
    batch_size=16, max_seq_len=512, learning_rate=1e-3, accumulation_steps=1,
    log_interval=10, save_interval=100,
)


def add_reason_args(parser):
    parser.add_argument("--tag_weight", type=float, default=10.0,
                        help="loss weight at targets that are <think> </think> <answer> </answer> (1 = plain SFT)")
    parser.add_argument("--eval_path", default="dataset/demo/heldout_reason.jsonl",
                        help="held-out {question, answer} rows for the format / accuracy report ('' = skip)")
    parser.add_argument("--eval_max_new_tokens", type=int, default=128, help="reply length limit in the report")


def tag_loss_weights(labels: torch.Tensor, tag_ids, tag_weight: float) -> torch.Tensor:
    """[B, T] weights: `tag_weight` where the target token is one of `tag_ids`, 1 elsewhere.

    Decided from the labels (the ids the model must predict), not from text, so a tag is
    weighted exactly where predicting it is the lesson; -100 positions stay out of the loss anyway.
    """
    is_tag = torch.isin(labels, torch.as_tensor(list(tag_ids), device=labels.device))
    return torch.where(is_tag, tag_weight, 1.0)


def make_reason_loss(tag_ids, tag_weight: float):
    def reason_loss(model, batch):
        labels = batch["labels"]
        out = model(batch["input_ids"], labels=labels, loss_weights=tag_loss_weights(labels, tag_ids, tag_weight))
        return out.loss, ({"aux_loss": out.aux_loss} if out.aux_loss.requires_grad else {})
    return reason_loss


def main(argv=None):
    stage, args = prepare_stage(__doc__, STAGE_DEFAULTS, argv, extra_args=add_reason_args)
    cfg, tok = stage.cfg, stage.tokenizer

    dataset = build_on_main_first(stage.dist, lambda: ReasoningDataset(
        cfg.data_path, tok, cfg.max_seq_len, skip_bad=bool(cfg.skip_bad_lines)))
    sampler = LengthGroupedBatchSampler(dataset.lengths, cfg.batch_size, stage.dist.rank,
                                        stage.dist.world_size, seed=cfg.seed)
    if stage.dist.is_main:
        print(f"model: {stage.model.num_params() / 1e6:.2f}M parameters from {cfg.init_from or 'scratch'}; "
              f"data: {dataset.report()}; tag weight {args.tag_weight} on "
              f"{', '.join(tok.id_to_piece(i) for i in tok.think_tag_ids)}")

    trainer = Trainer(cfg, stage.model, tok, dataset, sampler, collate_fn=pad_collate(tok.pad_id),
                      loss_fn=make_reason_loss(tok.think_tag_ids, args.tag_weight), dist_info=stage.dist,
                      stage_args=stage.stage_args)
    trainer.fit()

    if stage.dist.is_main and args.eval_path:
        rows = read_heldout(args.eval_path)
        trainer.reasoning_report = evaluate_reasoning(trainer.model, tok, rows,
                                                      max_new_tokens=args.eval_max_new_tokens)
        trainer.log(f"held-out ({len(rows)} prompts from {args.eval_path}): {trainer.reasoning_report}")
    trainer.log(f"done: checkpoint in {trainer.run_dir}")
    return trainer


if __name__ == "__main__":
    main_guard(main)
