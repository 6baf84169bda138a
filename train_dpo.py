"""Stage 4: direct preference optimisation (DPO) on {"chosen", "rejected"} conversation pairs.

    python train_dpo.py                                        # demo: from out/full_sft on the demo pairs
    python train_dpo.py --precompute_ref 1                     # no reference model kept in memory
    python train_dpo.py --use_lora 1 --save_weight dpo_lora    # train an adapter; reference = adapter off
    python train_dpo.py --loss_type ipo --beta 0.5             # IPO instead of the sigmoid loss
    python train_dpo.py --loss_type simpo --simpo_gamma 0.5    # SimPO: no reference model at all
    python train_dpo.py --loss_type orpo --beta 0.1            # ORPO: SFT loss + odds ratio, no reference
    python train_dpo.py --data_path dpo.jsonl --eval_split 0.02 # held-out loss and reward accuracy
    torchrun --nproc_per_node 8 train_dpo.py --data_path dpo.jsonl --init_from out/full_sft

The policy starts from an SFT checkpoint. The reference is, in order of memory cost: a frozen
copy of that checkpoint (default), the same weights with the LoRA adapter switched off
(--use_lora 1: no second copy), or nothing at all (--precompute_ref 1: its log-probs are
computed once over the data before training and carried in every batch). SimPO and ORPO need no
reference: their implicit reward is the policy's own length-normalised log-probability.
"""
import copy

import torch
import torch.nn.functional as F

from minillm.data import DPODataset, LengthGroupedBatchSampler, dpo_collate
from minillm.errors import UserError
from minillm.evaluation import read_heldout
from minillm.lora import add_lora_flags, apply_lora, lora_disabled
from minillm.model import eval_mode
from minillm.preference import pair_inputs, preference_margins, sequence_logprobs
from minillm.config import stage_group
from minillm.trainer import Trainer, autocast_context, load_datasets, main_guard, prepare_stage, training_dtype

STAGE_DEFAULTS = dict(
    init_from="out/full_sft", data_path="dataset/demo/dpo.jsonl", save_weight="dpo", epochs=2,
    # DPO moves far on few steps: at 1e-4 the demo model learns that ending early is "preferred"
    # (replies cut to a word; held-out fact accuracy 45% -> 8%); 2e-5 keeps it (or add --sft_weight 1)
    batch_size=16, max_seq_len=256, learning_rate=2e-5, weight_decay=0.0, accumulation_steps=1,
    log_interval=10, save_interval=100,
)
LOSS_TYPES = ("sigmoid", "ipo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")  # no reference model is built, loaded or precomputed for these
AVERAGED = ("ipo", "simpo", "orpo")  # compare per-token average log-probs, not sums
# --beta when not given: TRL's 0.1 (DPO's β, IPO's τ, ORPO's λ); 2.0 for SimPO, the SimPO paper's
# value (TRL's CPOTrainer keeps 0.1 there, which the 0.5 target margin then dwarfs)
DEFAULT_BETA = {"sigmoid": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1}
DEMO_REPORT = "dataset/demo/heldout_dpo.jsonl"


def add_dpo_args(parser):
    group = stage_group(parser, "DPO")
    group.add_argument("--beta", type=float, default=None,
                       help="sigmoid/ipo: strength of the pull towards the reference (larger = stay closer); "
                            "simpo: the reward scale β; orpo: λ, the weight of the odds-ratio term (TRL's beta). "
                            "Default: 0.1, or 2.0 for simpo")
    group.add_argument("--label_smoothing", type=float, default=0.0,
                       help="assumed fraction of flipped preference labels (conservative DPO; sigmoid and simpo)")
    group.add_argument("--loss_type", choices=LOSS_TYPES, default="sigmoid",
                       help="sigmoid = DPO on summed log-probs; ipo = IPO on per-token average log-probs; "
                            "simpo = SimPO (average log-probs, target margin, no reference); orpo = ORPO "
                            "(NLL of the chosen reply + λ · odds-ratio loss, no reference)")
    group.add_argument("--simpo_gamma", type=float, default=0.5,
                       help="SimPO's target reward margin γ (TRL's simpo_gamma); --loss_type simpo only")
    group.add_argument("--sft_weight", type=float, default=0.0,
                       help="weight of an NLL loss on the chosen replies added to the preference loss (0 = off; "
                            "with simpo this is TRL's cpo_alpha, CPO-SimPO; orpo has its own NLL term)")
    group.add_argument("--precompute_ref", type=int, default=0,
                       help="1 = compute reference log-probs once before training and keep no reference model "
                            "(sigmoid and ipo; simpo and orpo use none)")
    group.add_argument("--use_lora", type=int, default=0,
                       help="1 = train a LoRA adapter only; the reference is the model with the adapter off")
    add_lora_flags(group)
    group.add_argument("--report_path", default="auto",
                       help="held-out {question, chosen, rejected} rows scored before and after training; "
                            "auto = the demo's set when training on the demo data, '' = none")


