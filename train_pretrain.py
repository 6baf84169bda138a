"""Stage 1: pretraining. Next-token prediction on raw text, packed into fixed-length rows.

    python train_pretrain.py                                   # demo model on the demo corpus, CPU ok
    python train_pretrain.py --preset minimind-3 --data_path pretrain_hq.jsonl --batch_size 32
    torchrun --nproc_per_node 8 train_pretrain.py --preset minimind2 --data_path ...

The corpus is tokenized once into a memory-mapped cache beside the jsonl; later runs reuse it.
"""
import torch

from minillm.config import build_parser, resolve
from minillm.data import PretrainDataset, ShardedBatchSampler
from minillm.model import MiniLLM
from minillm.checkpoint import load_checkpoint
from minillm.tokenizer import Tokenizer
from minillm.trainer import Trainer, main_guard, seed_everything, setup_distributed

STAGE_DEFAULTS = dict(
    data_path="dataset/demo/pretrain.jsonl", save_weight="pretrain", epochs=1,
    batch_size=16, max_seq_len=256, learning_rate=2e-3, accumulation_steps=1, max_steps=600,
    log_interval=20, save_interval=200,
)


def pretrain_loss(model, batch):
    """Mean cross-entropy over every position: in pretraining each token is a target."""
    out = model(batch["input_ids"], labels=batch["labels"])
    metrics = {"aux_loss": out.aux_loss} if out.aux_loss.requires_grad else {}
    return out.loss, metrics


def main():
    parser = build_parser(__doc__, STAGE_DEFAULTS)
    args = parser.parse_args()
    if getattr(args, "init_from", ""):
        base_cfg = load_checkpoint(args.init_from, with_tokenizer=False)[0].config
        model_cfg, cfg = resolve(args, STAGE_DEFAULTS, base_model=base_cfg)
    else:
        model_cfg, cfg = resolve(args, STAGE_DEFAULTS)
    dist_info = setup_distributed(cfg.device)
    seed_everything(cfg.seed)

    tokenizer = Tokenizer.load(cfg.tokenizer_path or None)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but --vocab_size is {model_cfg.vocab_size}")

    # -- data: tokenized once (rank 0 builds the cache, the others wait and reuse it) ------------
    for turn in ("main", "others"):
        if (turn == "main") == dist_info.is_main:
            dataset = PretrainDataset(cfg.data_path, tokenizer, cfg.max_seq_len, skip_bad=bool(cfg.skip_bad_lines))
        if dist_info.enabled:
            torch.distributed.barrier()
    sampler = ShardedBatchSampler(len(dataset), cfg.batch_size, dist_info.rank, dist_info.world_size, seed=cfg.seed)

    # -- model ---------------------------------------------------------------------------------
    model = MiniLLM(model_cfg)
    if cfg.init_from:
        model.load_state_dict(load_checkpoint(cfg.init_from, with_tokenizer=False)[0].state_dict())
    if dist_info.is_main:
        print(f"model: {model.num_params() / 1e6:.2f}M parameters, data: {len(dataset):,} rows of "
              f"{cfg.max_seq_len} tokens ({dataset.n_tokens:,} tokens) from {cfg.data_path}")

    trainer = Trainer(cfg, model, tokenizer, dataset, sampler, collate_fn=None, loss_fn=pretrain_loss,
                      dist_info=dist_info)
    trainer.fit()
    if dataset.bad_lines:
        trainer.log(str(dataset.bad_lines))
    trainer.log(f"done: checkpoint in {trainer.run_dir}")


if __name__ == "__main__":
    main_guard(main)
