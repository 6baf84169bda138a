"""Stage 3: LoRA. Adapts the SFT model to a domain by training small low-rank adapters only.

    python train_lora.py                                       # demo: lora_medical on out/full_sft
    python train_lora.py --lora_name lora_identity             # dataset/demo/lora_identity.jsonl
    python train_lora.py --lora_name lora_medical --data_path lora_medical.jsonl   # MiniMind's real file
    python train_lora.py --use_dora 1                          # DoRA: + a learnt magnitude per output row
    python train_lora.py --quantize nf4                        # QLoRA: the frozen base in 4-bit NF4

The base model is frozen; only the adapters (lora_A, lora_B in every targeted nn.Linear, and DoRA's
lora_magnitude_vector) reach the optimizer, and only they are saved, to <save_dir>/<lora_name>/
(adapter.safetensors + adapter_config.yaml, + trainer_state.pt for --from_resume).
`eval_model.py --lora_name NAME` loads them onto the base.

With --quantize nf4 the decoder blocks' linear weights are stored as 4-bit NF4 blocks (minillm.quant,
~4.5 bits a weight, ~4.13 with --double_quant 1) before the adapters go in; the adapters stay in full
precision and the adapter folder still holds only them (its config records the quantisation, so
loading it quantises the base the same way).
"""
from minillm.data import IGNORE_INDEX, LengthGroupedBatchSampler, SFTDataset, pad_collate
from minillm.lora import LoRALinear, add_lora_flags, lora_targets
from minillm.quant import QUANT_TYPES, describe, quantize_model, set_kernel
from minillm.config import stage_group
from minillm.errors import UserError
from minillm.trainer import Trainer, load_datasets, main_guard, prepare_stage

STAGE_DEFAULTS = dict(
    data_path="", init_from="out/full_sft", save_weight="", epochs=6,
    batch_size=16, max_seq_len=256, learning_rate=3e-3, weight_decay=0.0, accumulation_steps=1,
    log_interval=10, save_interval=100,
)


def add_lora_args(parser):
    group = stage_group(parser, "LoRA")
    group.add_argument("--lora_name", default="lora_medical",
                       help="adapter name: saved to <save_dir>/<lora_name>/; without --data_path the data is "
                            "dataset/demo/<lora_name>.jsonl")
    add_lora_flags(group)
    group.add_argument("--use_dora", type=int, default=0,
                       help="1 = DoRA: also learn a magnitude m per output row, W' = m * (W + s*B@A) / ||W + s*B@A||")
    group.add_argument("--quantize", default="none", choices=QUANT_TYPES,
                       help="nf4 = QLoRA: store the frozen base's decoder linear weights as 4-bit NF4 blocks")
    group.add_argument("--quant_block_size", type=int, default=64, help="values per NF4 block (one absmax each)")
    group.add_argument("--double_quant", type=int, default=0,
                       help="1 = quantise the NF4 blocks' absmax scales too (int8 per 256): ~4.13 bits a weight")
    group.add_argument("--quant_kernel", default="torch", choices=("torch", "triton"),
                       help="NF4 matmul: torch = dequantise then matmul (any device); triton = the fused "
                            "dequant-matmul kernel on CUDA (opt-in: checked only in Triton's interpreter so far)")


def inject_lora(model, args):
    """Freeze the base, wrap each targeted nn.Linear in a LoRALinear; -> the adapter parameters.

    A wrapped layer computes W x + (alpha / r) * B (A x): A [r, in] starts random, B [out, r] at
    zero, so the fresh adapter changes nothing and training moves only A and B. With DoRA it computes
    m * (W + s B A) x / ||W + s B A|| (norm per output row), m [out] starting at ||W||, and m trains too.
    """
    model.requires_grad_(False)
    adapters = []
    for parent, name, linear in lora_targets(model, args.lora_targets):
        wrapped = LoRALinear(linear, rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                             rslora=bool(args.use_rslora), use_dora=bool(args.use_dora))
        setattr(parent, name, wrapped)
        adapters += wrapped.adapter_params()
    return adapters


def lora_loss(model, batch, totals):
    """The SFT loss (train_full_sft.py's: assistant targets only, exact over the step), through
    the adapters: the gradient reaches only lora_A and lora_B (and DoRA's magnitude)."""
    ids, loss_mask = batch["ids"], batch["loss_mask"]
    labels = ids[:, 1:].masked_fill(~loss_mask[:, 1:], IGNORE_INDEX)  # predict t+1 where it is the assistant's
    out = model(ids[:, :-1], labels=labels, reduction="sum")
    return out.ce_loss / totals["n_targets"] + out.balance_loss / totals["micro_batches"], out.aux_metrics(totals)


def main(argv=None):
    stage, args = prepare_stage(__doc__, STAGE_DEFAULTS, argv, extra_args=add_lora_args)
    cfg = stage.cfg
    if not cfg.data_path:  # the demo adapter of that name
        cfg.data_path = f"dataset/demo/{args.lora_name}.jsonl"
        stage.on_demo_data = True
    cfg.save_weight = cfg.save_weight or args.lora_name

    if args.quantize == "none" and (args.double_quant or args.quant_kernel != "torch"):
        flag = "--double_quant 1" if args.double_quant else f"--quant_kernel {args.quant_kernel}"
        raise UserError(f"{flag} is for a quantised base: add --quantize nf4")
    # QLoRA: the frozen base to 4-bit first, so the adapters wrap the NF4 layers
    quant_report = quantize_model(stage.model, args.quantize, args.quant_block_size, bool(args.double_quant),
                                  device=stage.dist.device)
    set_kernel(stage.model, args.quant_kernel)
    lora_params = inject_lora(stage.model, args)

    dataset, eval_set = load_datasets(stage, lambda path: SFTDataset(
        path, stage.tokenizer, cfg.max_seq_len, skip_bad=bool(cfg.skip_bad_lines), seed=cfg.seed))
    sampler = LengthGroupedBatchSampler(dataset.lengths, cfg.batch_size, stage.dist.rank, stage.dist.world_size,
                                        cfg.accumulation_steps, seed=cfg.seed)
    collate = pad_collate(stage.tokenizer.pad_id)
    if stage.dist.is_main:
        n_lora = sum(p.numel() for p in lora_params)
        n_model = stage.model.num_params() + quant_report["n_weights"]  # NF4 weights are buffers, not parameters
        print(f"{'DoRA' if args.use_dora else 'LoRA'} {args.lora_name}: {n_lora / 1e3:.1f}K adapter parameters "
              f"({100 * n_lora / n_model:.2f}% of {n_model / 1e6:.2f}M) on {cfg.init_from}; data: {dataset.report()}")
        if quant_report["n_layers"]:
            print(describe(quant_report))

    # only the adapters reach the optimizer, and only they are saved (with the resume state)
    trainer = Trainer(stage, dataset, sampler, collate, params=lora_params, save_adapter=True)
    trainer.fit(lora_loss, eval_set)
    trainer.log(f"padding: {100 * collate.padding_fraction():.1f}% of the positions in this run's batches")
    trainer.log(f"done: adapter in {trainer.run_dir} (load with eval_model.py --lora_name {args.lora_name})")
    return trainer


if __name__ == "__main__":
    main_guard(main)