# -- the reference: what log π_ref(y) is computed with ---------------------------------------------
def frozen_reference(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the starting policy that never trains: eval mode, no parameter wants a gradient."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def reference_fn(ref_model=None, lora_model=None):
    """-> f(inputs, labels) -> summed sequence log-probs [N] of the reference, without autograd.

    Either a frozen copy (`ref_model`) or the LoRA-adapted policy itself with its adapters off
    (`lora_model`): the base weights under the adapter are exactly the starting checkpoint.
    """
    if (ref_model is None) == (lora_model is None):
        raise ValueError("give exactly one of ref_model and lora_model")

    @torch.no_grad()
    def reference(inputs, labels):
        if ref_model is not None:
            return sequence_logprobs(ref_model(inputs), labels)[0]
        with lora_disabled(lora_model), eval_mode(lora_model):
            return sequence_logprobs(lora_model(inputs), labels)[0]
    return reference


# -- the loss --------------------------------------------------------------------------------------
def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, without cancellation (log1p branch below −ln 2, expm1 above). x is
    clamped to ≤ −1e-6 first: a reply of probability 1 would make it log 0 and its gradient NaN."""
    x = x.clamp(max=-1e-6)
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def preference_losses(chosen_logratios, rejected_logratios, beta: float, label_smoothing: float = 0.0,
                      loss_type: str = "sigmoid", simpo_gamma: float = 0.5) -> torch.Tensor:
    """Per-pair loss [B] from the chosen and rejected sides' scores, h = chosen − rejected.

        sigmoid (DPO, Rafailov et al.):  −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)   (ε: conservative DPO)
        ipo (Azar et al.):                (h − 1/(2β))²
    with scores log π(y) − log π_ref(y) (IPO: per-token averages, as TRL does). Reference-free, with
    scores the per-token average log π(y) itself:
        simpo (Meng et al.):   −(1 − ε)·log σ(β·h − γ) − ε·log σ(−(β·h − γ))   (TRL's CPOTrainer form)
        orpo (Hong et al.):    −β·log σ(log odds(y_w) − log odds(y_l)),  log odds(y) = s − log(1 − e^s)
    (ORPO's β is its λ; the NLL of the chosen reply is added by the stage's loss_fn.)
    """
    if loss_type not in LOSS_TYPES:
        raise UserError(f"loss_type {loss_type!r}: use one of {', '.join(LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise UserError(f"label_smoothing {label_smoothing} must be in [0, 0.5)")
    h = chosen_logratios - rejected_logratios
    if loss_type in ("sigmoid", "simpo"):
        z = beta * h - (simpo_gamma if loss_type == "simpo" else 0.0)
        return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    return -beta * F.logsigmoid(odds_ratio(chosen_logratios, rejected_logratios))


def odds_ratio(chosen_logps, rejected_logps) -> torch.Tensor:
    """ORPO's log odds ratio log(odds(y_w) / odds(y_l)) [B], odds(y) = p / (1 − p) with log p the
    per-token average log-prob; in fp32."""
    chosen_logps, rejected_logps = chosen_logps.float(), rejected_logps.float()
    return (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))


def make_dpo_loss(reference, beta: float, label_smoothing: float = 0.0, loss_type: str = "sigmoid",
                  sft_weight: float = 0.0, aux_loss_coef: float = 0.0, simpo_gamma: float = 0.5):
    """The stage's loss_fn(model, batch, totals). `reference` is a reference_fn, or None when every
    batch carries precomputed `ref_chosen_logps` / `ref_rejected_logps`, or for the reference-free
    simpo / orpo (which must get None). `aux_loss_coef` > 0 (MoE policies) adds the router's
    load-balancing loss, as in every other stage. Metrics carry TRL's names (rewards/chosen,
    rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, logps/rejected; ORPO adds
    nll_loss, log_odds_ratio = mean log σ(log odds ratio), log_odds_chosen = mean log odds ratio).

    Every pair term is a share of the step's pair mean (sums over totals["n_rows"]) and every NLL a
    share of the token mean over the step's chosen targets, so accumulation and DDP change nothing."""
    if loss_type in REFERENCE_FREE and reference is not None:
        raise ValueError(f"loss_type {loss_type} takes no reference model")
    if loss_type == "orpo" and sft_weight:
        raise UserError("--loss_type orpo already adds the chosen replies' NLL (weight 1); drop --sft_weight")

    def dpo_loss(model, batch, totals):
        inputs, labels = pair_inputs(batch)
        # one forward over chosen + rejected: same weights, one kernel launch sequence, one DDP sync
        logits, aux = model(inputs, return_aux=True)
        summed, n_tokens = sequence_logprobs(logits, labels)
        # IPO, SimPO and ORPO compare per-token averages: β keeps its meaning at any length
        logps = summed / n_tokens.clamp(min=1) if loss_type in AVERAGED else summed
        chosen, rejected = logps.chunk(2)
        if loss_type in REFERENCE_FREE:
            ref_chosen = ref_rejected = torch.zeros_like(chosen)
        else:
            ref_logps = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]) if reference is None \
                else reference(inputs, labels)
            if loss_type in AVERAGED:
                ref_logps = ref_logps / n_tokens.clamp(min=1)
            ref_chosen, ref_rejected = ref_logps.detach().chunk(2)
        chosen_rewards, rejected_rewards = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
        losses = preference_losses(chosen - ref_chosen, rejected - ref_rejected, beta, label_smoothing, loss_type,
                                   simpo_gamma)

        # pair means over the whole step: this micro-batch's sums over the step's pair count
        pairs = totals["n_rows"]
        loss = losses.sum() / pairs
        cr, rr = chosen_rewards.detach(), rejected_rewards.detach()
        metrics = {"rewards/chosen": cr.sum() / pairs, "rewards/rejected": rr.sum() / pairs,
                   "rewards/accuracies": (cr > rr).float().sum() / pairs, "rewards/margins": (cr - rr).sum() / pairs,
                   "logps/chosen": chosen.detach().sum() / pairs, "logps/rejected": rejected.detach().sum() / pairs}
        nll_weight = 1.0 if loss_type == "orpo" else sft_weight
        if nll_weight > 0:  # NLL of the chosen replies, a token mean over the step's chosen targets
            nll = -summed.chunk(2)[0].sum() / totals["n_chosen_targets"]
            if loss_type == "orpo":
                log_odds = odds_ratio(chosen.detach(), rejected.detach())
                metrics["nll_loss"] = nll.detach()
                metrics["log_odds_ratio"] = F.logsigmoid(log_odds).sum() / pairs
                metrics["log_odds_chosen"] = log_odds.sum() / pairs
            else:
                metrics["dpo_loss"], metrics["chosen_nll"] = loss.detach(), nll.detach()
            loss = loss + nll_weight * nll
        if aux_loss_coef > 0:
            loss = loss + aux_loss_coef * aux / totals["micro_batches"]
            metrics["aux_loss"] = aux.detach() / totals["micro_batches"]
        return loss, metrics
    return dpo_loss


