"""Stage 2: full supervised fine-tuning. Turns the pretrained model into a chat model.

    python train_full_sft.py                                   # demo: out/pretrain -> out/full_sft, CPU ok
    python train_full_sft.py --data_path sft_mini_512.jsonl --max_seq_len 512 --learning_rate 5e-6
    python train_full_sft.py --data_path my.jsonl --eval_split 0.02   # held-out loss on 2% of the rows
    torchrun --nproc_per_node 8 train_full_sft.py --data_path ...

Every parameter trains on ChatML conversations; the loss covers each assistant turn's content
and its <|im_end|>, never system/user text or padding. Rows are batched by similar length, so
little compute goes to padding; the run reports how much did.
"""
from minillm.data import IGNORE_INDEX, LengthGroupedBatchSampler, SFTDataset, pad_collate
from minillm.config import stage_group
from minillm.trainer import Trainer, load_datasets, main_guard, prepare_stage

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
    group = stage_group(parser, "SFT")
    group.add_argument("--system_prompt_prob", type=float, default=0.2,
                       help="probability that a conversation without a system message gets a random one "
                            "from a built-in bilingual list (0 = never)")
    group.add_argument("--empty_think_ratio", type=float, default=0.0,
                       help="adaptive thinking: this seeded share of plain replies gets an empty think block "
                            "first, as MiniMind-3's post_processing_chat does (it uses 0.2), so the model learns "
                            "to answer with thinking switched off (--open_thinking 0 at inference)")


def sft_loss(model, batch, totals):
    """Cross-entropy on the assistant's tokens only, exact over the optimizer step."""
    ids, loss_mask = batch["ids"], batch["loss_mask"]
    # Which tokens train: position t reads ids[:, :t+1] and predicts ids[:, t+1]. That target counts
    # only where loss_mask marks it as the assistant's (each reply and the <|im_end|> closing it, as
    # Tokenizer.render_chat renders them); system and user text, role headers and padding get -100:
    # read as context, never trained on.
    labels = ids[:, 1:].masked_fill(~loss_mask[:, 1:], IGNORE_INDEX)
    out = model(ids[:, :-1], labels=labels, reduction="sum")
    # this micro-batch's sum over the step's target count (all micro-batches, all ranks): every
    # target token weighs the same however rows fall into micro-batches and processes
    loss = out.ce_loss / totals["n_targets"] + out.balance_loss / totals["micro_batches"]
    return loss, out.aux_metrics(totals)


def main(argv=None):
    stage, args = prepare_stage(__doc__, STAGE_DEFAULTS, argv, extra_args=add_sft_args)
    cfg = stage.cfg

    # rendered and masked once (rank 0 first); rows longer than max_seq_len + 1 are cut, mask with them.
    # The random system prompts augment training rows only; held-out rows are scored as written.
    def build(path, system_prompt_prob=args.system_prompt_prob, empty_think_ratio=args.empty_think_ratio):
        return SFTDataset(path, stage.tokenizer, cfg.max_seq_len, skip_bad=bool(cfg.skip_bad_lines),
                          system_prompts=SYSTEM_PROMPTS, system_prompt_prob=system_prompt_prob, seed=cfg.seed,
                          empty_think_ratio=empty_think_ratio)
    dataset, eval_set = load_datasets(stage, build, build_eval=lambda path: build(path, 0.0, 0.0))
    sampler = LengthGroupedBatchSampler(dataset.lengths, cfg.batch_size, stage.dist.rank, stage.dist.world_size,
                                        cfg.accumulation_steps, seed=cfg.seed)
    collate = pad_collate(stage.tokenizer.pad_id)
    if stage.dist.is_main:
        print(f"model: {stage.model.num_params() / 1e6:.2f}M parameters from {cfg.init_from or 'scratch'}; "
              f"data: {dataset.report()}" + (f"; {len(eval_set)} held-out rows" if eval_set is not None else ""))

    trainer = Trainer(stage, dataset, sampler, collate)
    trainer.fit(sft_loss, eval_set)
    trainer.log(f"padding: {100 * collate.padding_fraction():.1f}% of the positions in this run's batches")
    trainer.log(f"done: checkpoint in {trainer.run_dir}")
    return trainer


if __name__ == "__main__":
    main_guard(main)
