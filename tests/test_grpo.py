"""GRPO / CISPO (train_grpo.py): advantages, the k3 KL, the clipped and CISPO objectives and their gradients,
the three aggregations (and their independence of the micro-batch split), TRL's loss on the same tensors,
and the script end to end: two updates per rollout, a toy reward that must rise, an interrupted run that
resumes bit-exactly (rollout sampling included), clear errors for bad rows and flags."""
import collections
import math
import json
import re
import types

import pytest
import torch
from safetensors.torch import load_file

import train_grpo
from minillm.checkpoint import save_checkpoint
from minillm.config import ModelConfig
from minillm.errors import UserError
from minillm.model import MiniLLM
from minillm.tokenizer import Tokenizer


# -- advantages, KL -----------------------------------------------------------------------------------
def test_group_advantages_against_hand_computation():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0,    # mean 0.5, unbiased std sqrt(1/3)
                            0.7, 0.7, 0.7, 0.7,    # all equal: nothing to learn, exactly 0
                            2.0, 0.0, 1.0, 1.0])   # mean 1, std sqrt(2/3)
    adv, std = train_grpo.group_advantages(rewards, 4)
    s1, s3 = (1 / 3) ** 0.5, (2 / 3) ** 0.5
    expect = [0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), 0.5 / (s1 + 1e-4), 0, 0, 0, 0,
              1 / (s3 + 1e-4), -1 / (s3 + 1e-4), 0, 0]
    torch.testing.assert_close(adv, torch.tensor(expect))
    assert adv[4:8].tolist() == [0.0] * 4 and torch.isfinite(adv).all()
    torch.testing.assert_close(std, torch.tensor([s1] * 4 + [0.0] * 4 + [s3] * 4))
    # Dr. GRPO: centred only; batch: one std for all rows
    none, _ = train_grpo.group_advantages(rewards, 4, "none")
    torch.testing.assert_close(none, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 1, -1, 0, 0]))
    batch, _ = train_grpo.group_advantages(rewards, 4, "batch")
    torch.testing.assert_close(batch, none / (rewards.std() + 1e-4))
    # a group of floats that do not average exactly back to themselves still gets exact zeros
    odd, _ = train_grpo.group_advantages(torch.full((3,), 0.1), 3)
    assert odd.tolist() == [0.0, 0.0, 0.0]


def test_k3_kl_matches_the_formula_and_is_never_negative():
    torch.manual_seed(0)
    logps, ref = -torch.rand(200) * 5, -torch.rand(200) * 5
    kl = train_grpo.k3_kl(logps, ref)
    expect = [math.exp(r - p) - (r - p) - 1 for p, r in zip(logps.tolist(), ref.tolist())]
    torch.testing.assert_close(kl, torch.tensor(expect))
    assert (kl >= 0).all() and train_grpo.k3_kl(logps, logps).abs().max() == 0
    # its expectation under π is KL(π‖π_ref): check on a small categorical with exact sums
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.2, 0.6])
    exact = (p * (p / q).log()).sum()
    torch.testing.assert_close((p * train_grpo.k3_kl(p.log(), q.log())).sum(), exact)


# -- the objectives -----------------------------------------------------------------------------------
RATIOS = torch.tensor([[0.5, 0.9, 1.0, 1.1, 1.5]])


@pytest.mark.parametrize("advantage", [2.0, -2.0])
def test_clipped_objective_inside_and_outside_the_range(advantage):
    eps, eps_high = 0.2, 0.28
    old = torch.log(torch.full_like(RATIOS, 0.3))
    logps = (old + RATIOS.log()).requires_grad_()
    adv = torch.tensor([[advantage]])
    loss, clipped = train_grpo.policy_loss(logps, old, adv, "grpo", eps, eps_high)
    expect, grads, flags = [], [], []
    for r in RATIOS[0].tolist():
        c = min(max(r, 1 - eps), 1 + eps_high)
        unclipped_wins = r * advantage <= c * advantage
        expect.append(-min(r * advantage, c * advantage))
        grads.append(-r * advantage if unclipped_wins else 0.0)  # d(-ρA)/dlogp = -ρA; a clipped term is flat
        flags.append((r < 1 - eps and advantage < 0) or (r > 1 + eps_high and advantage > 0))
    torch.testing.assert_close(loss[0], torch.tensor(expect))
    assert clipped[0].tolist() == flags and any(flags)
    loss.sum().backward()
    torch.testing.assert_close(logps.grad[0], torch.tensor(grads))


