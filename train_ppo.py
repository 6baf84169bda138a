"""RL stage: proximal policy optimisation (PPO) on rlaif prompts, as InstructGPT and TRL run it.

    python train_ppo.py                                          # demo: out/full_sft on the demo prompts, rule rewards
    python train_ppo.py --rewards model --reward_model_path out/reward     # a train_reward.py model scores replies
    python train_ppo.py --kl_target 1.0                          # adaptive KL coefficient (Ziegler et al. 2019)
    python train_ppo.py --use_lora 1 --save_weight ppo_lora      # train an adapter; the reference = adapter off
    torchrun --nproc_per_node 8 train_ppo.py --data_path rlaif.jsonl --init_from out/full_sft

Each step takes --batch_size x --accumulation_steps prompts per process and turns them into experience:

  1. rollouts   one sampled completion per prompt (temperature only, so the log-probs below are the
                sampling distribution's), with the old policy's log-probs and the critic's values
  2. rewards    per token -kl_coef * KL(policy || reference), plus the prompt's score (rule rewards or
                the reward model) on the completion's last token
  3. GAE        advantages A_t = sum_l (gamma*lam)^l delta_{t+l}, delta_t = r_t + gamma*V_{t+1} - V_t;
                returns = A + V; advantages whitened over the batch
  4. updates    --ppo_update_iters passes over the experience in shuffled mini-batches of
                --mini_batch_size rows, each one optimizer update of the clipped policy loss plus
                --vf_coef x the clipped value loss; a step stops early once the policy has moved more
                than --early_stop_kl (approximate KL) from the one that sampled

The critic is a separate model with a scalar head on every position, a copy of the policy's trunk or of
the reward model (--value_init; minillm/value.py says why it is separate); policy and critic train as one
module under one optimizer. The checkpoint in --save_dir/--save_weight is
the policy alone, a normal checkpoint (eval_model.py, the next stage); the critic and the KL coefficient
ride in its trainer_state for --from_resume 1. Metrics carry TRL's names (objective/kl, objective/scores,
objective/rlhf_reward, policy/approxkl_avg, loss/value_avg, ...).
"""
import copy
import math

import numpy as np
import torch
import torch.distributed as dist

from minillm.config import stage_group
from minillm.data import ShardedBatchSampler
from minillm.data.chat import IGNORE_INDEX
from minillm.errors import UserError
from minillm.evaluation import heldout_accuracy, read_heldout
from minillm.generate import SamplingParams
from minillm.lora import add_lora_flags, apply_lora, lora_disabled
from minillm.model import eval_mode
from minillm.rewards import RULES, make_reward_fn
from minillm.rl import (DEMO_PROMPTS, PromptDataset, experience_batches, prompt_collate, prompt_reward,
                        resolve_max_prompts, sample_rollouts, token_logprobs, whiten)
from minillm.trainer import Trainer, autocast_context, load_datasets, main_guard, prepare_stage, training_dtype
from minillm.value import PolicyAndValue, ValueModel

STAGE_DEFAULTS = dict(
    init_from="out/full_sft", data_path="dataset/demo/rlaif.jsonl", save_weight="ppo_actor",
    # demo-tuned on a 2-core CPU: one completion per prompt is a noisy signal, so 32 prompts a step; the lr
    # warms up over 6 steps (Adam's first updates are full-size whatever the gradient's noise). A prompt's
    # reward moves once it has been sampled many times and the critic has learnt its value, so the demo
    # trains on its first 64 prompts (--max_prompts auto), 45 times each in the 90 steps: greedy reward
    # 0.61 -> 0.70. All 480 prompts 6 times did not move it (0.61 -> 0.61); lr 5e-5 cost 4 held-out facts.
    # On other data --max_steps 90 still ends the run: set it and --epochs for the data
    epochs=45, batch_size=32, max_seq_len=128, learning_rate=3e-5, weight_decay=0.0, warmup_steps=6,
    accumulation_steps=1, max_steps=90, log_interval=5, save_interval=30, num_workers=0,
)
DEMO_REPORT = "dataset/demo/heldout_sft.jsonl"
# answer correctness alone (+ the cut-reply penalty): the demo model hardly ever writes the think format on
# thinking-on prompts, so a format reward is a near-constant per prompt that only adds variance here (GRPO's
# per-prompt baseline cancels it, PPO's batch-whitened advantages do not)
RULE_DEFAULT, MODEL_DEFAULT = "answer,length:0.5", "model,format:0.5,length:0.5,repetition"


