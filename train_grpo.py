"""Stage: group relative policy optimisation (GRPO, and MiniMind's CISPO) on rlaif.jsonl prompts.

    python train_grpo.py                                        # demo: from out/full_sft, 6 epochs over 64 demo prompts
    python train_grpo.py --dynamic_sampling 0 --max_prompts 0   # MiniMind's: every group kept, every prompt
    python train_grpo.py --loss_type grpo --epsilon 0.2         # PPO-style clipped ratio instead of CISPO
    python train_grpo.py --rewards answer,format:0.5,length:0.5 # weighted rule rewards (minillm/rewards.py)
    python train_grpo.py --reward_model_path out/reward         # a train_reward.py model's score (+ format, penalties)
    python train_grpo.py --loss_agg token                       # token-level mean (DAPO) instead of mean of means
    python train_grpo.py --num_iterations 2                     # two updates per rollout (ratios move off 1)
    python train_grpo.py --use_lora 1 --save_weight grpo_lora   # adapter only; reference = adapter off
    torchrun --nproc_per_node 8 train_grpo.py --data_path rlaif.jsonl --from_weight full_sft

Each optimizer step takes batch_size x accumulation_steps prompts, samples --num_generations
completions for each with the KV-cached batched sampler, scores them, and turns every group of
completions of one prompt into advantages A = (r - mean) / (std + 1e-4) (std over the group, with
Bessel's correction as TRL; a group whose rewards are all equal gets A = 0: nothing to learn there).
The per-token objective, with ratio ρ = π/π_old on the sampled token:

    grpo   -min(ρ·A, clip(ρ, 1-ε, 1+ε_high)·A)          (PPO's clipped surrogate; TRL's grpo/dapo/bnpo/dr_grpo)
    cispo  -sg(min(ρ, ε_high))·A·log π                  (MiniMind's and TRL's CISPO: the weight carries no gradient)

plus β·KL(π ‖ π_ref) per token with the k3 estimator exp(ref - logp) - (ref - logp) - 1. With
--num_iterations 1 (MiniMind) π_old is the policy itself, detached: ρ = 1 but the gradient flows,
as in TRL. Log-probs are of the logits divided by --temperature, the distribution sampled from (as TRL).

--dynamic_sampling (DAPO, on by default): a group whose completions all score the same gets A = 0 and
teaches nothing, and the demo model answers about half its prompts always or never right; so while a step
lacks informative groups, more random prompts are sampled (at most that many extra rounds) and the step
trains on its first informative groups, as many as it had prompts (rows per step stay fixed).
"""
import copy

import numpy as np
import torch

from minillm.config import stage_group
from minillm.data import ShardedBatchSampler
from minillm.data.chat import IGNORE_INDEX
from minillm.errors import UserError
from minillm.evaluation import heldout_accuracy, read_heldout
from minillm.generate import SamplingParams
from minillm.lora import add_lora_flags, apply_lora, lora_disabled
from minillm.model import eval_mode
from minillm.rewards import RULES, make_reward_fn
from minillm.rl import (DEMO_PROMPTS, PromptDataset, Rollouts, experience_batches, prompt_collate, prompt_reward,
                        resolve_max_prompts, sample_rollouts, token_logprobs)
from minillm.trainer import Trainer, autocast_context, load_datasets, main_guard, prepare_stage, training_dtype

STAGE_DEFAULTS = dict(
    init_from="out/full_sft", data_path="dataset/demo/rlaif.jsonl", save_weight="grpo",
    # MiniMind: 1 epoch, batch 2, lr 3e-7 for a 64M model over 1024-token replies. The demo model knows its
    # facts only sometimes: reward rises on prompts it meets several times, so 6 epochs over the first 64
    # demo prompts (--max_prompts auto) at lr 1e-4 (2e-4 cost held-out facts). max_seq_len is the longest
    # prompt (MiniMind's meaning here).
    epochs=6, batch_size=4, max_seq_len=128, learning_rate=1e-4, weight_decay=0.0, accumulation_steps=1,
    log_interval=5, save_interval=50, num_workers=0,
)
LOSS_TYPES = ("grpo", "cispo")
LOSS_AGGS = ("seq", "token", "dr_grpo")
DEMO_REPORT = "dataset/demo/heldout_sft.jsonl"
RULE_DEFAULT, MODEL_DEFAULT = "answer,format:0.5,length:0.5", "model,format:0.5,length:0.5,repetition"