# -- --precompute_ref: reference log-probs once, carried per row ---------------------------------
@torch.no_grad()
def precompute_reference(model, dataset, collate, batch_size: int, device, autocast) -> torch.Tensor:
    """[N, 2] (chosen, rejected) summed reference log-probs of every pair, computed with `model` as
    it is now (the starting policy, in eval mode). Rows are batched by length to waste little
    padding; right padding never changes a row's log-probs (causal attention, padding labelled -100)."""
    order = sorted(range(len(dataset)), key=lambda i: -int(dataset.lengths[i]))
    out = torch.zeros(len(dataset), 2)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start: start + batch_size]
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate([dataset[i] for i in rows]).items()}
            inputs, labels = pair_inputs(batch)
            with autocast:
                logps = sequence_logprobs(model(inputs), labels)[0].float().cpu()
            out[rows] = torch.stack(logps.chunk(2), dim=1)
    return out


class WithReference(torch.utils.data.Dataset):
    """Preference pairs whose items also carry the pair's precomputed reference log-probs
    (the collate stacks them into [B] tensors beside the ids)."""

    def __init__(self, pairs, ref_logps: torch.Tensor):
        self.pairs, self.ref_logps, self.lengths = pairs, ref_logps, pairs.lengths

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        item = dict(self.pairs[i])
        item["ref_chosen_logps"], item["ref_rejected_logps"] = self.ref_logps[i, 0], self.ref_logps[i, 1]
        return item


