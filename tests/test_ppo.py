"""train_ppo.py: GAE, KL reward shaping, the clipped losses, the adaptive KL controller and the early stop
against hand computations and TRL's formulas; a short run whose reward rises; exact resume; the saved
policy is a normal checkpoint."""
import copy
import json
import types

import numpy as np
import pytest
import torch
import yaml

import train_ppo
from minillm.checkpoint import load_checkpoint, load_trainer_state, save_checkpoint
from minillm.config import ModelConfig
from minillm.data.chat import IGNORE_INDEX
from minillm.errors import UserError
from minillm.model import MiniLLM
from minillm.rl import token_logprobs, whiten
from minillm.tokenizer import Tokenizer
from minillm.trainer import Trainer
from minillm.value import PolicyAndValue, ValueModel


def tiny_model(seed=0, vocab_size=512):
    torch.manual_seed(seed)
    return MiniLLM(ModelConfig.preset("debug", vocab_size=vocab_size, kernel_backend="torch"))


def layout(lengths_prompt, lengths_completion, T):
    """A [N, T] completion mask over label positions: row r's completion targets sit at label indices
    prompt-1 .. prompt+completion-2 (the label at t is the token at t+1)."""
    mask = torch.zeros(len(lengths_prompt), T, dtype=torch.bool)
    for r, (p, c) in enumerate(zip(lengths_prompt, lengths_completion)):
        mask[r, p - 1: p - 1 + c] = True
    return mask


# -- GAE ----------------------------------------------------------------------------------------------
def gae_plain(rewards, values, gamma, lam):
    """One completion's GAE by the definition: A_t = sum_l (gamma*lam)^l delta_{t+l}, V after the end = 0."""
    n = len(rewards)
    v = list(values) + [0.0]
    deltas = [rewards[t] + gamma * v[t + 1] - v[t] for t in range(n)]
    return [sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, n)) for t in range(n)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_the_definition_row_by_row(gamma, lam):
    torch.manual_seed(0)
    prompts, completions, T = [3, 5, 2, 4], [4, 1, 7, 3], 12
    mask = layout(prompts, completions, T)
    rewards, values = torch.randn(4, T, dtype=torch.float64), torch.randn(4, T, dtype=torch.float64)
    advantages, returns = train_ppo.gae(rewards, values, mask, gamma, lam)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        span = slice(p - 1, p - 1 + c)
        expect = gae_plain(rewards[r, span].tolist(), values[r, span].tolist(), gamma, lam)
        np.testing.assert_allclose(advantages[r, span].numpy(), expect, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(returns[r, span].numpy(), np.array(expect) + values[r, span].numpy(), atol=1e-12)
    assert not advantages[~mask].any() and not returns[~mask].any()  # prompt and padding stay 0


def test_gae_matches_trl_on_its_response_layout():
    """TRL's PPOTrainer loop, copied on response-only tensors (completions from column 0, values 0 past
    the end), gives the same advantages and returns as ours on the same completions."""
    torch.manual_seed(1)
    gamma, lam = 1.0, 0.95
    completions, R = [5, 2, 8], 8
    rewards, values = torch.randn(3, R), torch.randn(3, R)
    padding = torch.arange(R).repeat(3, 1) >= torch.tensor(completions).unsqueeze(1)
    rewards, values = rewards.masked_fill(padding, 0), values.masked_fill(padding, 0)
    lastgaelam, reversed_ = 0, []
    for t in reversed(range(R)):  # TRL: trl/experimental/ppo/ppo_trainer.py, "compute advantages and returns"
        nextvalues = values[:, t + 1] if t < R - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_.append(lastgaelam)
    trl_adv = torch.stack(reversed_[::-1], axis=1)
    trl_ret = trl_adv + values
    ours, our_ret = train_ppo.gae(rewards, values, ~padding, gamma, lam)
    torch.testing.assert_close(ours, trl_adv.masked_fill(padding, 0))
    torch.testing.assert_close(our_ret, trl_ret.masked_fill(padding, 0))


def test_whitening_is_trls_masked_whiten():
    """TRL's masked_whiten (trl.core, later trl.experimental.ppo; TRL 1.x ships no PPO any more, so the
    formula is written out): mean and Bessel-corrected variance over the masked entries only."""
    torch.manual_seed(2)
    x, mask = torch.randn(4, 9, dtype=torch.float64), torch.rand(4, 9) > 0.3
    vals = x[mask].numpy()
    mean, var = vals.mean(), vals.var(ddof=1)  # TRL: masked_var with Bessel's correction
    expect = (x.numpy() - mean) / np.sqrt(var + 1e-8)
    np.testing.assert_allclose(whiten(x, mask).numpy()[mask.numpy()], expect[mask.numpy()], rtol=1e-10)
    np.testing.assert_allclose(whiten(x, mask, shift_mean=False).numpy()[mask.numpy()],
                               expect[mask.numpy()] + mean, rtol=1e-10)
    try:  # a TRL that still has PPO: its own function too
        from trl.experimental.ppo.ppo_trainer import masked_whiten
    except ImportError:
        return
    torch.testing.assert_close(whiten(x, mask), masked_whiten(x, mask))
    torch.testing.assert_close(whiten(x, mask, shift_mean=False), masked_whiten(x, mask, shift_mean=False))


# -- rewards: per-token KL, the score on the last token ------------------------------------------------
def test_kl_estimators_and_shaped_rewards_by_hand():
    logp, ref = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.5, -1.0, -0.5]])
    k1 = train_ppo.kl_penalty(logp, ref, "k1")
    torch.testing.assert_close(k1, torch.tensor([[0.5, -1.0, 0.0]]))
    k3 = train_ppo.kl_penalty(logp, ref, "k3")  # e^(ref-logp) - 1 - (ref-logp)
    torch.testing.assert_close(k3, torch.tensor([[np.exp(-0.5) - 1 + 0.5, np.exp(1.0) - 1 - 1.0, 0.0]],
                                                dtype=torch.float32))
    kl = torch.tensor([[0.5, -1.0, 0.0, 0.0], [0.2, 0.1, 0.3, 0.0]])
    rewards, non_score = train_ppo.shaped_rewards(kl, torch.tensor([2.0, -1.0]), torch.tensor([1, 2]), 0.1)
    torch.testing.assert_close(non_score, -0.1 * kl)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1 + 2.0, 0.0, 0.0], [-0.02, -0.01, -0.03 - 1.0, 0.0]]))


