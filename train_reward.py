"""Reward model: a scalar score per reply, trained on {"chosen", "rejected"} pairs (Bradley-Terry).

    python train_reward.py                                      # demo: out/full_sft + the demo pairs -> out/reward
    python train_reward.py --data_path dpo.jsonl --eval_split 0.02   # held-out loss and pairwise accuracy
    python train_reward.py --center_rewards_coefficient 0.01    # also pull r(chosen) + r(rejected) towards 0
    torchrun --nproc_per_node 8 train_reward.py --data_path dpo.jsonl --init_from out/full_sft

The model is the SFT checkpoint's decoder with its LM head replaced by a scalar head read at each
conversation's last token (minillm.reward.RewardModel, transformers' LlamaForSequenceClassification).
It learns r(x, y) so that P(chosen preferred) = σ(r(x, y_w) − r(x, y_l)). The saved folder is a checkpoint
marked as a reward model; the RL stages load it with minillm.reward.load_reward_model.
"""
import torch.nn.functional as F

from minillm.config import stage_group
from minillm.data import DPODataset, LengthGroupedBatchSampler, dpo_collate
from minillm.errors import UserError
from minillm.reward import MODEL_KIND, RewardModel, WithLengths, pair_rewards, read_heldout_pairs, reward_margins
from minillm.trainer import Trainer, load_datasets, main_guard, prepare_stage

STAGE_DEFAULTS = dict(
    init_from="out/full_sft", data_path="dataset/demo/dpo.jsonl", save_weight="reward", epochs=1,
    batch_size=16, max_seq_len=256, learning_rate=1e-4, weight_decay=0.0, accumulation_steps=1,
    log_interval=10, save_interval=100,
)
DEMO_REPORT = "dataset/demo/heldout_dpo.jsonl"


def add_reward_args(parser):
    group = stage_group(parser, "reward model")
    group.add_argument("--center_rewards_coefficient", type=float, default=0.0,
                       help="weight of an L2 penalty on r(chosen) + r(rejected) that keeps rewards centred on 0 "
                            "(TRL's RewardConfig option, from Eisenstein et al. 2023, eq. 2; 0 = off, TRL "
                            "recommends 0.01)")
    group.add_argument("--report_path", default="auto",
                       help="held-out {question, chosen, rejected} rows scored before and after training; "
                            "auto = the demo's set when training on the demo data, '' = none")


# -- the loss --------------------------------------------------------------------------------------
def make_reward_loss(center_rewards_coefficient: float = 0.0, aux_loss_coef: float = 0.0):
    """The stage's loss_fn(model, batch, totals): the Bradley-Terry loss −log σ(r_w − r_l), a mean over
    the step's pairs, plus center_rewards_coefficient · (r_w + r_l)² (TRL's RewardTrainer: a mean over
    pairs too). Metrics carry TRL's names: accuracy (r_w > r_l), margin (r_w − r_l), mean_reward (over
    both sides), and rewards/chosen, rewards/rejected."""
    if center_rewards_coefficient < 0:
        raise UserError(f"--center_rewards_coefficient {center_rewards_coefficient} must be >= 0")

    def reward_loss(model, batch, totals):
        chosen, rejected, aux = pair_rewards(model, batch, return_aux=True)
        pairs = totals["n_rows"]  # a share: this micro-batch's sums over the whole step's pair count
        loss = -F.logsigmoid(chosen - rejected).sum() / pairs
        c, r = chosen.detach(), rejected.detach()
        metrics = {"accuracy": (c > r).float().sum() / pairs, "margin": (c - r).sum() / pairs,
                   "mean_reward": (c + r).sum() / (2 * pairs),
                   "rewards/chosen": c.sum() / pairs, "rewards/rejected": r.sum() / pairs}
        if center_rewards_coefficient > 0:
            metrics["bt_loss"] = loss.detach()
            loss = loss + center_rewards_coefficient * ((chosen + rejected) ** 2).sum() / pairs
        if aux_loss_coef > 0:  # MoE trunks: the router's balance loss, as in every other stage
            loss = loss + aux_loss_coef * aux / totals["micro_batches"]
            metrics["aux_loss"] = aux.detach() / totals["micro_batches"]
        return loss, metrics
    return reward_loss


def main(argv=None):
    stage, args = prepare_stage(__doc__, STAGE_DEFAULTS, argv, extra_args=add_reward_args)
    cfg, device = stage.cfg, stage.dist.device
    if not cfg.init_from:
        raise UserError("a reward model starts from a trained language model: pass --init_from (e.g. out/full_sft)")
    # the SFT trunk with a new scalar head in place of the LM head; config.yaml marks the saved folder
    stage.model = RewardModel.from_lm(stage.model).to(device)
    stage.stage_args["model_kind"] = MODEL_KIND
    model = stage.model

    dataset, eval_set = load_datasets(stage, lambda path: WithLengths(DPODataset(
        path, stage.tokenizer, cfg.max_seq_len, skip_bad=bool(cfg.skip_bad_lines))))
    collate = dpo_collate(stage.tokenizer.pad_id)
    sampler = LengthGroupedBatchSampler(dataset.lengths, cfg.batch_size, stage.dist.rank,
                                        stage.dist.world_size, cfg.accumulation_steps, seed=cfg.seed)
    if stage.dist.is_main:
        print(f"reward model: {model.num_params() / 1e6:.2f}M parameters, trunk from {cfg.init_from}; "
              f"data: {dataset.report()}" + (f"; {len(eval_set)} held-out pairs" if eval_set is not None else ""))

    # held-out pairwise accuracy before training (the head is new: about chance)
    report_path = DEMO_REPORT if args.report_path == "auto" and stage.on_demo_data else \
        ("" if args.report_path == "auto" else args.report_path)
    report_rows = read_heldout_pairs(report_path) if report_path and stage.dist.is_main else []
    margins_before = reward_margins(model, stage.tokenizer, report_rows, device) if report_rows else None

    loss_fn = make_reward_loss(args.center_rewards_coefficient,
                               aux_loss_coef=stage.model_cfg.aux_loss_coef if stage.model_cfg.use_moe else 0.0)
    trainer = Trainer(stage, dataset, sampler, collate)
    trainer.fit(loss_fn, eval_set)
    if stage.dist.is_main and margins_before is not None:
        margins_after = reward_margins(model, stage.tokenizer, report_rows, device)
        trainer.log(f"held-out pairs ({len(report_rows)} from {report_path}): pairwise accuracy "
                    f"{(margins_before > 0).float().mean():.1%} -> {(margins_after > 0).float().mean():.1%}; "
                    f"mean reward margin {margins_before.mean():.3f} -> {margins_after.mean():.3f}")
        trainer.heldout_margins = (margins_before, margins_after)
    trainer.log(f"done: reward model in {trainer.run_dir} (load it with minillm.reward.load_reward_model)")
    return trainer


if __name__ == "__main__":
    main_guard(main)