def add_grpo_args(parser):
    group = stage_group(parser, "GRPO")
    # demo-tuned (MiniMind: 6 generations at temperature 0.8): only a group with both right and wrong completions
    # teaches anything, and the demo model answers most prompts always or never right; 8 samples at 1.0 find more
    group.add_argument("--num_generations", type=int, default=8, help="completions sampled per prompt (a group)")
    group.add_argument("--max_gen_len", type=int, default=24,
                       help="longest completion in tokens (the demo's answers take ~6; MiniMind: 1536)")
    group.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    group.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling of the rollouts (1 = off)")
    group.add_argument("--beta", type=float, default=0.1, help="weight of the per-token KL to the reference (0 = none)")
    group.add_argument("--loss_type", choices=LOSS_TYPES, default="cispo",
                       help="cispo = clipped, stop-gradient importance weight x A x log-prob (MiniMind's default); "
                            "grpo = PPO's clipped ratio")
    group.add_argument("--epsilon", type=float, default=0.2, help="lower clip: ratio >= 1 - epsilon (grpo)")
    group.add_argument("--epsilon_high", type=float, default=-1.0,
                       help="grpo: upper clip 1 + epsilon_high; cispo: the importance weight's cap; "
                            "-1 = epsilon for grpo, 5.0 for cispo (MiniMind's default)")
    group.add_argument("--loss_agg", choices=LOSS_AGGS, default="seq",
                       help="seq = mean over completions of each one's token mean (MiniMind, TRL 'grpo'); "
                            "token = mean over all completion tokens of the step (TRL 'dapo', its cispo default); "
                            "dr_grpo = token sum / (completions x max_gen_len) (Dr. GRPO: no length bias)")
    group.add_argument("--scale_rewards", choices=("group", "batch", "none"), default="group",
                       help="divide advantages by the group's reward std, the whole batch's, or nothing (Dr. GRPO)")
    group.add_argument("--num_iterations", type=int, default=1,
                       help="optimizer updates per rollout (TRL's name; MiniMind does 1)")
    group.add_argument("--dynamic_sampling", type=int, default=2,
                       help="DAPO's dynamic sampling: up to this many extra rounds of as many random prompts while "
                            "the step has groups whose rewards all agree; keeps the informative ones (0 = off, as MiniMind)")
    group.add_argument("--max_prompts", type=int, default=-1,
                       help=f"train on the file's first this many prompts only, epoch after epoch (0 = all; "
                            f"-1 = auto: {DEMO_PROMPTS} on the demo prompts, else all)")
    group.add_argument("--rewards", default="auto",
                       help=f"comma list of rewards, each name or name:weight, from {', '.join(RULES)}; "
                            f"auto = '{RULE_DEFAULT}', or '{MODEL_DEFAULT}' with --reward_model_path")
    group.add_argument("--reward_model_path", default="", help="a train_reward.py checkpoint for the 'model' reward")
    group.add_argument("--thinking_ratio", type=float, default=0.9,
                       help="share of prompts left open to think; the others get an empty think block")
    group.add_argument("--use_lora", type=int, default=0,
                       help="1 = train a LoRA adapter only; the reference is the model with the adapter off")
    add_lora_flags(group)
    group.add_argument("--rollout_engine", choices=("torch", "sglang"), default="torch",
                       help="MiniMind's flag: torch = minillm's own batched KV-cache sampler (sglang is not supported)")
    group.add_argument("--debug_mode", action="store_true",
                       help="print the first prompt of a step, its completions and their rewards (MiniMind's flag)")
    group.add_argument("--debug_interval", type=int, default=20, help="with --debug_mode: every this many steps")
    group.add_argument("--report_path", default="auto",
                       help="held-out {question, answer} rows answered greedily before and after training; "
                            "auto = the demo's facts when training on the demo prompts, '' = none")
    group.add_argument("--report_prompts", type=int, default=64,
                       help="training prompts answered greedily before and after, for their mean reward (0 = none)")