def add_ppo_args(parser):
    group = stage_group(parser, "PPO")
    group.add_argument("--max_prompts", type=int, default=-1,
                       help=f"train on the file's first this many prompts only, epoch after epoch (0 = all; "
                            f"-1 = auto: {DEMO_PROMPTS} on the demo prompts, else all)")
    group.add_argument("--rewards", default="auto",
                       help=f"comma list of rewards, each name or name:weight, from {', '.join(RULES)}; auto = "
                            f"{RULE_DEFAULT!r}, or {MODEL_DEFAULT!r} with --reward_model_path")
    group.add_argument("--reward_model_path", default="", help="a train_reward.py checkpoint for the 'model' reward")
    group.add_argument("--value_init", choices=("auto", "policy", "reward"), default="auto",
                       help="the critic starts as a copy of the policy (MiniMind) or of the reward model (TRL); "
                            "auto = the reward model when --reward_model_path is given")
    group.add_argument("--max_gen_len", type=int, default=32, help="most tokens sampled per completion")
    group.add_argument("--temperature", type=float, default=1.0,
                       help="sampling temperature (top-p/top-k off: PPO needs the sampling distribution's log-probs)")
    group.add_argument("--thinking_ratio", type=float, default=0.9,
                       help="share of prompts left open for thinking; the rest get an empty think block")
    group.add_argument("--clip_epsilon", type=float, default=0.2, help="policy ratio clip range (1 ± eps)")
    group.add_argument("--cliprange_value", type=float, default=0.2, help="value clip range around the old values")
    group.add_argument("--vf_coef", type=float, default=0.5, help="weight of the value loss")
    group.add_argument("--critic_learning_rate", type=float, default=-1.0,
                       help="MiniMind's critic learning rate; the critic trains in the policy's optimizer at "
                            "--learning_rate (as TRL), so only -1 or that same value is accepted")
    group.add_argument("--kl_coef", type=float, default=0.02,
                       help="per-token KL penalty coefficient in the reward (the start value with --kl_target)")
    group.add_argument("--kl_target", type=float, default=0.0,
                       help="> 0: adapt the KL coefficient towards this per-completion KL (0 = fixed coefficient)")
    group.add_argument("--kl_horizon", type=float, default=10000, help="adaptive KL controller's horizon (rollouts)")
    group.add_argument("--kl_estimator", choices=("k1", "k3"), default="k1",
                       help="per-token KL estimate: k1 = log pi - log ref, k3 = e^(ref-pi) - 1 - (ref-pi)")
    group.add_argument("--gamma", type=float, default=1.0, help="GAE discount")
    group.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
    group.add_argument("--whiten_rewards", type=int, default=0, help="1 = whiten the per-token rewards (mean kept)")
    group.add_argument("--missing_eos_penalty", type=float, default=0.0,
                       help="subtracted from the score of a completion cut at --max_gen_len without a stop token")
    group.add_argument("--ppo_update_iters", type=int, default=2, help="passes (PPO epochs) over each step's rollouts")
    group.add_argument("--mini_batch_size", type=int, default=16,
                       help="rollouts per optimizer update, per process (0 = all of the step's)")
    group.add_argument("--value_warmup_steps", type=int, default=4,
                       help="first steps train the critic alone on their rollouts (policy loss off), so that the "
                            "first policy updates see a learned baseline, not a zero one (TRL does not)")
    group.add_argument("--early_stop_kl", type=float, default=0.25,
                       help="stop a step's updates once policy/approxkl exceeds this (0 = never)")
    group.add_argument("--use_lora", type=int, default=0,
                       help="1 = train a LoRA adapter on the policy; the reference is the policy with it off")
    add_lora_flags(group)
    group.add_argument("--report_path", default="auto",
                       help="held-out {question, answer} rows whose greedy accuracy is reported before and after; "
                            "auto = the demo's set when training on the demo prompts, '' = none")
    group.add_argument("--report_prompts", type=int, default=64,
                       help="training prompts answered greedily before and after, for their mean reward (0 = none)")


