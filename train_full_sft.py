"""Stage 2: full supervised fine-tuning. Turns the pretrained model into a chat model.

    python train_full_sft.py                                   # demo: out/pretrain -> out/full_sft, CPU ok
    python train_full_sft.py --data_path sft_mini_512.jsonl --max_seq_len 512 --learning_rate 5e-6
    torchrun --nproc_per_node 8 train_full_sft.py --data_path ...

Every parameter trains on ChatML conversations; the loss covers each assistant turn's content
and its <|im_end|>, never system/user text or padding (the tokenizer's loss mask). Rows are
batched by similar length, so little compute goes to padding; the run reports how much did.
"""
from minillm.data import LengthGroupedBatchSampler, SFTDataset, pad_collate
from minillm.trainer import Trainer, build_on_main_first, main_guard, prepare_stage

STAGE_DEFAULTS = dict(
    data_path="dataset/demo/sft.jsonl", init_from="out/pretrain", save_weight="full_sft", epochs=2,
    # a gentle rate: SFT teaches the chat format on top of pretrained knowledge; at 1e-3 the demo
    # model learns "a trained name -> its answer" instead (demo held-out accuracy 22% vs 45% at 1e-4)
    batch_size=16, max_seq_len=256, learning_rate=1e-4, accumulation_steps=1,
    log_interval=10, save_interval=100,
)

# MiniMind's trick: some conversations get a random system prompt, so the model learns to
# follow one without depending on it. Bilingual, like the data.
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are minillm, a small and friendly AI assistant.",
    "You are a knowledgeable assistant. Answer briefly and accurately.",
    "Answer the user's question in one short sentence.",
    "你是一个乐于助人的助手。",
    "你是minillm，一个友好的小型人工智能助手。",
    "你是一个知识渊博的助手，请简洁准确地回答。",
    "请用一句话回答用户的问题。",
]


def add_sft_args(parser):
    parser.add_argument("--system_prompt_prob", type=float, default=0.2,
                        help="probability that a conversation without a system message gets a random one "
                             "from a built-in bilingual list (0 = never)")


def sft_loss(model, batch):
    """Mean cross-entropy over the assistant tokens only (labels are -100 everywhere else)."""
    out = model(batch["input_ids"], labels=batch["labels"])
    return out.loss, ({"aux_loss": out.aux_loss} if out.aux_loss.requires_grad else {})


class CountingCollate:
    """pad_collate plus `n_tokens`, the batch's real (unpadded) tokens, as a host int: tok/s
    then counts real work, and reading it costs no device sync."""

    def __init__(self, pad_id: int):
        self.pad = pad_collate(pad_id)

    def __call__(self, items):
        batch = self.pad(items)
        batch["n_tokens"] = sum(len(item["input_ids"]) for item in items)
        return batch


def main(argv=None):
    stage, args = prepare_stage(__doc__, STAGE_DEFAULTS, argv, extra_args=add_sft_args)
    cfg = stage.cfg

    # rendered and masked once (rank 0 first); rows longer than max_seq_len are cut, mask with them
    dataset = build_on_main_first(stage.dist, lambda: SFTDataset(
        cfg.data_path, stage.tokenizer, cfg.max_seq_len, skip_bad=bool(cfg.skip_bad_lines),
        system_prompts=SYSTEM_PROMPTS, system_prompt_prob=args.system_prompt_prob, seed=cfg.seed))
    sampler = LengthGroupedBatchSampler(dataset.lengths, cfg.batch_size, stage.dist.rank, stage.dist.world_size,
                                        seed=cfg.seed)
    collate = CountingCollate(stage.tokenizer.pad_id)
    if stage.dist.is_main:
        print(f"model: {stage.model.num_params() / 1e6:.2f}M parameters from {cfg.init_from or 'scratch'}; "
              f"data: {dataset.report()}")

    trainer = Trainer(cfg, stage.model, stage.tokenizer, dataset, sampler, collate_fn=collate,
                      loss_fn=sft_loss, dist_info=stage.dist, tokens_in_batch=lambda b: b["n_tokens"],
                      stage_args=stage.stage_args)
    trainer.fit()
    trainer.log(f"padding: {100 * collate.pad.padding_fraction():.1f}% of the positions in this run's batches")
    trainer.log(f"done: checkpoint in {trainer.run_dir}")
    return trainer


if __name__ == "__main__":
    main_guard(main)