# -- the math ----------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, num_generations: int, scale: str = "group"):
    """rewards [N] (groups of num_generations consecutive rows) -> (advantages [N], group std [N]).
    A = (r - group mean) / (std + 1e-4), std with Bessel's correction (TRL's nanstd; MiniMind takes the
    population std); scale "batch" divides by the std of all N, "none" not at all (Dr. GRPO). A group
    whose rewards are all equal gets exactly 0 (its tiny rounding residue would otherwise be scaled up)."""
    grouped = rewards.view(-1, num_generations)
    mean = grouped.mean(1, keepdim=True)
    std = grouped.std(1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean)
    flat = (grouped == grouped[:, :1]).all(1, keepdim=True)
    centred = torch.where(flat, torch.zeros_like(grouped), grouped - mean)
    if scale == "group":
        centred = centred / (std + 1e-4)
    elif scale == "batch":
        centred = centred / (rewards.std() + 1e-4 if rewards.numel() > 1 else 1e-4)
    elif scale != "none":
        raise ValueError(f"scale_rewards {scale!r}: use group, batch or none")
    return centred.flatten(), std.expand_as(grouped).flatten()


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π ‖ π_ref) estimate on tokens sampled from π (Schulman's k3): exp(d) - d - 1 with
    d = log π_ref - log π; never negative, 0 where the two agree."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def policy_loss(logps, old_logps, advantages, loss_type: str, epsilon: float, epsilon_high: float):
    """Per-token policy loss [N, T] and where the ratio was clipped (bool [N, T]).
    `advantages` [N, 1]; grpo: -min(ρA, clip(ρ, 1-ε, 1+ε_high)A); cispo: -sg(min(ρ, ε_high))·A·log π."""
    ratio = torch.exp(logps - old_logps)
    if loss_type == "cispo":
        weight = torch.clamp(ratio, max=epsilon_high).detach()
        return -weight * advantages * logps, (ratio > epsilon_high) & (advantages > 0)
    if loss_type != "grpo":
        raise ValueError(f"loss_type {loss_type!r}: use one of {', '.join(LOSS_TYPES)}")
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    was_clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
    return loss, was_clipped


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_agg: str, totals: dict, max_gen_len: int):
    """This micro-batch's share of the step's loss (the shares of all micro-batches and ranks add up to it):
    seq = Σ_i (Σ_t l_it / T_i) / rows; token = Σ l / tokens; dr_grpo = Σ l / (rows x max_gen_len)."""
    summed = (per_token * mask).sum(1)
    if loss_agg == "seq":
        return (summed / mask.sum(1).clamp(min=1)).sum() / totals["n_rows"]
    if loss_agg == "token":
        return summed.sum() / totals["n_targets"]
    if loss_agg == "dr_grpo":
        return summed.sum() / (totals["n_rows"] * max_gen_len)
    raise ValueError(f"loss_agg {loss_agg!r}: use one of {', '.join(LOSS_AGGS)}")


def completion_logprobs(model, ids, loss_mask, temperature: float, rows_per_batch: int, autocast) -> torch.Tensor:
    """Per-token log-probs [N, T-1] of the completion tokens (0 elsewhere) under `model`, no autograd,
    `rows_per_batch` rows at a time."""
    labels = ids[:, 1:].masked_fill(~loss_mask[:, 1:], IGNORE_INDEX)
    out = []
    with torch.no_grad():
        for start in range(0, ids.shape[0], rows_per_batch):
            with autocast:
                logits = model(ids[start: start + rows_per_batch, :-1])
            out.append(token_logprobs(logits.float() / temperature, labels[start: start + rows_per_batch]))
    return torch.cat(out)