def rollout_args(**over):
    args = dict(max_gen_len=6, temperature=1.0, missing_eos_penalty=0.0, kl_estimator="k1", whiten_rewards=0,
                gamma=1.0, lam=0.95, kl_target=0.0, kl_horizon=10000, mini_batch_size=0, ppo_update_iters=1,
                early_stop_kl=0.0)
    args.update(over)
    return types.SimpleNamespace(**args)


def length_score(rows, ro):
    """A toy reward every test can recompute from a batch: a tenth of the completion's length."""
    return torch.tensor([len(c) / 10 for c in ro.completions]), {}


def one_update(model, reference, args, n_prompts=4, reward_fn=length_score):
    tok = types.SimpleNamespace(stop_ids=[], pad_id=0)
    prompts = [[5 + i, 9, 11 + 2 * i][: 1 + i % 3] for i in range(n_prompts)]
    micro = [{"prompts": prompts, "index": torch.arange(n_prompts)}]
    kl_box = {}
    rollout = train_ppo.make_ppo_rollout([{}] * n_prompts, tok, reward_fn, reference, args, lambda: 7,
                                         n_prompts, torch.autocast("cpu", enabled=False), kl_box)
    updates = list(rollout(model, micro))
    return updates, rollout


def test_score_lands_on_the_last_completion_token_and_kl_on_every_token():
    policy = tiny_model(0)
    ref = copy.deepcopy(policy)
    with torch.no_grad():  # a reference that differs from the policy
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = PolicyAndValue(policy, ValueModel.from_policy(policy), kl_coef=0.3)  # zero value head: V = 0
    # gamma 1, lambda 0: the returns are the per-token rewards themselves
    updates, rollout = one_update(model, ref, rollout_args(lam=0.0))
    (batch,), = updates
    mask = batch["loss_mask"][:, 1:]
    labels = batch["ids"][:, 1:].masked_fill(~mask, IGNORE_INDEX)
    with torch.no_grad():
        ref_logps = token_logprobs(ref(batch["ids"])[:, :-1], labels)
        logps = token_logprobs(policy(batch["ids"])[:, :-1], labels)
    torch.testing.assert_close(batch["old_logprobs"], logps)
    expect = -0.3 * (logps - ref_logps) * mask
    for r in range(len(mask)):
        last = int(mask[r].nonzero().max())
        expect[r, last] += mask[r].sum() / 10  # the score, on the last completion token only
    torch.testing.assert_close(batch["returns"], expect)
    assert not batch["old_values"].any()
    stats = batch["stats"]
    torch.testing.assert_close(stats["objective/kl"], ((logps - ref_logps) * mask).sum(1).mean())
    torch.testing.assert_close(stats["objective/rlhf_reward"],
                               stats["objective/scores"] + stats["objective/non_score_reward"])


