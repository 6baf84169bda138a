"""Stage 1: pretraining. Next-token prediction on raw text, packed into fixed-length rows.

    python train_pretrain.py                                   # demo model on the demo corpus, CPU ok
    python train_pretrain.py --preset minimind-3 --data_path pretrain_hq.jsonl --batch_size 32
    torchrun --nproc_per_node 8 train_pretrain.py --preset minimind2 --data_path ...

The corpus is tokenized once into a memory-mapped cache beside the jsonl; later runs reuse it.
"""
from minillm.data import PretrainDataset, ShardedBatchSampler
from minillm.trainer import Trainer, build_on_main_first, main_guard, prepare_stage

STAGE_DEFAULTS = dict(
    data_path="dataset/demo/pretrain.jsonl", save_weight="pretrain", epochs=2,
    # small batches: on the demo corpus the number of optimizer steps, not tokens per step, is what
    # lets a tiny model memorise facts (batch 4 -> 888 steps; batch 16 -> 222 steps and 4x fewer facts)
    batch_size=4, max_seq_len=256, learning_rate=2e-3, accumulation_steps=1,
    log_interval=50, save_interval=200,
)


def pretrain_loss(model, batch):
    """Mean cross-entropy over every position: in pretraining each token is a target."""
    out = model(batch["input_ids"], labels=batch["labels"])
    return out.loss, ({"aux_loss": out.aux_loss} if out.aux_loss.requires_grad else {})


def main(argv=None):
    stage, _ = prepare_stage(__doc__, STAGE_DEFAULTS, argv)
    cfg = stage.cfg

    # tokenized once into a memmap cache (rank 0 builds it, the others reuse it)
    dataset = build_on_main_first(stage.dist, lambda: PretrainDataset(
        cfg.data_path, stage.tokenizer, cfg.max_seq_len, skip_bad=bool(cfg.skip_bad_lines)))
    sampler = ShardedBatchSampler(len(dataset), cfg.batch_size, stage.dist.rank, stage.dist.world_size,
                                  seed=cfg.seed)
    if stage.dist.is_main:
        print(f"model: {stage.model.num_params() / 1e6:.2f}M parameters; data: {len(dataset):,} rows of "
              f"{cfg.max_seq_len} tokens ({dataset.n_tokens:,} tokens) from {cfg.data_path}")

    trainer = Trainer(cfg, stage.model, stage.tokenizer, dataset, sampler, collate_fn=None,
                      loss_fn=pretrain_loss, dist_info=stage.dist)
    trainer.fit()
    if dataset.bad_lines:
        trainer.log(str(dataset.bad_lines))
    trainer.log(f"done: checkpoint in {trainer.run_dir}")
    return trainer


if __name__ == "__main__":
    main_guard(main)
