"""Stage 4: direct preference optimisation (DPO) on {"chosen", "rejected"} conversation pairs.

    python train_dpo.py                                        # demo: from out/full_sft on the demo pairs
    python train_dpo.py --precompute_ref 1                     # no reference model kept in memory
    python train_dpo.py --use_lora 1 --save_weight dpo_lora    # train an adapter; reference = adapter off
    python train_dpo.py --loss_type ipo --beta 0.5             # IPO instead of the sigmoid loss
    torchrun --nproc_per_node 8 train_dpo.py --data_path dpo.jsonl --init_from out/full_sft

The policy starts from an SFT checkpoint. The reference is, in order of memory cost: a frozen
copy of that checkpoint (default), the same weights with the LoRA adapter switched off
(--use_lora 1: no second copy), or nothing at all (--precompute_ref 1: its log-probs are
computed once over the data before training and carried in every batch).
"""
import copy

import torch

from minillm.data import DPODataset, LengthGroupedBatchSampler, dpo_collate
from minillm.dpo import (LOSS_TYPES, chosen_nll, pair_batch, preference_loss, preference_margins, reward_metrics,
                         sequence_logprobs)
from minillm.evaluation import read_heldout
from minillm.lora import add_lora_flags, apply_lora_from_flags, load_lora, lora_disabled, save_lora
from minillm.model import eval_mode
from minillm.trainer import (Trainer, autocast_context, build_on_main_first, main_guard, prepare_stage,
                             training_dtype)

STAGE_DEFAULTS = dict(
    init_from="out/full_sft", data_path="dataset/demo/dpo.jsonl", save_weight="dpo", epochs=2,
    # DPO moves far on few steps: at 1e-4 the demo model learns that ending early is "preferred"
    # (replies cut to a word; held-out fact accuracy 45% -> 8%); 2e-5 keeps it (or add --sft_weight 1)
    batch_size=16, max_seq_len=256, learning_rate=2e-5, weight_decay=0.0, accumulation_steps=1,
    log_interval=10, save_interval=100,
)


def add_dpo_args(parser):
    parser.add_argument("--beta", type=float, default=0.1,
                        help="strength of the pull towards the reference (larger = stay closer)")
    parser.add_argument("--label_smoothing", type=float, default=0.0,
                        help="assumed fraction of flipped preference labels (conservative DPO, sigmoid loss only)")
    parser.add_argument("--loss_type", choices=LOSS_TYPES, default="sigmoid", help="sigmoid = DPO, ipo = IPO")
    parser.add_argument("--sft_weight", type=float, default=0.0,
                        help="weight of an NLL loss on the chosen replies added to the DPO loss (0 = off)")
    parser.add_argument("--precompute_ref", type=int, default=0,
                        help="1 = compute reference log-probs once before training and keep no reference model")
    parser.add_argument("--use_lora", type=int, default=0,
                        help="1 = train a LoRA adapter only; the reference is the model with the adapter off")
    add_lora_flags(parser)
    parser.add_argument("--eval_path", default="dataset/demo/heldout_dpo.jsonl",
                        help="held-out {question, chosen, rejected} rows scored before and after training ('' = skip)")


def dpo_settings(args) -> dict:
    return {k: getattr(args, k) for k in ("beta", "label_smoothing", "loss_type", "sft_weight", "precompute_ref")}


# -- the reference: what log π_ref(y) is computed with ---------------------------------------------
def frozen_reference(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the starting policy that never trains: eval mode, no parameter wants a gradient."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def reference_fn(ref_model=None, lora_model=None):
    """-> f(input_ids, labels) -> sequence log-probs [N] of the reference, without autograd.

    Either a frozen copy (`ref_model`) or the LoRA-adapted policy itself with its adapters off
    (`lora_model`): the base weights under the adapter are exactly the starting checkpoint.
    """
    if (ref_model is None) == (lora_model is None):
        raise ValueError("give exactly one of ref_model and lora_model")

    @torch.no_grad()
    def reference(input_ids, labels):
        if ref_model is not None:
            return sequence_logprobs(ref_model(input_ids), labels)[0]
        with lora_disabled(lora_model), eval_mode(lora_model):
            return sequence_logprobs(lora_model(input_ids), labels)[0]
    return reference


def make_dpo_loss(reference, beta: float, label_smoothing: float = 0.0, loss_type: str = "sigmoid",
                  sft_weight: float = 0.0, aux_loss_coef: float = 0.0):
    """The stage's loss_fn(model, batch). `reference` is a reference_fn, or None when every batch
    carries precomputed `ref_chosen_logps` / `ref_rejected_logps`. `aux_loss_coef` > 0 (MoE
    policies) adds the router's load-balancing loss, as in every other stage."""

    def dpo_loss(model, batch):
        ids, labels = pair_batch(batch)
        # one forward over chosen + rejected: same weights, one kernel launch sequence, one DDP sync
        logits, aux = model(ids, return_aux=True) if aux_loss_coef > 0 else (model(ids), None)
        logps, n_tokens = sequence_logprobs(logits, labels)
        policy_chosen, policy_rejected = logps.chunk(2)
        if reference is None:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = reference(ids, labels).chunk(2)
        out = preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                              beta=beta, label_smoothing=label_smoothing, loss_type=loss_type)
        metrics = reward_metrics(out.chosen_rewards, out.rejected_rewards)
        loss = out.loss
        if sft_weight > 0:
            nll = chosen_nll(policy_chosen, n_tokens.chunk(2)[0])
            loss = loss + sft_weight * nll
            metrics["dpo_loss"], metrics["chosen_nll"] = out.loss.detach(), nll.detach()
        if aux_loss_coef > 0:
            loss = loss + aux_loss_coef * aux
            metrics["aux_loss"] = aux.detach()
        return loss, metrics
    return dpo_loss


