"""Stage 1: pretraining. Next-token prediction on raw text, packed into fixed-length rows.

    python train_pretrain.py                                   # demo model on the demo corpus, CPU ok
    python train_pretrain.py --preset minimind-3 --data_path pretrain_hq.jsonl --batch_size 32
    torchrun --nproc_per_node 8 train_pretrain.py --preset minimind2 --data_path ...
    python train_pretrain.py --benchmark 30                    # steady-state tokens/s of this exact setup

The corpus is tokenized once into a memory-mapped cache beside the jsonl; later runs reuse it.
"""
from minillm.data import PretrainDataset, ShardedBatchSampler, packed_collate
from minillm.trainer import Trainer, load_datasets, main_guard, prepare_stage

STAGE_DEFAULTS = dict(
    data_path="dataset/demo/pretrain.jsonl", save_weight="pretrain", epochs=2,
    # small batches: on the demo corpus the number of optimizer steps, not tokens per step, is what
    # lets a tiny model memorise facts (batch 4 -> 888 steps; batch 16 -> 222 steps and 4x fewer facts)
    batch_size=4, max_seq_len=256, learning_rate=2e-3, accumulation_steps=1,
    log_interval=50, save_interval=200,
    # Muon for the blocks' matrices, AdamW (at learning_rate) for the rest: after the same tokens it reaches
    # lower held-out bits per byte on the demo preset and on minimind2-small (benchmarks/optimizer.py), and
    # the demo's later stages score higher from it (README); --optimizer adamw for FSDP2 (--fsdp 1)
    optimizer="muon",
)


def pretrain_loss(model, batch, totals):
    """Cross-entropy at every position: in pretraining each token is a target.

    Every micro-batch holds the same batch_size x max_seq_len targets, so the mean over the step
    is the mean of the micro-batch means: each micro-batch contributes its mean over the number of
    micro-batches in the step (over all ranks). (SFT, whose micro-batches hold unequal numbers of
    targets, divides sums by the step's target count instead.)
    """
    ids = batch["ids"]
    out = model(ids[:, :-1], labels=ids[:, 1:])  # read tokens 0..T-1, predict 1..T
    loss = (out.ce_loss + out.balance_loss) / totals["micro_batches"]
    return loss, out.aux_metrics(totals)


def main(argv=None):
    stage, _ = prepare_stage(__doc__, STAGE_DEFAULTS, argv)
    cfg = stage.cfg

    # tokenized once into a memmap cache (rank 0 builds it, the others reuse it)
    dataset, eval_set = load_datasets(stage, lambda path: PretrainDataset(
        path, stage.tokenizer, cfg.max_seq_len, skip_bad=bool(cfg.skip_bad_lines)))
    sampler = ShardedBatchSampler(len(dataset), cfg.batch_size, stage.dist.rank, stage.dist.world_size,
                                  cfg.accumulation_steps, seed=cfg.seed)
    if stage.dist.is_main:
        print(f"model: {stage.model.num_params() / 1e6:.2f}M parameters; data: {len(dataset):,} rows of "
              f"{cfg.max_seq_len} tokens from {cfg.data_path} ({dataset.n_tokens:,} tokens)"
              + (f"; {len(eval_set):,} held-out rows" if eval_set is not None else ""))

    trainer = Trainer(stage, dataset, sampler, packed_collate)
    trainer.fit(pretrain_loss, eval_set)
    if dataset.bad_lines:
        trainer.log(str(dataset.bad_lines))
    if not cfg.benchmark:
        trainer.log(f"done: checkpoint in {trainer.run_dir}")
    return trainer


if __name__ == "__main__":
    main_guard(main)