def make_grpo_loss(loss_type: str, epsilon: float, epsilon_high: float, beta: float, loss_agg: str,
                   temperature: float, max_gen_len: int, aux_loss_coef: float = 0.0):
    """The stage's loss_fn(model, batch, totals). Metrics carry TRL's names where it has one; per-rollout
    ones (reward, lengths) are row means over the step, token ones (kl, clipping) token means.
    `grpo_loss.kls` keeps each micro-batch's (KL sum, token count) for the end-of-run report."""

    def grpo_loss(model, batch, totals):
        ids, loss_mask = batch["ids"], batch["loss_mask"]
        labels = ids[:, 1:].masked_fill(~loss_mask[:, 1:], IGNORE_INDEX)
        mask = loss_mask[:, 1:].float()
        logits, aux = model(ids[:, :-1], return_aux=True)
        logps = token_logprobs(logits.float() / temperature, labels)
        old_logps = batch["old_logps"] if "old_logps" in batch else logps.detach()
        advantages = batch["advantages"].unsqueeze(1)
        per_token, clipped = policy_loss(logps, old_logps, advantages, loss_type, epsilon, epsilon_high)
        if beta > 0:
            kl = k3_kl(logps, batch["ref_logps"])
            per_token = per_token + beta * kl
        loss = aggregate(per_token, mask, loss_agg, totals, max_gen_len)

        rows, tokens = totals["n_rows"], totals["n_targets"]
        metrics = {name.replace("part/", "rewards/") + "/mean": batch[name].sum() / rows
                   for name in batch if name.startswith("part/")}
        metrics.update({name[len("stat/"):]: batch[name].sum() / rows for name in batch if name.startswith("stat/")})
        metrics.update({"reward": batch["reward"].sum() / rows, "reward_std": batch["reward_std"].sum() / rows,
                        "frac_reward_zero_std": (batch["reward_std"] == 0).float().sum() / rows,
                        "advantages_std": batch["advantages_std"].sum() / rows,
                        "completions/mean_length": mask.sum() / rows,
                        "completions/finished_ratio": batch["finished"].float().sum() / rows,
                        "clip_ratio" if loss_type == "grpo" else "cispo_clip_ratio": (clipped * mask).sum() / tokens})
        if beta > 0:
            metrics["kl"] = (kl.detach() * mask).sum() / tokens
            grpo_loss.kls.append(((kl.detach() * mask).sum(), mask.sum()))
        if aux_loss_coef > 0:
            loss = loss + aux_loss_coef * aux / totals["micro_batches"]
            metrics["aux_loss"] = aux.detach() / totals["micro_batches"]
        return loss, {k: v.detach() for k, v in metrics.items()}
    grpo_loss.kls = []
    return grpo_loss


# -- experience ----------------------------------------------------------------------------------------
def rollout_seed(seed: int, step: int, rank: int) -> int:
    """The sampling seed of one step on one rank: a function of (seed, step, rank) only, so a resumed run
    samples exactly what the uninterrupted one did (the global torch RNG is also drawn by each new
    DataLoader iterator, at different points in the two runs)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> 1)


def pick_groups(informative: list[bool], wanted: int) -> list[int]:
    """DAPO's dynamic sampling: of the candidate groups (in sampling order), the first `wanted` informative
    ones (rewards not all equal); if there are fewer, the earliest uninformative ones fill the rest, so every
    step trains on the same number of rows. -> the kept candidates' positions, in sampling order."""
    good = [i for i, ok in enumerate(informative) if ok][:wanted]
    fill = [i for i, ok in enumerate(informative) if not ok][:wanted - len(good)]
    return sorted(good + fill)


def merge_rollouts(parts: list, pad_id: int):
    """One Rollouts of the rows of several (each right-padded to its own width), in order."""
    width = max(r.ids.shape[1] for r in parts)
    ids = torch.cat([torch.nn.functional.pad(r.ids, (0, width - r.ids.shape[1]), value=pad_id) for r in parts])
    mask = torch.cat([torch.nn.functional.pad(r.loss_mask, (0, width - r.ids.shape[1])) for r in parts])
    return Rollouts(ids, mask, torch.cat([r.prompt_index for r in parts]),
                    [c for r in parts for c in r.completions], torch.cat([r.finished for r in parts]),
                    [n for r in parts for n in r.lengths])


def select_rows(rollouts, rows: list[int]):
    """The Rollouts of `rows` only, trimmed to their longest row."""
    index = torch.tensor(rows, device=rollouts.ids.device)
    width = max(rollouts.lengths[r] for r in rows)
    return Rollouts(rollouts.ids.index_select(0, index)[:, :width], rollouts.loss_mask.index_select(0, index)[:, :width],
                    rollouts.prompt_index.index_select(0, index), [rollouts.completions[r] for r in rows],
                    rollouts.finished.index_select(0, index), [rollouts.lengths[r] for r in rows])