# -- the PPO math ------------------------------------------------------------------------------------
def kl_penalty(logprobs, ref_logprobs, estimator: str = "k1"):
    """Per-token KL(policy || reference) estimate from the sampled tokens' log-probs (Schulman's k1/k3)."""
    logr = ref_logprobs - logprobs
    return -logr if estimator == "k1" else logr.exp() - 1 - logr


def shaped_rewards(kl, scores, last_index, kl_coef: float):
    """Per-token rewards [N, T]: -kl_coef * kl everywhere, plus each row's score at its last completion
    token `last_index` [N] (InstructGPT). -> (rewards, non_score_reward)."""
    non_score = -kl_coef * kl
    rewards = non_score.clone()
    rewards[torch.arange(len(scores), device=rewards.device), last_index] += scores
    return rewards, non_score


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation over [N, T] token rewards and values; positions outside `mask`
    (prompt, padding) count as reward 0 and value 0, so a completion's last token bootstraps from 0.
    -> (advantages, returns = advantages + values), both 0 outside the mask."""
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    last = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages * mask, (advantages + values) * mask


def clipped_policy_loss(logprobs, old_logprobs, advantages, clip: float):
    """Per-token max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip)) and where the clipped term won."""
    ratio = (logprobs - old_logprobs).exp()
    losses, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)
    return torch.max(losses, clipped), (clipped > losses), ratio


def clipped_value_loss(values, old_values, returns, clip: float):
    """Per-token 0.5 * max((V - R)^2, (clip(V, V_old ± clip) - R)^2) and where the clipped term won."""
    losses = (values - returns) ** 2
    clipped = (old_values + (values - old_values).clamp(-clip, clip) - returns) ** 2
    return 0.5 * torch.max(losses, clipped), (clipped > losses)


def adaptive_kl_coef(coef: float, kl: float, target: float, n_rollouts: int, horizon: float) -> float:
    """Ziegler et al.'s controller (TRL's AdaptiveKLController): move the coefficient by at most ±20% of
    n_rollouts / horizon per update, towards the value at which the completions' KL meets `target`."""
    error = float(np.clip(kl / target - 1, -0.2, 0.2))
    return coef * (1 + error * n_rollouts / horizon)


def all_ranks_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