# -- the losses ----------------------------------------------------------------------------------------
def test_clipped_policy_loss_by_hand():
    eps = 0.2
    ratio = torch.tensor([1.1, 1.5, 0.5, 1.5, 0.5, 0.9])
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -2.0])
    old = torch.zeros(6)
    loss, clipped, r = train_ppo.clipped_policy_loss(ratio.log(), old, adv, eps)
    # A > 0: -A*min(ratio, 1.2) (a ratio below 1 - eps is not clipped); A < 0: -A*max(ratio, 0.8)
    expect = torch.tensor([-1.1, -1.2, -0.5, 1.5, 0.8, 1.8])
    torch.testing.assert_close(loss, expect)
    assert clipped.tolist() == [False, True, False, False, True, False]
    torch.testing.assert_close(r, ratio)
    # the gradient: none where the clipped term wins
    logp = ratio.log().requires_grad_()
    train_ppo.clipped_policy_loss(logp, old, adv, eps)[0].sum().backward()
    torch.testing.assert_close(logp.grad, torch.where(clipped, 0.0, -adv * ratio))


def test_clipped_value_loss_by_hand():
    old = torch.tensor([0.0, 0.0, 0.0, 1.0])
    new = torch.tensor([0.1, 0.5, -0.5, 1.0])
    ret = torch.tensor([1.0, 1.0, -1.0, 0.0])
    loss, clipped = train_ppo.clipped_value_loss(new, old, ret, 0.2)
    # clip(new, old ± 0.2): 0.1, 0.2, -0.2, 1.0 -> squared errors vs unclipped
    expect = 0.5 * torch.tensor([max(0.81, 0.81), max(0.25, 0.64), max(0.25, 0.64), max(1.0, 1.0)])
    torch.testing.assert_close(loss, expect)
    assert clipped.tolist() == [False, True, True, False]
    moved_away = torch.tensor([0.0, 0.5, 0.0, 0.0])  # a value moved past the clip *towards* the return
    loss2, clipped2 = train_ppo.clipped_value_loss(moved_away, old, torch.tensor([1.0, 0.6, 0.0, 0.0]), 0.2)
    assert loss2[1].item() == pytest.approx(0.5 * 0.16) and clipped2[1]  # (0.2 - 0.6)^2 > (0.5 - 0.6)^2


def test_loss_fn_is_exact_across_micro_batches():
    """The step's loss is the same whether its rows are one micro-batch or several (shares over totals)."""
    policy = tiny_model(3)
    model = PolicyAndValue(policy, ValueModel.from_policy(policy))
    with torch.no_grad():
        model.value_model.value_head.weight.normal_()
    updates, _ = one_update(model, copy.deepcopy(policy), rollout_args(), n_prompts=6)
    (whole,), = updates
    from minillm.rl import experience_batches
    keys = ["ids", "loss_mask", "old_logprobs", "old_values", "returns", "advantages"]
    lengths = [int(whole["loss_mask"][r].nonzero().max()) + 1 for r in range(6)]
    parts = experience_batches({k: whole[k] for k in keys}, lengths, 2)
    kl_box = {"approxkl": torch.zeros(())}
    loss_fn = train_ppo.make_ppo_loss(0.2, 0.2, 0.5, 1.0, kl_box)

    def run(batches):
        totals = {"n_targets": float(sum(b["n_targets"] for b in batches)), "micro_batches": float(len(batches))}
        total = 0.0
        for b in batches:
            b["stats"] = {}
            total = total + loss_fn(model, b, totals)[0]
        return total
    whole_batch = experience_batches({k: whole[k] for k in keys}, lengths, 6)
    torch.testing.assert_close(run(parts), run(whole_batch))