# -- --precompute_ref: reference log-probs once, carried per row ---------------------------------
@torch.no_grad()
def precompute_reference(model, dataset, collate, batch_size: int, device, autocast) -> torch.Tensor:
    """[N, 2] (chosen, rejected) reference log-probs of every pair, computed with `model` as it is
    now (the starting policy, in eval mode). Rows are batched by length to waste little padding;
    right padding never changes a row's log-probs (causal attention, padding labelled -100)."""
    order = sorted(range(len(dataset)), key=lambda i: -int(dataset.lengths[i]))
    out = torch.zeros(len(dataset), 2)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start: start + batch_size]
            batch = {k: v.to(device) for k, v in collate([dataset[i] for i in rows]).items()}
            ids, labels = pair_batch(batch)
            with autocast:
                logps = sequence_logprobs(model(ids), labels)[0].float().cpu()
            out[rows] = torch.stack(logps.chunk(2), dim=1)
    return out


class WithReference(torch.utils.data.Dataset):
    """A DPODataset whose items also carry the pair's precomputed reference log-probs."""

    def __init__(self, pairs: DPODataset, ref_logps: torch.Tensor):
        self.pairs, self.ref_logps, self.lengths = pairs, ref_logps, pairs.lengths

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        item = self.pairs[i]
        item["ref_chosen_logps"], item["ref_rejected_logps"] = self.ref_logps[i, 0], self.ref_logps[i, 1]
        return item


class CollateWithReference:
    """dpo_collate, plus the per-row reference log-probs stacked into [B] tensors."""

    def __init__(self, pad_collate):
        self.pad_collate = pad_collate

    def __call__(self, items):
        batch = self.pad_collate(items)
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            batch[key] = torch.stack([item[key] for item in items])
        return batch


def main(argv=None):
    stage, args = prepare_stage(__doc__, STAGE_DEFAULTS, argv, extra_args=add_dpo_args)
    cfg, device = stage.cfg, stage.dist.device
    if args.precompute_ref and args.use_lora:
        raise ValueError("--use_lora 1 already needs no reference copy; drop --precompute_ref")
    if args.label_smoothing and args.loss_type != "sigmoid":
        raise ValueError("--label_smoothing applies to --loss_type sigmoid only")
    model = stage.model.to(device)

    dataset = build_on_main_first(stage.dist, lambda: DPODataset(
        cfg.data_path, stage.tokenizer, cfg.max_seq_len, skip_bad=bool(cfg.skip_bad_lines)))
    collate = dpo_collate(stage.tokenizer.pad_id)
    sampler = LengthGroupedBatchSampler(dataset.lengths, cfg.batch_size, stage.dist.rank,
                                        stage.dist.world_size, seed=cfg.seed)
    if stage.dist.is_main:
        print(f"model: {model.num_params() / 1e6:.2f}M parameters from {cfg.init_from}; data: {dataset.report()}")

    # held-out preference before training: the starting (SFT) model is the reference
    eval_rows = read_heldout(args.eval_path) if args.eval_path and stage.dist.is_main else []
    margins_before = preference_margins(model, stage.tokenizer, eval_rows, device) if eval_rows else None

    # the reference
    trainable, save_fn, load_fn, reference = None, None, None, None
    if args.use_lora:
        trainable = apply_lora_from_flags(model, args)
        recipe = {"train": cfg.to_dict(), "dpo": dpo_settings(args)}
        save_fn = lambda folder, m, state: save_lora(folder, m, recipe, trainer_state=state)  # noqa: E731
        load_fn = lambda folder, m: load_lora(m, folder)  # resume: the adapter weights come back from the checkpoint
        reference = reference_fn(lora_model=model)
    elif args.precompute_ref:
        autocast = autocast_context(training_dtype(cfg.dtype, device), device)  # as the trainer's steps
        ref_logps = precompute_reference(model, dataset, collate, 2 * cfg.batch_size, device, autocast)
        dataset, collate = WithReference(dataset, ref_logps), CollateWithReference(collate)
        if stage.dist.is_main:
            print(f"reference log-probs precomputed for {len(dataset)} pairs; no reference model kept")
    else:
        reference = reference_fn(ref_model=frozen_reference(model))

    loss_fn = make_dpo_loss(reference, args.beta, args.label_smoothing, args.loss_type, args.sft_weight,
                            aux_loss_coef=stage.model_cfg.aux_loss_coef if stage.model_cfg.use_moe else 0.0)
    trainer = Trainer(cfg, model, stage.tokenizer, dataset, sampler, collate_fn=collate, loss_fn=loss_fn,
                      dist_info=stage.dist, trainable=trainable, save_fn=save_fn, load_fn=load_fn,
                      tokens_in_batch=lambda b: 2 * b["chosen_input_ids"].numel(), stage_args=stage.stage_args)
    trainer.fit()
    if stage.dist.is_main and margins_before is not None:
        margins_after = preference_margins(model, stage.tokenizer, eval_rows, device)
        trainer.log(f"held-out preference ({len(eval_rows)} pairs from {args.eval_path}): chosen preferred "
                    f"{(margins_before > 0).float().mean():.1%} -> {(margins_after > 0).float().mean():.1%}; "
                    f"mean log-prob margin {margins_before.mean():.2f} -> {margins_after.mean():.2f}; "
                    f"margin grew on {(margins_after > margins_before).float().mean():.1%} of pairs")
        trainer.heldout_margins = (margins_before, margins_after)
    trainer.log(f"done: checkpoint in {trainer.run_dir}")
    return trainer


if __name__ == "__main__":
    main_guard(main)