def make_rollout(dataset, tokenizer, reward_fn, params: SamplingParams, num_generations: int, rows_per_batch: int,
                 num_iterations: int, scale_rewards: str, reference, autocast, seed_fn, show=None,
                 dynamic_sampling: int = 0):
    """-> rollout(model, micro_batches): the trainer's hook. Samples the step's completions, scores them,
    computes advantages and the reference's (and, for several updates, the sampling policy's) log-probs,
    and yields the same micro-batches of experience `num_iterations` times, one list per update.
    `reference(ids, loss_mask)` -> reference log-probs, or None (beta 0); `seed_fn()` -> this step's seed;
    `show(rollouts, rewards)`, if given, sees every step's rollouts (--debug_mode).
    `dynamic_sampling` > 0 (DAPO): groups whose rewards all agree carry no signal, so up to that many more
    rounds of as many prompts, drawn from the whole dataset with the step's generator, are sampled while
    the step lacks informative groups; the step keeps its first informative groups (pick_groups), as many
    as it had prompts. `dynamic/frac_dropped` logs the share of sampled groups left out.
    `rollout.rewards` keeps each step's mean reward on its own prompts (this rank, before any filter)."""

    def sample_scored(model, index, generator):
        rollouts = sample_rollouts(model, [dataset.prompts[i] for i in index], num_generations, params,
                                   tokenizer.pad_id, generator)
        rewards, parts = reward_fn([dataset.rows[i] for i in index for _ in range(num_generations)], rollouts)
        return rollouts, rewards, parts

    def rollout(model, micro_batches):
        index = [i for batch in micro_batches for i in batch["index"].tolist()]
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed_fn())
        rollouts, rewards, parts = sample_scored(model, index, generator)
        rollout.rewards.append(rewards.mean().item())
        stats = {}
        if dynamic_sampling > 0:
            stats["dynamic/reward_unfiltered"] = rewards.mean()  # the step's own prompts, before the filter
            rounds = [(rollouts, rewards, parts)]

            def informative():
                return [bool((g != g[0]).any()) for _, r, _ in rounds for g in r.view(-1, num_generations)]
            while sum(informative()) < len(index) and len(rounds) <= dynamic_sampling:
                extra = torch.randint(len(dataset), (len(index),), generator=generator, device=device).tolist()
                rounds.append(sample_scored(model, extra, generator))
            flags = informative()
            keep = pick_groups(flags, len(index))
            rows = [g * num_generations + k for g in keep for k in range(num_generations)]
            rollouts = select_rows(merge_rollouts([r for r, _, _ in rounds], tokenizer.pad_id), rows)
            rewards = torch.cat([r for _, r, _ in rounds])[rows]
            parts = {name: torch.cat([p[name] for _, _, p in rounds])[rows] for name in parts}
            stats["dynamic/frac_dropped"] = torch.tensor(1 - len(keep) / len(flags))
            stats["dynamic/rounds"] = torch.tensor(float(len(rounds)))
        advantages, group_std = group_advantages(rewards, num_generations, scale_rewards)
        if show is not None:
            show(rollouts, rewards)

        experience = {"ids": rollouts.ids, "loss_mask": rollouts.loss_mask, "advantages": advantages,
                      "reward": rewards, "reward_std": group_std, "finished": rollouts.finished,
                      # one number per step (this rank), carried per row so it sums like the rest
                      "advantages_std": advantages.std().expand_as(advantages) if len(advantages) > 1
                      else torch.zeros_like(advantages),
                      **{f"part/{name}": value for name, value in parts.items()},
                      **{f"stat/{name}": value.to(advantages).expand_as(advantages) for name, value in stats.items()}}
        if reference is not None:
            experience["ref_logps"] = reference(rollouts.ids, rollouts.loss_mask)
        if num_iterations > 1:  # π_old: the policy that sampled, fixed before the first update
            with eval_mode(model):
                experience["old_logps"] = completion_logprobs(model, rollouts.ids, rollouts.loss_mask,
                                                              params.temperature, rows_per_batch, autocast)
        batches = experience_batches(experience, rollouts.lengths, rows_per_batch)
        for _ in range(num_iterations):
            yield batches
    rollout.rewards = []
    return rollout