# -- KL control and early stop ---------------------------------------------------------------------------
def test_adaptive_kl_controller_follows_its_formula():
    # TRL / Ziegler et al.: coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon
    assert train_ppo.adaptive_kl_coef(0.2, 6.6, 6.0, 100, 10000) == pytest.approx(0.2 * (1 + 0.1 * 100 / 10000))
    assert train_ppo.adaptive_kl_coef(0.2, 30.0, 6.0, 100, 10000) == pytest.approx(0.2 * (1 + 0.2 * 0.01))
    assert train_ppo.adaptive_kl_coef(0.2, 0.0, 6.0, 500, 1000) == pytest.approx(0.2 * (1 - 0.2 * 0.5))
    assert train_ppo.adaptive_kl_coef(0.2, 6.0, 6.0, 500, 1000) == pytest.approx(0.2)


def test_adaptive_coefficient_moves_with_the_rollouts_kl():
    policy = tiny_model(4)
    ref = tiny_model(5)  # far from the policy: KL well above the target
    model = PolicyAndValue(policy, ValueModel.from_policy(policy), kl_coef=0.1)
    _, _ = one_update(model, ref, rollout_args(kl_target=1e-3, kl_horizon=8))
    assert float(model.kl_coef) == pytest.approx(0.1 * (1 + 0.2 * 4 / 8))


def test_early_stop_ends_the_step_once_approxkl_passes_the_target():
    policy = tiny_model(6)
    args = rollout_args(ppo_update_iters=3, mini_batch_size=2, early_stop_kl=0.1)
    tok = types.SimpleNamespace(stop_ids=[], pad_id=0)
    kl_box = {}

    def run(kls):
        model = PolicyAndValue(policy, ValueModel.from_policy(policy))
        rollout = train_ppo.make_ppo_rollout([{}] * 4, tok, length_score, copy.deepcopy(policy), args, lambda: 1, 4,
                                             torch.autocast("cpu", enabled=False), kl_box)
        n = 0
        for _ in rollout(model, [{"prompts": [[5], [6, 7], [8], [9]], "index": torch.arange(4)}]):
            kl_box["approxkl"] = kl_box["approxkl"] + kls[n]  # what the loss measured in this update
            n += 1
        return n, rollout.early_stops
    assert run([0.0] * 6) == (6, 0)  # 3 epochs x 2 mini-batches
    assert run([0.01, 0.05, 0.2, 0.0, 0.0, 0.0]) == (3, 1)  # stops right after the update that passed 0.1


# -- the script --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    tok = Tokenizer.load()
    save_checkpoint(root / "sft", tiny_model(0, vocab_size=tok.vocab_size), tok)
    rows = [{"conversations": [{"role": "user", "content": f"What is {a} + {b}?"},
                               {"role": "assistant", "content": ""}], "answer": str(a + b)}
            for a, b in zip(range(1, 33), range(40, 8, -1))]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


def _argv(root, *extra):
    return ["--init_from", str(root / "sft"), "--data_path", str(root / "prompts.jsonl"), "--save_dir",
            str(root / "out"), "--batch_size", "8", "--device", "cpu", "--use_tensorboard", "0", "--use_compile", "0",
            "--max_gen_len", "8", "--report_path", "", "--report_prompts", "0", "--log_interval", "1",
            # the demo's warm-ups off and its old temperature: the tests' toy runs are a few steps long
            "--value_warmup_steps", "0", "--warmup_steps", "0", "--temperature", "0.8", *extra]


def low_ids(rows, ro):
    """Toy reward: the share of completion tokens with an id below 1024."""
    return torch.tensor([float(np.mean([t < 1024 for t in c])) for c in ro.completions]), {}


def test_short_run_raises_a_toy_reward(sft_checkpoint):
    # a random policy earns ~0.5; 8 rollouts of 16 prompts x 4 tokens take it to ~0.85
    trainer = train_ppo.main(_argv(sft_checkpoint, "--save_weight", "rise", "--epochs", "4", "--batch_size", "16",
                                   "--mini_batch_size", "16", "--max_gen_len", "4", "--learning_rate", "3e-2",
                                   "--kl_coef", "0.0", "--ppo_update_iters", "4"), reward_fn=low_ids)
    scores = trainer.rollout_scores
    assert len(scores) == 8
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.2, scores