@pytest.mark.parametrize("advantage", [1.5, -1.5])
def test_cispo_weights_are_clipped_and_carry_no_gradient(advantage):
    eps_high = 1.2
    old = torch.log(torch.full_like(RATIOS, 0.3))
    logps = (old + RATIOS.log()).requires_grad_()
    adv = torch.tensor([[advantage]])
    loss, clipped = train_grpo.policy_loss(logps, old, adv, "cispo", 0.2, eps_high)
    weight = RATIOS.clamp(max=eps_high)
    torch.testing.assert_close(loss, -weight * advantage * logps.detach())
    assert clipped[0].tolist() == [r > eps_high and advantage > 0 for r in RATIOS[0].tolist()]
    loss.sum().backward()
    # the gradient of -sg(w)·A·log π is -w·A·∇log π: the weight itself is not differentiated
    torch.testing.assert_close(logps.grad, -weight * advantage)


def test_on_policy_step_has_ratio_one_but_a_gradient():
    """num_iterations 1: old log-probs are the policy's own, detached; grpo and cispo then agree."""
    torch.manual_seed(1)
    logps = (-torch.rand(3, 4)).requires_grad_()
    adv = torch.tensor([[1.0], [-2.0], [0.5]])
    grads = []
    for loss_type in ("grpo", "cispo"):
        logps.grad = None
        loss, clipped = train_grpo.policy_loss(logps, logps.detach(), adv, loss_type, 0.2, 5.0)
        loss.sum().backward()
        grads.append(logps.grad.clone())
        assert not clipped.any()
    torch.testing.assert_close(grads[0], -adv.expand(3, 4))
    torch.testing.assert_close(grads[1], grads[0])


def test_aggregations_against_hand_sums_and_any_split():
    torch.manual_seed(2)
    per_token = torch.randn(4, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]]).float()
    totals = {"n_rows": 4.0, "n_targets": float(mask.sum())}
    rows = [[per_token[i, j].item() for j in range(6) if mask[i, j]] for i in range(4)]
    hand = {"seq": sum(sum(r) / len(r) for r in rows) / 4,
            "token": sum(sum(r) for r in rows) / sum(len(r) for r in rows),
            "dr_grpo": sum(sum(r) for r in rows) / (4 * 8)}
    for agg, value in hand.items():
        whole = train_grpo.aggregate(per_token, mask, agg, totals, max_gen_len=8)
        assert whole.item() == pytest.approx(value, rel=1e-5)
        # micro-batches of 1 and 3 rows: the shares, normalised by the step's totals, add up to the same loss
        split = (train_grpo.aggregate(per_token[:1], mask[:1], agg, totals, 8)
                 + train_grpo.aggregate(per_token[1:], mask[1:], agg, totals, 8))
        assert split.item() == pytest.approx(value, rel=1e-5)


def _trl_compute_loss():
    try:
        from trl.trainer.grpo_trainer import GRPOTrainer
    except ImportError as e:  # noqa: F841 - the reason goes into the skip message
        pytest.skip(f"trl is not importable here ({e}); install it to compare with TRL's GRPO loss")
    return GRPOTrainer._compute_loss


@pytest.mark.parametrize("loss_type, agg, trl_type", [("grpo", "seq", "grpo"), ("grpo", "token", "dapo"),
                                                      ("grpo", "dr_grpo", "dr_grpo"), ("cispo", "token", "cispo")])