def main(argv=None):
    stage, args = prepare_stage(__doc__, STAGE_DEFAULTS, argv, extra_args=add_grpo_args)
    cfg, device = stage.cfg, stage.dist.device
    if args.rollout_engine != "torch":
        raise UserError("--rollout_engine sglang is MiniMind's external server; minillm samples rollouts with its own "
                        "batched KV-cache engine: drop the flag or pass --rollout_engine torch")
    epsilon_high = args.epsilon_high if args.epsilon_high >= 0 else (5.0 if args.loss_type == "cispo" else args.epsilon)
    if args.num_generations < 2:
        raise UserError(f"--num_generations {args.num_generations}: GRPO compares completions of one prompt, "
                        f"use 2 or more")
    if args.max_gen_len < 1 or args.num_iterations < 1:
        raise UserError("--max_gen_len and --num_iterations must be >= 1")
    if args.dynamic_sampling < 0:
        raise UserError(f"--dynamic_sampling {args.dynamic_sampling}: the number of extra sampling rounds, 0 (off) or more")
    max_prompts = resolve_max_prompts(args.max_prompts, stage.on_demo_data,
                                      cfg.batch_size * cfg.accumulation_steps * stage.dist.world_size)
    if not 0 < args.epsilon < 1 or (args.loss_type == "grpo" and epsilon_high <= 0):
        raise UserError(f"--epsilon {args.epsilon} must be in (0, 1) and --epsilon_high {epsilon_high} > 0")
    if args.loss_type == "cispo" and epsilon_high < 1:
        raise UserError(f"--epsilon_high {epsilon_high} caps CISPO's importance weight: below 1 it would shrink "
                        f"every on-policy update; use a value >= 1 (MiniMind: 5.0)")
    if args.temperature <= 0:
        raise UserError(f"--temperature {args.temperature}: rollouts must sample, use a value > 0")
    room = stage.model_cfg.max_position_embeddings
    if cfg.max_seq_len + args.max_gen_len > room:
        raise UserError(f"--max_seq_len {cfg.max_seq_len} (prompt) + --max_gen_len {args.max_gen_len} exceeds the "
                        f"model's {room} positions; lower one of them")
    model = stage.model.to(device)
    autocast = autocast_context(training_dtype(cfg.dtype, device), device)  # as the trainer's steps

    # rewards
    spec = args.rewards if args.rewards != "auto" else (MODEL_DEFAULT if args.reward_model_path else RULE_DEFAULT)
    reward_model = None
    if args.reward_model_path:
        from minillm.reward import load_reward_model
        reward_model = load_reward_model(args.reward_model_path, device)
    reward_fn = make_reward_fn(spec, stage.tokenizer, reward_model)

    # data: prompts, each step's batch_size x accumulation_steps of them per rank
    dataset, _ = load_datasets(stage, lambda path: PromptDataset(
        path, stage.tokenizer, cfg.max_seq_len, skip_bad=bool(cfg.skip_bad_lines),
        thinking_ratio=args.thinking_ratio, seed=cfg.seed))
    dataset.keep_first(max_prompts)
    stage.stage_args["max_prompts"] = max_prompts  # config.yaml records the count used (auto resolved)
    sampler = ShardedBatchSampler(len(dataset), cfg.batch_size, stage.dist.rank, stage.dist.world_size,
                                  cfg.accumulation_steps, seed=cfg.seed)
    if stage.dist.is_main:
        print(f"model: {model.num_params() / 1e6:.2f}M parameters from {cfg.init_from}; data: {dataset.describe()}; "
              f"rewards: {spec}; {args.loss_type} loss, {args.loss_agg} aggregation, epsilon {args.epsilon}/"
              f"{epsilon_high}, beta {args.beta}, {args.num_generations} generations per prompt")

    # before training: held-out facts, and the reward on the first training prompts
    report_path = DEMO_REPORT if args.report_path == "auto" and stage.on_demo_data else \
        ("" if args.report_path == "auto" else args.report_path)
    report_rows = read_heldout(report_path) if report_path and stage.dist.is_main else []
    before = heldout_accuracy(model, stage.tokenizer, report_rows) if report_rows else None
    params = SamplingParams(max_new_tokens=args.max_gen_len, temperature=args.temperature, top_p=args.top_p,
                            stop_ids=stage.tokenizer.stop_ids)
    greedy = SamplingParams(max_new_tokens=args.max_gen_len, temperature=0.0, stop_ids=stage.tokenizer.stop_ids)
    n_report = args.report_prompts if stage.dist.is_main else 0

    def report_rewards():  # what RL optimises (sampled, as the rollouts) and what a user sees (greedy)
        return (prompt_reward(model, dataset, stage.tokenizer, reward_fn, n_report, params, args.num_generations),
                prompt_reward(model, dataset, stage.tokenizer, reward_fn, n_report, greedy, 1))
    rewards_before = report_rewards() if n_report else None

    # the reference: a frozen copy, or the policy with its adapters off; none without a KL term
    lora_params, ref_model = None, None
    rows_per_batch = cfg.batch_size * args.num_generations
    if args.use_lora:
        lora_params = apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets,
                                 bool(args.use_rslora))
    elif args.beta > 0:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)

    def reference(ids, loss_mask):
        if ref_model is not None:
            return completion_logprobs(ref_model, ids, loss_mask, args.temperature, rows_per_batch, autocast)
        with lora_disabled(model), eval_mode(model):
            return completion_logprobs(model, ids, loss_mask, args.temperature, rows_per_batch, autocast)

    trainer = Trainer(stage, dataset, sampler, prompt_collate, params=lora_params, save_adapter=bool(args.use_lora))

    def show(rollouts, rewards):  # --debug_mode: the step's first prompt, its completions and rewards
        if not (args.debug_mode and stage.dist.is_main and (trainer.step + 1) % max(1, args.debug_interval) == 0):
            return
        tok, cut = stage.tokenizer, rollouts.lengths[0] - len(rollouts.completions[0])
        print(f"[debug] step {trainer.step + 1} prompt: {tok.decode(rollouts.ids[0, :cut].tolist())!r}")
        for g in range(args.num_generations):
            print(f"[debug]   reward {rewards[g].item():+.3f}: {tok.decode(rollouts.completions[g])!r}")

    rollout = make_rollout(dataset, stage.tokenizer, reward_fn, params, args.num_generations, rows_per_batch,
                           args.num_iterations, args.scale_rewards, reference if args.beta > 0 else None, autocast,
                           seed_fn=lambda: rollout_seed(cfg.seed, trainer.step, stage.dist.rank), show=show,
                           dynamic_sampling=args.dynamic_sampling)
    loss_fn = make_grpo_loss(args.loss_type, args.epsilon, epsilon_high, args.beta, args.loss_agg, args.temperature,
                             args.max_gen_len, stage.model_cfg.aux_loss_coef if stage.model_cfg.use_moe else 0.0)
    trainer.fit(loss_fn, rollout=rollout)

    if getattr(reward_fn, "missing_answers", 0):
        trainer.log(f"note: {reward_fn.missing_answers} rollouts came from rows without an \"answer\" field; the answer "
                    f"reward gave them 0")
    if rewards_before is not None:
        rewards_after = report_rewards()
        trainer.reward_report = (rewards_before, rewards_after)
        for name, before_, after_ in zip((f"sampled ({args.num_generations} per prompt)", "greedy"), rewards_before,
                                         rewards_after):
            trainer.log(f"reward on the first {min(n_report, len(dataset))} training prompts, {name}: {before_[0]:.3f} -> "
                        f"{after_[0]:.3f} (" + ", ".join(f"{k} {before_[1][k]:.3f} -> {after_[1][k]:.3f}" for k in after_[1])
                        + ")")
    if rollout.rewards and stage.dist.is_main:  # the trend of what the rollouts scored, and their KL
        k = max(1, len(rollout.rewards) // 10)
        line = (f"rollout reward (the steps' own prompts, before any filter): {np.mean(rollout.rewards[:k]):.3f} over "
                f"the first {k} steps -> {np.mean(rollout.rewards[-k:]):.3f} over the last {k}")
        if loss_fn.kls:
            kls = [(s / n.clamp(min=1)).item() for s, n in loss_fn.kls]
            m = max(1, len(kls) // 10)
            line += f"; KL to the reference per token {np.mean(kls[-m:]):.3f} over the last {m} updates (max {max(kls):.3f})"
        trainer.log(line)
    if before is not None:
        after = heldout_accuracy(model, stage.tokenizer, report_rows)
        trainer.heldout_report = (before, after)
        trainer.log(f"held-out facts ({report_path}): {before.summary()} -> {after.summary()}")
    trainer.log(f"done: checkpoint in {trainer.run_dir}")
    return trainer


if __name__ == "__main__":
    main_guard(main)