def test_resume_mid_run_equals_the_uninterrupted_run_and_saves_a_normal_policy(sft_checkpoint, monkeypatch):
    common = ("--max_steps", "4", "--save_interval", "2", "--kl_target", "0.5", "--kl_horizon", "50",
              "--learning_rate", "1e-3")
    whole = train_ppo.main(_argv(sft_checkpoint, "--save_weight", "whole", *common), reward_fn=low_ids)

    class Crash(Exception):
        pass

    original_save = Trainer.save

    def save_then_crash(self):
        original_save(self)
        if self.step == 2:
            raise Crash

    monkeypatch.setattr(Trainer, "save", save_then_crash)
    with pytest.raises(Crash):
        train_ppo.main(_argv(sft_checkpoint, "--save_weight", "cut", *common), reward_fn=low_ids)
    monkeypatch.setattr(Trainer, "save", original_save)
    resumed = train_ppo.main(_argv(sft_checkpoint, "--save_weight", "cut", "--from_resume", "1", *common),
                             reward_fn=low_ids)
    assert resumed.rollout_scores == whole.rollout_scores[2:]  # the same completions were sampled
    assert resumed.history == whole.history[2:]
    out = sft_checkpoint / "out"
    a, _ = load_checkpoint(out / "whole", with_tokenizer=False)
    b, _ = load_checkpoint(out / "cut", with_tokenizer=False)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    critic_a, critic_b = (load_trainer_state(out / n)["other_tensors"] for n in ("whole", "cut"))
    assert set(critic_a) == set(critic_b) and any(k.startswith("value_model.") for k in critic_a)
    assert "kl_coef" in critic_a and float(critic_a["kl_coef"]) != 0.02  # the controller moved it
    for k in critic_a:
        assert torch.equal(critic_a[k], critic_b[k]), k
    # the saved policy is a normal checkpoint: strict loads (its tensors and nothing else), as eval_model's
    from minillm.cli import load_for_inference
    assert isinstance(a, MiniLLM)
    loaded, tok, _ = load_for_inference(types.SimpleNamespace(checkpoint=str(out / "whole"), device="cpu",
                                                              save_dir="", model_mode=1))
    assert tok is not None and all(torch.equal(p, q) for p, q in zip(a.state_dict().values(),
                                                                      loaded.state_dict().values()))
    start, _ = load_checkpoint(sft_checkpoint / "sft")
    assert any(not torch.equal(p, q) for p, q in zip(a.state_dict().values(), start.state_dict().values()))


def test_bad_flags_are_clear_errors(sft_checkpoint):
    from minillm.errors import UserError
    with pytest.raises(UserError, match="held-out"):
        train_ppo.main(_argv(sft_checkpoint, "--eval_split", "0.1"), reward_fn=low_ids)
    with pytest.raises(UserError, match="--temperature"):
        train_ppo.main(_argv(sft_checkpoint, "--temperature", "0"), reward_fn=low_ids)
    with pytest.raises(UserError, match="--critic_learning_rate 5e-07"):
        train_ppo.main(_argv(sft_checkpoint, "--critic_learning_rate", "5e-7"), reward_fn=low_ids)
    with pytest.raises(UserError, match="unknown reward"):
        train_ppo.main(_argv(sft_checkpoint, "--rewards", "answr"))


def test_max_prompts_trains_on_the_first_prompts_only(sft_checkpoint):
    seen = []

    def recording(rows, ro):
        seen.extend(row["conversations"][0]["content"] for row in rows)
        return low_ids(rows, ro)
    trainer = train_ppo.main(_argv(sft_checkpoint, "--save_weight", "subset", "--max_prompts", "12", "--epochs", "2",
                                   "--batch_size", "4"), reward_fn=recording)
    assert len(trainer.dataset) == 12 and trainer.step == 6  # 12 prompts, 4 a step, 2 epochs
    assert sorted(seen) == sorted([f"What is {a} + {b}?" for a, b in zip(range(1, 13), range(40, 28, -1))] * 2)
    assert "12 prompts (the first of 32)" in trainer.dataset.describe()
    doc = yaml.safe_load((sft_checkpoint / "out" / "subset" / "config.yaml").read_text())
    assert doc["stage"]["max_prompts"] == 12
    with pytest.raises(UserError, match="--max_prompts"):
        train_ppo.main(_argv(sft_checkpoint, "--save_weight", "subset", "--max_prompts", "-2"), reward_fn=low_ids)
    with pytest.raises(UserError, match=r"--max_prompts 6 is fewer than one optimizer step takes \(8 = "):
        train_ppo.main(_argv(sft_checkpoint, "--save_weight", "subset", "--max_prompts", "6"), reward_fn=low_ids)