# -- experience: rollouts -> rewards -> advantages -> updates ----------------------------------------
def rollout_seed(seed: int, step: int, rank: int) -> int:
    """One step's sampling seed on one rank, a function of (seed, step, rank) only: a resumed run samples
    exactly what an uninterrupted one would (the global RNG is not: data loaders draw from it)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> 1)


def make_ppo_rollout(rows, tokenizer, reward_fn, reference, args, seed_fn, micro_batch_rows: int, autocast,
                     kl_box: dict, step_fn=lambda: 0):
    """The trainer's `rollout(model, micro_batches)`: samples completions for the step's prompts with the
    policy of `model` (a PolicyAndValue), builds the experience and yields the step's updates.
    `reference(ids) -> logits` is the frozen reference; `seed_fn()` -> this step's seed; `kl_box["approxkl"]`
    is where the loss adds each update's approximate KL (read here for the early stop); `step_fn()` -> the
    trainer's step (the first --value_warmup_steps train the critic alone). `rollout.scores`
    keeps each step's mean score and `rollout.kls` its mean KL per completion (over all ranks),
    `rollout.early_stops` counts the stopped steps."""
    sampling = SamplingParams(max_new_tokens=args.max_gen_len, temperature=args.temperature, top_k=0, top_p=1.0,
                              stop_ids=tokenizer.stop_ids)

    @torch.no_grad()
    def forward_logprobs(model, ids, labels):
        """Old log-probs and values of the policy + critic, and reference log-probs, in row chunks."""
        logps, values, ref_logps = [], [], []
        with eval_mode(model), autocast:
            for s in range(0, len(ids), micro_batch_rows):
                chunk, chunk_labels = ids[s: s + micro_batch_rows], labels[s: s + micro_batch_rows]
                logits, vals, _ = model(chunk)
                logps.append(token_logprobs(logits[:, :-1].float() / args.temperature, chunk_labels))
                values.append(vals[:, :-1].float())
                ref_logps.append(token_logprobs(reference(chunk)[:, :-1].float() / args.temperature, chunk_labels))
        return torch.cat(logps), torch.cat(values), torch.cat(ref_logps)

    def rollout(model, micro_batches):
        device = model.kl_coef.device
        step_seed = seed_fn()
        gen = torch.Generator(device).manual_seed(step_seed)  # sampling
        cpu_gen = torch.Generator().manual_seed(step_seed)  # mini-batch order
        prompts = [p for b in micro_batches for p in b["prompts"]]
        prompt_rows = [rows[int(i)] for b in micro_batches for i in b["index"]]
        with torch.no_grad():  # sampled in the weights' dtype (a KV cache in autocast's would not match)
            ro = sample_rollouts(model.policy, prompts, 1, sampling, tokenizer.pad_id, gen)
        scores, parts = reward_fn(prompt_rows, ro)
        scores = scores.float()
        if args.missing_eos_penalty:
            scores = scores - args.missing_eos_penalty * (~ro.finished).float()

        labels, mask = ro.labels, ro.loss_mask[:, 1:]
        logprobs, values, ref_logprobs = forward_logprobs(model, ro.ids, labels)
        values = values * mask
        kl = kl_penalty(logprobs, ref_logprobs, args.kl_estimator) * mask
        kl_coef = float(model.kl_coef)
        last = torch.tensor(ro.lengths, device=device) - 2  # label index of each completion's last token
        rewards, non_score = shaped_rewards(kl, scores, last, kl_coef)
        if args.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = gae(rewards, values, mask, args.gamma, args.lam)
        advantages = whiten(advantages, mask) * mask

        # what the step logs about its rollouts (TRL's objective/* names): per-completion sums, batch means
        mean_kl = kl.sum(1).mean()
        stats = {"objective/kl": mean_kl, "objective/entropy": (-logprobs * mask).sum(1).mean(),
                 "objective/non_score_reward": non_score.sum(1).mean(), "objective/scores": scores.mean(),
                 "objective/rlhf_reward": non_score.sum(1).mean() + scores.mean(),
                 "objective/kl_coef": torch.tensor(kl_coef, device=device),
                 "val/num_eos_tokens": ro.finished.float().sum(),
                 "completions/mean_length": mask.float().sum(1).mean()}
        stats.update({f"rewards/{name}": value.float().mean() for name, value in parts.items()})
        rollout.scores.append(float(all_ranks_mean(scores.mean())))
        rollout.kls.append(float(all_ranks_mean(mean_kl)))
        if args.kl_target > 0:  # every rank moves the coefficient by the same all-rank KL and rollout count
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            model.kl_coef.fill_(adaptive_kl_coef(kl_coef, float(all_ranks_mean(mean_kl)), args.kl_target,
                                                 len(prompts) * world, args.kl_horizon))

        warmup = step_fn() < getattr(args, "value_warmup_steps", 0)
        # the critic alone: the policy loss weighted 0 (not dropped: every parameter keeps a gradient)
        stats["policy/weight"] = torch.tensor(0.0 if warmup else 1.0, device=device)
        experience = {"ids": ro.ids, "loss_mask": ro.loss_mask, "old_logprobs": logprobs, "old_values": values,
                      "returns": returns, "advantages": advantages}
        n = len(prompts)
        rows_per_update = min(args.mini_batch_size or n, n)
        for _ in range(args.ppo_update_iters):
            order = torch.randperm(n, generator=cpu_gen)
            for start in range(0, n, rows_per_update):
                batches = experience_batches(experience, ro.lengths, micro_batch_rows,
                                             order[start: start + rows_per_update])
                for batch in batches:
                    batch["stats"] = stats
                kl_box["approxkl"] = torch.zeros((), device=device)
                yield batches
                # early stop on the KL between the updated policy and the sampling one, decided on the
                # mean over ranks so that every rank stops at the same update
                if args.early_stop_kl > 0 and not warmup:
                    approxkl = kl_box["approxkl"]
                    if dist.is_available() and dist.is_initialized():
                        dist.all_reduce(approxkl)  # each rank holds its share of the all-rank mean
                    if float(approxkl) > args.early_stop_kl:
                        rollout.early_stops += 1
                        return

    rollout.scores, rollout.kls, rollout.early_stops = [], [], 0
    return rollout


def make_ppo_loss(clip: float, clip_value: float, vf_coef: float, temperature: float, kl_box: dict,
                  aux_loss_coef: float = 0.0):
    """The stage's loss_fn(model, batch, totals): clipped policy loss + vf_coef x clipped value loss,
    token means over the update's completion tokens (shares normalised by totals["n_targets"])."""

    def ppo_loss(model, batch, totals):
        mask = batch["loss_mask"][:, 1:]
        labels = batch["ids"][:, 1:].masked_fill(~mask, IGNORE_INDEX)
        logits, values, aux = model(batch["ids"])
        logits = logits[:, :-1].float() / temperature
        logprobs = token_logprobs(logits, labels)
        pg_losses, pg_clipped, ratio = clipped_policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], clip)
        vf_losses, vf_clipped = clipped_value_loss(values[:, :-1], batch["old_values"], batch["returns"], clip_value)
        m, n = mask.float(), totals["n_targets"]
        pg_loss, vf_loss = (pg_losses * m).sum() / n, (vf_losses * m).sum() / n
        loss = batch["stats"].get("policy/weight", 1.0) * pg_loss + vf_coef * vf_loss
        with torch.no_grad():
            entropy = torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)
            approxkl = 0.5 * ((logprobs - batch["old_logprobs"]) ** 2 * m).sum() / n
        kl_box["approxkl"] = kl_box["approxkl"] + approxkl
        metrics = {"loss/policy_avg": pg_loss.detach(), "loss/value_avg": vf_loss.detach(),
                   "policy/approxkl_avg": approxkl, "policy/clipfrac_avg": (pg_clipped * m).sum() / n,
                   "val/clipfrac_avg": (vf_clipped * m).sum() / n, "policy/entropy_avg": (entropy * m).sum() / n,
                   "val/ratio": (ratio.detach() * m).sum() / n}
        if aux_loss_coef > 0:
            loss = loss + aux_loss_coef * aux / totals["micro_batches"]
            metrics["aux_loss"] = aux.detach() / totals["micro_batches"]
        # the step's rollout statistics, spread over its micro-batches so that they add up to their value
        metrics.update({k: v / totals["micro_batches"] for k, v in batch["stats"].items()})
        return loss, metrics
    return ppo_loss