def main(argv=None):
    stage, args = prepare_stage(__doc__, STAGE_DEFAULTS, argv, extra_args=add_dpo_args)
    cfg, device = stage.cfg, stage.dist.device
    if args.precompute_ref and args.use_lora:
        raise UserError("--use_lora 1 already needs no reference copy; drop --precompute_ref")
    if args.precompute_ref and args.loss_type in REFERENCE_FREE:
        raise UserError(f"--loss_type {args.loss_type} uses no reference model, so there is nothing to "
                        f"precompute; drop --precompute_ref")
    if args.label_smoothing and args.loss_type not in ("sigmoid", "simpo"):
        raise UserError("--label_smoothing applies to --loss_type sigmoid and simpo only")
    if args.simpo_gamma != 0.5 and args.loss_type != "simpo":
        raise UserError("--simpo_gamma applies to --loss_type simpo only")
    if args.loss_type == "orpo" and args.sft_weight:
        raise UserError("--loss_type orpo already adds the chosen replies' NLL (weight 1); drop --sft_weight")
    if args.beta is None:
        args.beta = stage.stage_args["beta"] = DEFAULT_BETA[args.loss_type]
    if args.beta <= 0:
        raise UserError(f"--beta {args.beta} must be positive")
    if not 0.0 <= args.label_smoothing < 0.5:
        raise UserError(f"--label_smoothing {args.label_smoothing} must be in [0, 0.5)")
    model = stage.model.to(device)

    dataset, eval_set = load_datasets(stage, lambda path: DPODataset(
        path, stage.tokenizer, cfg.max_seq_len, skip_bad=bool(cfg.skip_bad_lines)))
    collate = dpo_collate(stage.tokenizer.pad_id)
    sampler = LengthGroupedBatchSampler(dataset.lengths, cfg.batch_size, stage.dist.rank,
                                        stage.dist.world_size, cfg.accumulation_steps, seed=cfg.seed)
    if stage.dist.is_main:
        print(f"model: {model.num_params() / 1e6:.2f}M parameters from {cfg.init_from}; data: {dataset.report()}"
              + (f"; {len(eval_set)} held-out pairs" if eval_set is not None else ""))

    # held-out preference before training: the starting (SFT) model is the reference
    report_path = DEMO_REPORT if args.report_path == "auto" and stage.on_demo_data else \
        ("" if args.report_path == "auto" else args.report_path)
    report_rows = read_heldout(report_path) if report_path and stage.dist.is_main else []
    margins_before = preference_margins(model, stage.tokenizer, report_rows, device) if report_rows else None

    # the reference (none for simpo / orpo)
    lora_params, reference = None, None
    if args.use_lora:
        lora_params = apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets,
                                 bool(args.use_rslora))
    if args.loss_type in REFERENCE_FREE:
        if stage.dist.is_main:
            print(f"--loss_type {args.loss_type}: reference-free, no reference model")
    elif args.use_lora:
        reference = reference_fn(lora_model=model)
    elif args.precompute_ref:
        autocast = autocast_context(training_dtype(cfg.dtype, device), device)  # as the trainer's steps
        dataset = WithReference(dataset, precompute_reference(model, dataset, collate, 2 * cfg.batch_size,
                                                              device, autocast))
        if eval_set is not None:
            eval_set = WithReference(eval_set, precompute_reference(model, eval_set, collate, 2 * cfg.batch_size,
                                                                    device, autocast))
        if stage.dist.is_main:
            print(f"reference log-probs precomputed for {len(dataset)} pairs; no reference model kept")
    else:
        reference = reference_fn(ref_model=frozen_reference(model))

    loss_fn = make_dpo_loss(reference, args.beta, args.label_smoothing, args.loss_type, args.sft_weight,
                            aux_loss_coef=stage.model_cfg.aux_loss_coef if stage.model_cfg.use_moe else 0.0,
                            simpo_gamma=args.simpo_gamma)
    trainer = Trainer(stage, dataset, sampler, collate, params=lora_params, save_adapter=bool(args.use_lora))
    trainer.fit(loss_fn, eval_set)
    if stage.dist.is_main and margins_before is not None:
        margins_after = preference_margins(model, stage.tokenizer, report_rows, device)
        trainer.log(f"held-out preference ({len(report_rows)} pairs from {report_path}): chosen preferred "
                    f"{(margins_before > 0).float().mean():.1%} -> {(margins_after > 0).float().mean():.1%}; "
                    f"mean log-prob margin {margins_before.mean():.2f} -> {margins_after.mean():.2f}; "
                    f"margin grew on {(margins_after > margins_before).float().mean():.1%} of pairs")
        trainer.heldout_margins = (margins_before, margins_after)
    trainer.log(f"done: checkpoint in {trainer.run_dir}")
    return trainer


if __name__ == "__main__":
    main_guard(main)