def test_max_prompts_auto_is_the_demo_prompts_on_the_demo_data_at_least_one_step():
    from minillm.rl import DEMO_PROMPTS, resolve_max_prompts
    assert resolve_max_prompts(-1, True, 32) == DEMO_PROMPTS == 64
    assert resolve_max_prompts(-1, True, 96) == 96  # 3 processes x 32: one step's prompts, not a 'too few rows'
    assert resolve_max_prompts(-1, False, 32) == 0 and resolve_max_prompts(0, True, 32) == 0
    assert resolve_max_prompts(40, True, 32) == 40


def test_lora_policy_saves_the_adapter_and_keeps_the_base(sft_checkpoint):
    trainer = train_ppo.main(_argv(sft_checkpoint, "--save_weight", "lora", "--max_steps", "1", "--use_lora", "1",
                                   "--learning_rate", "1e-2"), reward_fn=low_ids)
    folder = sft_checkpoint / "out" / "lora"
    assert (folder / "adapter.safetensors").is_file() and not (folder / "model.safetensors").exists()
    others = load_trainer_state(folder)["other_tensors"]
    assert any(k.startswith("value_model.") for k in others) and not any(k.startswith("policy.") for k in others)
    start, _ = load_checkpoint(sft_checkpoint / "sft")
    base = {k: v for k, v in trainer.model.policy.state_dict().items() if "lora_" not in k}
    for name, value in start.state_dict().items():  # the reference (adapter off) is the starting model
        assert torch.equal(base[name], value), name


def test_critic_from_a_reward_model_values_the_last_token_as_its_score():
    from minillm.reward import RewardModel
    rm = RewardModel(ModelConfig.preset("debug", vocab_size=512, kernel_backend="torch"))
    critic = ValueModel.from_reward_model(rm)
    ids, lengths = torch.randint(0, 512, (3, 9)), torch.tensor([9, 4, 6])
    torch.testing.assert_close(critic(ids)[torch.arange(3), lengths - 1], rm(ids, lengths))
    assert all(p.requires_grad for p in critic.parameters())
    assert not any(p is q for p in critic.parameters() for q in rm.parameters())  # a copy, not shared
    policy = tiny_model(1)
    assert not ValueModel.from_policy(policy)(ids).any()  # zero head: V = 0 at the start


def test_reward_model_run_starts_the_critic_from_it(sft_checkpoint):
    from minillm.reward import RewardModel, save_reward_model
    tok = Tokenizer.load()
    torch.manual_seed(0)
    save_reward_model(sft_checkpoint / "rm", RewardModel(ModelConfig.preset("debug", vocab_size=tok.vocab_size,
                                                                             kernel_backend="torch")), tok)
    trainer = train_ppo.main(_argv(sft_checkpoint, "--save_weight", "rm_run", "--max_steps", "1", "--reward_model_path",
                                   str(sft_checkpoint / "rm"), "--learning_rate", "0"))
    assert len(trainer.rollout_scores) == 1
    from minillm.reward import load_reward_model
    rm = load_reward_model(sft_checkpoint / "rm")
    critic = trainer.model.value_model  # learning rate 0: still the reward model's trunk
    for name, value in rm.model.state_dict().items():
        assert torch.equal(critic.model.state_dict()[name], value), name
    with pytest.raises(Exception, match="--value_init reward needs"):
        train_ppo.main(_argv(sft_checkpoint, "--value_init", "reward"), reward_fn=low_ids)


def test_value_warmup_trains_the_critic_alone(sft_checkpoint):
    trainer = train_ppo.main(_argv(sft_checkpoint, "--save_weight", "warm", "--max_steps", "2",
                                   "--value_warmup_steps", "2", "--learning_rate", "1e-3"), reward_fn=low_ids)
    assert len(trainer.rollout_scores) == 2
    out = sft_checkpoint / "out"
    policy, _ = load_checkpoint(out / "warm", with_tokenizer=False)
    start, _ = load_checkpoint(sft_checkpoint / "sft", with_tokenizer=False)
    for (name, p), q in zip(policy.state_dict().items(), start.state_dict().values()):
        assert torch.equal(p, q), name  # the policy loss was weighted 0: not one weight moved
    critic = load_trainer_state(out / "warm")["other_tensors"]
    assert critic["value_model.value_head.weight"].abs().sum() > 0  # the critic's zero head learned