# -- reports -----------------------------------------------------------------------------------------
@torch.no_grad()
def prompt_scores(policy, tokenizer, dataset, reward_fn, n_prompts: int, max_gen_len: int, temperature: float = 0.0,
                  samples: int = 1, seed: int = 0) -> float:
    """Mean score of `samples` completions to each of the first `n_prompts` prompts, greedy (temperature 0)
    or sampled from a fixed seed, for the before/after report (the same prompts and draws both times)."""
    n = min(n_prompts, len(dataset))
    params = SamplingParams(max_new_tokens=max_gen_len, temperature=temperature, top_k=0, top_p=1.0,
                            stop_ids=tokenizer.stop_ids)
    return prompt_reward(policy, dataset, tokenizer, reward_fn, n, params, samples, seed)[0]


def main(argv=None, reward_fn=None):
    """-> the Trainer (with .rollout_scores and .report). `reward_fn(rows, rollouts) -> (scores [N], parts)`
    replaces --rewards (a notebook's or a test's own reward)."""
    stage, args = prepare_stage(__doc__, STAGE_DEFAULTS, argv, extra_args=add_ppo_args)
    cfg, device, dist_info = stage.cfg, stage.dist.device, stage.dist
    if cfg.eval_data_path or cfg.eval_split:
        raise UserError("PPO has no held-out loss: drop --eval_data_path / --eval_split (the held-out report is "
                        "--report_path)")
    if args.critic_learning_rate >= 0 and args.critic_learning_rate != cfg.learning_rate:
        raise UserError(f"--critic_learning_rate {args.critic_learning_rate}: the critic trains with the policy in "
                        f"one optimizer at --learning_rate {cfg.learning_rate} (as TRL); a separate critic rate is "
                        f"not supported: drop the flag or give the same value")
    if args.temperature <= 0:
        raise UserError(f"--temperature {args.temperature}: rollouts must sample, use a value > 0")
    max_prompts = resolve_max_prompts(args.max_prompts, stage.on_demo_data,
                                      cfg.batch_size * cfg.accumulation_steps * dist_info.world_size)
    if args.max_gen_len < 1 or args.ppo_update_iters < 1 or args.mini_batch_size < 0:
        raise UserError("--max_gen_len and --ppo_update_iters must be >= 1, --mini_batch_size >= 0")
    if not (0 <= args.gamma <= 1 and 0 <= args.lam <= 1):
        raise UserError(f"--gamma {args.gamma} and --lam {args.lam} must be in [0, 1]")
    room = stage.model_cfg.max_position_embeddings
    if cfg.max_seq_len + args.max_gen_len > room:
        raise UserError(f"--max_seq_len {cfg.max_seq_len} (prompt) + --max_gen_len {args.max_gen_len} exceeds the "
                        f"model's {room} positions; lower one of them")
    rewards_spec = args.rewards
    if rewards_spec == "auto":
        rewards_spec = MODEL_DEFAULT if args.reward_model_path else RULE_DEFAULT
    reward_model = None
    if reward_fn is None:
        if args.reward_model_path:
            from minillm.reward import load_reward_model
            reward_model = load_reward_model(args.reward_model_path, device)
        reward_fn = make_reward_fn(rewards_spec, stage.tokenizer, reward_model)
    else:
        rewards_spec = getattr(reward_fn, "__name__", "the caller's reward_fn")

    # the policy, its reference, and the critic
    policy = stage.model.to(device)
    if args.value_init == "reward" and reward_model is None:
        raise UserError("--value_init reward needs --reward_model_path (the critic starts as that model)")
    # the critic: a copy of the reward model, or of the SFT weights (before any adapter goes in)
    critic = (ValueModel.from_reward_model(reward_model) if reward_model is not None and args.value_init != "policy"
              else ValueModel.from_policy(policy)).to(device)
    lora_params = None
    if args.use_lora:
        lora_params = apply_lora(policy, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets,
                                 bool(args.use_rslora))

        def reference(ids):
            with lora_disabled(policy):
                return policy(ids)
    else:
        ref_model = copy.deepcopy(policy).eval().requires_grad_(False)
        reference = ref_model
    model = PolicyAndValue(policy, critic, args.kl_coef).to(device)
    stage.model = model
    params = (list(lora_params) + list(critic.parameters())) if lora_params is not None else None

    # prompts
    dataset, _ = load_datasets(stage, lambda path: PromptDataset(
        path, stage.tokenizer, cfg.max_seq_len, skip_bad=bool(cfg.skip_bad_lines),
        thinking_ratio=args.thinking_ratio, seed=cfg.seed))
    dataset.keep_first(max_prompts)
    stage.stage_args["max_prompts"] = max_prompts  # config.yaml records the count used (auto resolved)
    sampler = ShardedBatchSampler(len(dataset), cfg.batch_size, dist_info.rank, dist_info.world_size,
                                  cfg.accumulation_steps, seed=cfg.seed)
    if dist_info.is_main:
        print(f"policy: {policy.num_params() / 1e6:.2f}M parameters from {cfg.init_from}; critic "
              f"{critic.num_params() / 1e6:.2f}M; data: {dataset.describe()}; rewards: {rewards_spec}")

    # before: held-out facts and greedy reward
    report_path = DEMO_REPORT if args.report_path == "auto" and stage.on_demo_data else \
        ("" if args.report_path == "auto" else args.report_path)
    report_rows = read_heldout(report_path) if report_path and dist_info.is_main else []
    before, n_report = {}, args.report_prompts if dist_info.is_main else 0

    def report_rewards():  # what the rollouts earn (sampled, 4 per prompt) and what a user sees (greedy)
        return {"sampled": prompt_scores(policy, stage.tokenizer, dataset, reward_fn, n_report, args.max_gen_len,
                                         args.temperature, samples=4),
                "greedy": prompt_scores(policy, stage.tokenizer, dataset, reward_fn, n_report, args.max_gen_len)}
    if n_report:
        before["reward"] = report_rewards()
    if report_rows:
        before["heldout"] = heldout_accuracy(policy, stage.tokenizer, report_rows)

    autocast = autocast_context(training_dtype(cfg.dtype, device), device)
    kl_box = {}
    micro_rows = cfg.batch_size  # rows per forward, in the experience passes and in the updates
    trainer = Trainer(stage, dataset, sampler, prompt_collate, params=params, save_adapter=bool(args.use_lora),
                      checkpoint_model=policy)
    rollout = make_ppo_rollout(dataset.rows, stage.tokenizer, reward_fn, reference, args,
                               lambda: rollout_seed(cfg.seed, trainer.step, dist_info.rank), micro_rows, autocast,
                               kl_box, step_fn=lambda: trainer.step)
    loss_fn = make_ppo_loss(args.clip_epsilon, args.cliprange_value, args.vf_coef, args.temperature, kl_box,
                            aux_loss_coef=stage.model_cfg.aux_loss_coef if stage.model_cfg.use_moe else 0.0)
    trainer.fit(loss_fn, rollout=rollout)
    trainer.rollout_scores = rollout.scores

    if dist_info.is_main:
        scores, kls, after = rollout.scores, rollout.kls, {}
        k = max(1, math.ceil(len(scores) / 5))
        if scores:  # (a resumed run may have had no step left)
            trainer.log(f"reward ({rewards_spec}) of the rollouts: {np.mean(scores[:k]):.3f} over the first {k} "
                        f"steps -> "
                        f"{np.mean(scores[-k:]):.3f} over the last {k}; KL to the reference per completion "
                        f"{np.mean(kls[-k:]):.3f} over the last {k} steps (max {max(kls):.3f}); early stops "
                        f"{rollout.early_stops}")
        if n_report:
            after["reward"] = report_rewards()
            for name in ("sampled", "greedy"):
                how = f"sampled 4 per prompt at temperature {args.temperature}" if name == "sampled" else "greedy"
                trainer.log(f"reward on the first {min(n_report, len(dataset))} training prompts, {how}: "
                            f"{before['reward'][name]:.3f} -> {after['reward'][name]:.3f}")
        if report_rows:
            after["heldout"] = heldout_accuracy(policy, stage.tokenizer, report_rows)
            trainer.log(f"held-out accuracy ({len(report_rows)} questions from {report_path}): "
                        f"{before['heldout'].summary()} -> {after['heldout'].summary()}")
        trainer.report = {"before": before, "after": after}
    trainer.log(f"done: policy checkpoint in {trainer.run_dir}")
    return trainer


if __name__ == "__main__":
    main_guard(main)