def test_loss_equals_trls_grpo_loss_on_the_same_tensors(loss_type, agg, trl_type):
    """TRL's GRPOTrainer._compute_loss run on a stand-in trainer whose forward returns our log-probs:
    same loss value, same gradient, same clip statistic."""
    compute_loss = _trl_compute_loss()
    torch.manual_seed(3)
    B, C, beta, eps, eps_high, max_len = 4, 5, 0.04, 0.2, 0.28 if loss_type == "grpo" else 2.0, 7
    old = -torch.rand(B, C) * 3
    logps = (old + torch.randn(B, C) * 0.4).requires_grad_()
    ref = -torch.rand(B, C) * 3
    adv = torch.randn(B)
    mask = torch.ones(B, C)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    ours = train_grpo.policy_loss(logps, old, adv.unsqueeze(1), loss_type, eps, eps_high)[0] + \
        beta * train_grpo.k3_kl(logps, ref)
    ours = train_grpo.aggregate(ours, mask, agg, {"n_rows": float(B), "n_targets": float(mask.sum())}, max_len)
    grad_ours, = torch.autograd.grad(ours, logps)

    class Accelerator:
        num_processes, sync_gradients = 1, True
        reduce = staticmethod(lambda x, reduction="sum": x)
        gather = gather_for_metrics = staticmethod(lambda x: x)

    stub = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros(B, C), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=trl_type, epsilon_low=eps, epsilon_high=eps_high,
        use_vllm=False, model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=max_len, accelerator=Accelerator(), _entropy_bonus_enabled=False,
        _metrics={"train": collections.defaultdict(list)},
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1))
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2),
              "completion_ids": torch.zeros(B, C, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    theirs = compute_loss(stub, None, inputs)
    grad_theirs, = torch.autograd.grad(theirs, logps)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(grad_ours, grad_theirs)


# -- the loss_fn on a model ---------------------------------------------------------------------------
def test_loss_fn_on_a_model_equals_the_formula_and_the_split():
    torch.manual_seed(4)
    model = MiniLLM(ModelConfig.preset("debug", vocab_size=512, kernel_backend="torch"))
    ids = torch.randint(1, 512, (4, 9))
    loss_mask = torch.zeros(4, 9, dtype=torch.bool)
    for row, (start, end) in enumerate([(3, 9), (4, 7), (2, 5), (5, 9)]):
        loss_mask[row, start:end] = True
    batch = {"ids": ids, "loss_mask": loss_mask, "advantages": torch.tensor([1.0, -0.5, 0.0, 2.0]),
             "ref_logps": -torch.rand(4, 8) * 5, "reward": torch.rand(4), "reward_std": torch.tensor([0.5, 0.5, 0, 0]),
             "advantages_std": torch.ones(4), "finished": torch.tensor([True, False, True, True]),
             "part/answer": torch.tensor([1.0, 0.0, 1.0, 1.0])}
    totals = {"n_rows": 4.0, "n_targets": float(loss_mask[:, 1:].sum()), "micro_batches": 1.0}
    loss_fn = train_grpo.make_grpo_loss("grpo", 0.2, 0.2, 0.1, "seq", temperature=0.8, max_gen_len=8)
    loss, metrics = loss_fn(model, batch, totals)
    # by hand: ratio 1, so the policy term is -A per token; plus β·k3 against the reference
    logps = (model(ids[:, :-1]).float() / 0.8).log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    m = loss_mask[:, 1:].float()
    per_token = -batch["advantages"][:, None] + 0.1 * train_grpo.k3_kl(logps, batch["ref_logps"])
    expect = ((per_token * m).sum(1) / m.sum(1)).mean()
    torch.testing.assert_close(loss, expect)
    assert metrics["rewards/answer/mean"].item() == pytest.approx(0.75)
    assert metrics["completions/finished_ratio"].item() == pytest.approx(0.75)
    assert metrics["frac_reward_zero_std"].item() == pytest.approx(0.5)
    assert metrics["completions/mean_length"].item() == pytest.approx(m.sum().item() / 4)
    kl = train_grpo.k3_kl(logps, batch["ref_logps"])
    torch.testing.assert_close(metrics["kl"], ((kl * m).sum() / m.sum()).detach())
    # two micro-batches of the same step give the same loss (shares of the step's totals)
    halves = [{k: v[rows] for k, v in batch.items()} for rows in ([0, 1], [2, 3])]
    torch.testing.assert_close(sum(loss_fn(model, h, totals)[0] for h in halves), loss)


# -- the script ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random 'SFT' checkpoint on the shipped tokenizer, made peaky (final norm x 5) so that one token
    starts about a third of its completions (the toy reward's target), and a small rlaif file."""
    root = tmp_path_factory.mktemp("grpo")
    tok = Tokenizer.load()
    torch.manual_seed(0)
    model = MiniLLM(ModelConfig.preset("debug", vocab_size=tok.vocab_size, kernel_backend="torch")).eval()
    rows = [{"conversations": [{"role": "user", "content": f"What is {a} + {b}?"},
                               {"role": "assistant", "content": ""}], "answer": str(a + b)}
            for a in range(16) for b in range(4)]
    with torch.no_grad():
        model.model.norm.weight.mul_(5.0)
        first = torch.stack([(model(torch.tensor([tok.render_prompt(r["conversations"][:1])]))[0, -1] / 0.8).softmax(-1)
                             for r in rows[::8]]).mean(0)
    save_checkpoint(root / "sft", model, tok)
    (root / "rlaif.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert 0.1 < first.max() < 0.6
    (root / "target.txt").write_text(str(int(first.argmax())))
    return root


@pytest.fixture(scope="module")
def target(setup):
    return int((setup / "target.txt").read_text())


def _argv(root, *extra):
    return ["--init_from", str(root / "sft"), "--data_path", str(root / "rlaif.jsonl"), "--save_dir",
            str(root / "out"), "--batch_size", "4", "--num_generations", "4", "--max_gen_len", "4",
            "--device", "cpu", "--use_tensorboard", "0", "--use_compile", "0", "--report_path", "",
            "--report_prompts", "0", "--log_interval", "1", "--epochs", "1", *extra]


class ToyReward:
    """1 for a completion that starts with `target`, else 0; keeps each step's mean."""

    def __init__(self, target, fail_at_call=0):
        self.target, self.means, self.calls, self.fail_at_call = target, [], 0, fail_at_call

    def __call__(self, rows, rollouts):
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise RuntimeError("simulated crash")
        reward = torch.tensor([float(c[0] == self.target) for c in rollouts.completions])
        self.means.append(reward.mean().item())
        return reward, {"starts_with_target": reward}


def test_two_updates_per_rollout_take_two_optimizer_steps(setup):
    trainer = train_grpo.main(_argv(setup, "--save_weight", "iters", "--max_steps", "2", "--num_iterations", "2",
                                    "--loss_type", "grpo", "--rewards", "length,format", "--report_prompts", "3"))
    assert trainer.step == 2
    (sampled, _), (greedy, parts) = trainer.reward_report[0]  # before training: sampled and greedy
    assert set(parts) == {"length", "format"} and -1.0 <= greedy <= 1.0 and -1.0 <= sampled <= 1.0
    steps = {int(s["step"]) for s in trainer.optimizer.state.values()}
    assert steps == {4}


def test_toy_reward_rises(setup, target, monkeypatch):
    toy = ToyReward(target)
    monkeypatch.setattr(train_grpo, "make_reward_fn", lambda *a, **k: toy)
    train_grpo.main(_argv(setup, "--save_weight", "toy", "--max_steps", "12", "--learning_rate", "2e-3",
                          "--beta", "0", "--warmup_steps", "0"))
    first, last = sum(toy.means[:2]) / 2, sum(toy.means[-4:]) / 4
    assert last >= 0.8 and last > first + 0.3, toy.means


@pytest.mark.parametrize("dynamic", [0, 2])
def test_interrupted_run_resumes_bit_exactly(setup, target, monkeypatch, dynamic):
    args = ("--max_steps", "4", "--save_interval", "2", "--learning_rate", "1e-3", "--beta", "0.1",
            "--dynamic_sampling", str(dynamic))
    whole_reward = ToyReward(target)
    monkeypatch.setattr(train_grpo, "make_reward_fn", lambda *a, **k: whole_reward)
    train_grpo.main(_argv(setup, "--save_weight", f"whole{dynamic}", *args))
    # the same run crashing in a rollout after the step-2 checkpoint (step 3's; with dynamic sampling, a
    # step may score several rounds: its last call, in step 4), then resumed from that checkpoint
    fail_at = 3 if dynamic == 0 else whole_reward.calls
    monkeypatch.setattr(train_grpo, "make_reward_fn", lambda *a, **k: ToyReward(target, fail_at_call=fail_at))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_grpo.main(_argv(setup, "--save_weight", f"cut{dynamic}", *args))
    monkeypatch.setattr(train_grpo, "make_reward_fn", lambda *a, **k: ToyReward(target))
    resumed = train_grpo.main(_argv(setup, "--save_weight", f"cut{dynamic}", "--from_resume", "1", *args))
    assert resumed.step == 4
    whole = load_file(setup / f"out/whole{dynamic}/model.safetensors")
    cut = load_file(setup / f"out/cut{dynamic}/model.safetensors")
    assert whole.keys() == cut.keys()
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    start = load_file(setup / "sft/model.safetensors")
    assert any(not torch.equal(whole[k], start[k]) for k in whole)  # it trained


# -- dynamic sampling (DAPO) ----------------------------------------------------------------------------
def test_pick_groups_keeps_the_first_informative_then_fills_in_order():
    assert train_grpo.pick_groups([False, True, False, True, True], 2) == [1, 3]
    assert train_grpo.pick_groups([False, True, False, False, True], 3) == [0, 1, 4]  # 2 informative + 1 filler
    assert train_grpo.pick_groups([False, False, False], 2) == [0, 1]
    assert train_grpo.pick_groups([True, True], 2) == [0, 1]


class _Prompts:
    """make_rollout's view of a PromptDataset: prompts, rows, len; odd rows are "informative"."""

    def __init__(self, n):
        self.prompts = [[5 + i % 7, 9, 11 + i % 3] for i in range(n)]
        self.rows = [{"answer": str(i), "informative": i % 2 == 1} for i in range(n)]

    def __len__(self):
        return len(self.prompts)


def _parity_reward(rows, rollouts):
    """An informative row's group gets 0, 1, 0, 1, ...; every other group all 0."""
    reward = torch.tensor([float(row["informative"] and i % 2 == 1) for i, row in enumerate(rows)])
    return reward, {"parity": reward}


@pytest.mark.parametrize("rounds", [0, 1, 6])
def test_dynamic_sampling_keeps_informative_groups_deterministically(rounds):
    from minillm.generate import SamplingParams
    torch.manual_seed(0)
    model = MiniLLM(ModelConfig.preset("debug", vocab_size=64, kernel_backend="torch")).eval()
    data, G = _Prompts(40), 4
    params = SamplingParams(max_new_tokens=3, temperature=1.0, top_p=1.0)
    seen = []
    rollout = train_grpo.make_rollout(data, types.SimpleNamespace(pad_id=0), _parity_reward, params, G, 8, 1, "group",
                                      None, None, seed_fn=lambda: 123, dynamic_sampling=rounds,
                                      show=lambda r, rw: seen.append(r.completions))
    step = [{"index": torch.tensor([0, 2, 4, 1])}, {"index": torch.tensor([6, 8, 10, 12])}]  # one informative
    (first,) = list(rollout(model, step))
    (again,) = list(rollout(model, step))
    assert seen[0] == seen[1]  # the same seed samples the same step
    for a, b in zip(first, again):
        assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    assert sum(b["n_rows"] for b in first) == 8 * G  # the step keeps its row count
    reward = torch.cat([b["reward"] for b in first])
    advantages = torch.cat([b["advantages"] for b in first])
    informative = (reward.view(-1, G).std(1) > 0)
    if rounds == 0:  # off: the step's own groups, as sampled; only prompt 1's group is informative
        assert informative.tolist() == [False, False, False, True, False, False, False, False]
        assert not any(k.startswith("stat/") for k in first[0])
    else:
        # each extra round draws 8 random prompts, about half informative: 6 rounds fill the step
        # (this seed), 1 round cannot; the kept informative groups come first in sampling order
        kept = int(informative.sum())
        assert kept == 8 if rounds == 6 else 1 < kept < 8
        assert (advantages.view(-1, G)[informative].abs() > 0).all()
        assert (advantages.view(-1, G)[~informative] == 0).all()
        n_rounds = first[0]["stat/dynamic/rounds"][0].item()
        dropped = first[0]["stat/dynamic/frac_dropped"][0].item()
        assert 2 <= n_rounds <= rounds + 1 and dropped == pytest.approx(1 - 8 / (8 * n_rounds))
        assert first[0]["stat/dynamic/reward_unfiltered"][0].item() == pytest.approx(2 / (8 * G))  # prompt 1's group


def test_max_prompts_trains_on_the_first_prompts_only(setup, target, monkeypatch):
    seen = []

    class Recording(ToyReward):
        def __call__(self, rows, rollouts):
            seen.extend(row["conversations"][0]["content"] for row in rows)
            return super().__call__(rows, rollouts)
    monkeypatch.setattr(train_grpo, "make_reward_fn", lambda *a, **k: Recording(target))
    trainer = train_grpo.main(_argv(setup, "--save_weight", "subset", "--max_prompts", "8", "--epochs", "3",
                                    "--dynamic_sampling", "0"))
    assert len(trainer.dataset) == 8 and trainer.step == 6  # 8 prompts, batch 4, 3 epochs
    first = {f"What is 0 + {b}?" for b in range(4)} | {f"What is 1 + {b}?" for b in range(4)}
    assert set(seen) == first
    assert len(seen) == 8 * 3 * 4  # each of the 8, once an epoch, 4 generations
    with pytest.raises(UserError, match="--max_prompts"):
        train_grpo.main(_argv(setup, "--save_weight", "subset", "--max_prompts", "-2"))


def test_lora_run_saves_only_the_adapter(setup):
    trainer = train_grpo.main(_argv(setup, "--save_weight", "lora", "--max_steps", "1", "--use_lora", "1",
                                    "--rewards", "length"))
    assert trainer.step == 1
    folder = setup / "out" / "lora"
    assert (folder / "adapter.safetensors").is_file() and not (folder / "model.safetensors").exists()


def test_bad_rlaif_row_is_a_clear_error(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = (setup / "rlaif.jsonl").read_text(encoding="utf-8").splitlines()[:6]
    lines[3] = '{"conversations": [{"role": "user", "content": "hi"}], "answer": 7}'
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(f"{bad}:4") + '.*"answer" must be a string'):
        train_grpo.main(_argv(setup, "--save_weight", "bad", "--data_path", str(bad)))


@pytest.mark.parametrize("flags, message", [
    (("--num_generations", "1"), "num_generations 1"),
    (("--rewards", "answer,nope"), "unknown reward 'nope'"),
    (("--rewards", "model"), "reward_model_path"),
    (("--loss_type", "cispo", "--epsilon_high", "0.5"), "caps CISPO"),
    (("--max_gen_len", "4000"), "max_gen_len 4000"),
])
def test_bad_flags_are_clear_errors(setup, flags, message):
    with pytest.raises(UserError, match=message):
        train_grpo.main(_argv(setup, "--save_weight", "flags", *flags))
