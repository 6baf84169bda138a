"""Stage 3: LoRA. Adapts the SFT model to a domain by training small low-rank adapters only.

    python train_lora.py                                       # demo: lora_medical on out/full_sft
    python train_lora.py --lora_name lora_identity             # dataset/demo/lora_identity.jsonl
    python train_lora.py --lora_name lora_medical --data_path lora_medical.jsonl   # MiniMind's real file

The base model is frozen; only the adapters (lora_A, lora_B in every targeted nn.Linear) reach
the optimizer, and only they are saved, to <save_dir>/<lora_name>/ (adapter.safetensors +
adapter_config.yaml, + trainer_state.pt for --from_resume). `eval_model.py --lora_name NAME`
loads them onto the base.
"""
from minillm.data import LengthGroupedBatchSampler, SFTDataset
from minillm.lora import add_lora_flags, apply_lora_from_flags, load_lora, save_lora
from minillm.trainer import Trainer, build_on_main_first, main_guard, prepare_stage
from train_full_sft import CountingCollate, sft_loss

STAGE_DEFAULTS = dict(
    data_path="", init_from="out/full_sft", save_weight="", epochs=6,
    batch_size=16, max_seq_len=256, learning_rate=3e-3, weight_decay=0.0, accumulation_steps=1,
    log_interval=10, save_interval=100,
)


def add_lora_args(parser):
    parser.add_argument("--lora_name", default="lora_medical",
                        help="adapter name: saved to <save_dir>/<lora_name>/; without --data_path the data is "
                             "dataset/demo/<lora_name>.jsonl")
    add_lora_flags(parser)


def main(argv=None):
    stage, args = prepare_stage(__doc__, STAGE_DEFAULTS, argv, extra_args=add_lora_args)
    cfg = stage.cfg
    cfg.data_path = cfg.data_path or f"dataset/demo/{args.lora_name}.jsonl"
    cfg.save_weight = cfg.save_weight or args.lora_name

    # the adapters: everything else is frozen, and only these go to the optimizer
    lora_params = apply_lora_from_flags(stage.model, args)

    dataset = build_on_main_first(stage.dist, lambda: SFTDataset(
        cfg.data_path, stage.tokenizer, cfg.max_seq_len, skip_bad=bool(cfg.skip_bad_lines), seed=cfg.seed))
    sampler = LengthGroupedBatchSampler(dataset.lengths, cfg.batch_size, stage.dist.rank, stage.dist.world_size,
                                        seed=cfg.seed)
    collate = CountingCollate(stage.tokenizer.pad_id)
    if stage.dist.is_main:
        n_lora = sum(p.numel() for p in lora_params)
        print(f"LoRA {args.lora_name}: {n_lora / 1e3:.1f}K adapter parameters "
              f"({100 * n_lora / stage.model.num_params():.2f}% of {stage.model.num_params() / 1e6:.2f}M) on "
              f"{cfg.init_from}; data: {dataset.report()}")

    run_config = {"train": cfg.to_dict(), "lora_name": args.lora_name, "base": cfg.init_from}

    def save_adapter(folder, model, trainer_state):  # only the adapter (+ resume state), never the base
        save_lora(folder, model, run_config, trainer_state=trainer_state)

    trainer = Trainer(cfg, stage.model, stage.tokenizer, dataset, sampler, collate_fn=collate, loss_fn=sft_loss,
                      dist_info=stage.dist, trainable=lora_params, save_fn=save_adapter,
                      load_fn=lambda folder, model: load_lora(model, folder),
                      tokens_in_batch=lambda b: b["n_tokens"])
    trainer.fit()
    trainer.log(f"padding: {100 * collate.pad.padding_fraction():.1f}% of the positions in this run's batches")
    trainer.log(f"done: adapter in {trainer.run_dir} (load with eval_model.py --lora_name {args.lora_name})")
    return trainer


if __name__ == "__main__":
    main_guard(main)
