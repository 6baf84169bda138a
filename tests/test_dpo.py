"""DPO: the loss against the formula (DPO, cDPO, IPO on per-token averages, and the reference-free
SimPO and ORPO) and against TRL's own loss functions, the masked sequence sums, the frozen reference,
TRL's metric names, and train_dpo.py end to end."""
import contextlib
import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F
import yaml

import train_dpo
from minillm.checkpoint import load_checkpoint, save_checkpoint
from minillm.config import ModelConfig
from minillm.data import DPODataset, dpo_collate
from minillm.lora import apply_lora
from minillm.model import MiniLLM
from minillm.preference import pair_inputs, sequence_logprobs
from minillm.tokenizer import Tokenizer


def tiny_model(seed=0, vocab_size=512):
    torch.manual_seed(seed)
    return MiniLLM(ModelConfig.preset("debug", vocab_size=vocab_size, kernel_backend="torch"))


def random_pair_batch(B=3, T=12, V=512, prompt=5, seed=0):
    """chosen/rejected rows sharing a prompt of `prompt` tokens (loss_mask 0) and right padding,
    as dpo_collate makes them (ids and loss_mask of T + 1 tokens, plus the counts)."""
    g = torch.Generator().manual_seed(seed)
    batch = {"n_rows": B}
    for side in ("chosen", "rejected"):
        ids = torch.randint(0, V, (B, T + 1), generator=g)
        mask = torch.ones(B, T + 1, dtype=torch.bool)
        mask[:, :prompt + 1] = False
        for row in range(B):  # different lengths: the tail is padding
            mask[row, T - row:] = False
        batch[f"{side}_ids"], batch[f"{side}_loss_mask"] = ids, mask
        batch[f"n_{side}_targets"] = int(mask[:, 1:].sum())
    batch["rejected_ids"][:, :prompt] = batch["chosen_ids"][:, :prompt]
    return batch


def step_totals(*batches):
    """What the trainer passes for one optimizer step made of these micro-batches (one process)."""
    keys = [k for k in batches[0] if k.startswith("n_")]
    return {**{k: float(sum(b[k] for b in batches)) for k in keys}, "micro_batches": float(len(batches))}


def side(batch, name):
    """(inputs, labels) of one side of a pair batch."""
    ids, mask = batch[f"{name}_ids"], batch[f"{name}_loss_mask"]
    return ids[:, :-1], ids[:, 1:].masked_fill(~mask[:, 1:], -100)


# -- the math -----------------------------------------------------------------------------------------
def test_sequence_logprobs_sum_response_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100, -100], [-100, 1, 2, 3, 4, 5, 6]])
    logps, n = sequence_logprobs(logits, labels)
    expect = [sum(logits[b, t].log_softmax(-1)[labels[b, t]] for t in range(7) if labels[b, t] != -100)
              for b in range(2)]
    torch.testing.assert_close(logps, torch.stack(expect))
    assert n.tolist() == [3, 6]
    # logits at prompt / padding positions must not matter
    changed = logits.clone()
    changed[labels == -100] = 100 * torch.randn_like(changed[labels == -100])
    torch.testing.assert_close(sequence_logprobs(changed, labels)[0], logps)


@pytest.mark.parametrize("beta, smoothing", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.25)])
def test_sigmoid_loss_matches_formula(beta, smoothing):
    torch.manual_seed(1)
    pc, pr, rc, rr = (torch.randn(8) * 5 for _ in range(4))
    losses = train_dpo.preference_losses(pc - rc, pr - rr, beta, smoothing)
    expect = []
    for i in range(8):
        z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i]))
        expect.append(-(1 - smoothing) * torch.log(torch.sigmoid(z)) - smoothing * torch.log(torch.sigmoid(-z)))
    torch.testing.assert_close(losses, torch.stack(expect))


def test_ipo_loss_matches_formula():
    torch.manual_seed(2)
    pc, pr, rc, rr = (torch.randn(8) * 5 for _ in range(4))
    beta = 0.2
    losses = train_dpo.preference_losses(pc - rc, pr - rr, beta, loss_type="ipo")
    torch.testing.assert_close(losses, ((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2)


def test_ipo_uses_per_token_average_logprobs_as_the_paper_and_trl():
    """IPO's h is built from log-probs averaged over each response's tokens (Azar et al.; TRL divides
    by the completion length for loss_type="ipo"): checked by hand on a real model's log-probs."""
    policy, ref = tiny_model(0), tiny_model(1)
    batch = random_pair_batch(seed=6)
    beta = 0.5
    loss, metrics = train_dpo.make_dpo_loss(train_dpo.reference_fn(ref_model=ref), beta=beta,
                                            loss_type="ipo")(policy, batch, step_totals(batch))

    def avg(model, name):
        inputs, labels = side(batch, name)
        per_token = model.token_logprobs(inputs, labels)
        return per_token.sum(-1) / (labels != -100).sum(-1)
    h = (avg(policy, "chosen") - avg(ref, "chosen")) - (avg(policy, "rejected") - avg(ref, "rejected"))
    torch.testing.assert_close(loss, ((h - 1 / (2 * beta)) ** 2).mean())
    torch.testing.assert_close(metrics["rewards/chosen"], beta * (avg(policy, "chosen") - avg(ref, "chosen")).mean().detach())


def test_bad_loss_options_are_errors():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        train_dpo.preference_losses(x, x, 0.1, loss_type="hinge")
    with pytest.raises(ValueError, match="label_smoothing"):
        train_dpo.preference_losses(x, x, 0.1, label_smoothing=0.5)


@pytest.mark.parametrize("beta, gamma, smoothing", [(2.0, 0.5, 0.0), (0.1, 1.0, 0.0), (2.5, 0.3, 0.2)])
def test_simpo_loss_matches_the_paper(beta, gamma, smoothing):
    """SimPO (Meng et al. 2024, eq. 6): −log σ(β/|y_w|·log π(y_w) − β/|y_l|·log π(y_l) − γ), from summed
    log-probs and lengths by hand (label smoothing as TRL's CPOTrainer adds it)."""
    torch.manual_seed(3)
    sum_w, sum_l = -torch.rand(6) * 30, -torch.rand(6) * 30
    len_w, len_l = torch.randint(1, 20, (6,)).float(), torch.randint(1, 20, (6,)).float()
    losses = train_dpo.preference_losses(sum_w / len_w, sum_l / len_l, beta, smoothing, "simpo", simpo_gamma=gamma)
    for i in range(6):
        z = beta / len_w[i].item() * sum_w[i].item() - beta / len_l[i].item() * sum_l[i].item() - gamma
        expect = -(1 - smoothing) * math.log(1 / (1 + math.exp(-z))) - smoothing * math.log(1 / (1 + math.exp(z)))
        assert losses[i].item() == pytest.approx(expect, rel=1e-5)


def test_orpo_odds_ratio_loss_matches_the_paper():
    """ORPO (Hong et al. 2024, eqs. 4-7): odds(y) = P/(1 − P) with P the per-token average probability
    exp(log π(y)/|y|), L_OR = −log σ(log(odds(y_w)/odds(y_l))), weighted by λ (TRL's beta); computed in
    float64 from the probabilities themselves, including probabilities near 1 (log1mexp's expm1 branch)."""
    avg_w = torch.tensor([-0.05, -0.3, -1.2, -4.0, -1e-4, -0.7])
    avg_l = torch.tensor([-0.2, -0.1, -2.5, -3.0, -0.9, -0.69])
    lam = 0.25
    losses = train_dpo.preference_losses(avg_w, avg_l, lam, loss_type="orpo")
    for i in range(6):
        pw, pl = math.exp(avg_w[i].item()), math.exp(avg_l[i].item())
        log_or = math.log(pw / (1 - pw)) - math.log(pl / (1 - pl))
        assert losses[i].item() == pytest.approx(-lam * math.log(1 / (1 + math.exp(-log_or))), rel=1e-4)
    # a reply of probability 1 gives a finite loss and gradient, not log 0
    x = torch.tensor([0.0, -0.5], requires_grad=True)
    loss = train_dpo.preference_losses(x[:1], x[1:], lam, loss_type="orpo").sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def _avg(model, batch, name):
    inputs, labels = side(batch, name)
    return model.token_logprobs(inputs, labels).sum(-1) / (labels != -100).sum(-1)


def test_simpo_stage_loss_uses_average_logprobs_and_no_reference():
    policy = tiny_model(0)
    batch = random_pair_batch(seed=9)
    beta, gamma = 2.0, 0.7
    loss, metrics = train_dpo.make_dpo_loss(None, beta=beta, loss_type="simpo", simpo_gamma=gamma)(
        policy, batch, step_totals(batch))
    aw, al = _avg(policy, batch, "chosen"), _avg(policy, batch, "rejected")
    torch.testing.assert_close(loss, -F.logsigmoid(beta * (aw - al) - gamma).mean())
    torch.testing.assert_close(metrics["rewards/chosen"], beta * aw.mean().detach())  # TRL: β · average log-prob
    torch.testing.assert_close(metrics["rewards/accuracies"], (aw > al).float().mean())
    torch.testing.assert_close(metrics["logps/rejected"], al.mean().detach())
    with pytest.raises(ValueError, match="no reference"):
        train_dpo.make_dpo_loss(train_dpo.reference_fn(ref_model=tiny_model(1)), beta=2.0, loss_type="simpo")


def test_orpo_stage_loss_is_chosen_nll_plus_lambda_odds_ratio():
    """ORPO = NLL of the chosen replies (a mean over their tokens; the prompt is not trained on, as in
    every stage here) + λ · L_OR, with TRL's ORPO metric names."""
    policy = tiny_model(0)
    batch = random_pair_batch(seed=10)
    lam = 0.3
    loss, metrics = train_dpo.make_dpo_loss(None, beta=lam, loss_type="orpo")(policy, batch, step_totals(batch))
    inputs, labels = side(batch, "chosen")
    nll = -policy.token_logprobs(inputs, labels).sum() / (labels != -100).sum()
    aw, al = _avg(policy, batch, "chosen").double(), _avg(policy, batch, "rejected").double()
    log_or = (aw - torch.log(-torch.expm1(aw))) - (al - torch.log(-torch.expm1(al)))
    torch.testing.assert_close(loss.double(), nll.double() - lam * F.logsigmoid(log_or).mean(), rtol=1e-5, atol=1e-6)
    assert set(metrics) >= {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                            "logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"}
    torch.testing.assert_close(metrics["nll_loss"], nll.detach())
    torch.testing.assert_close(metrics["log_odds_chosen"].double(), log_or.mean().detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["log_odds_ratio"].double(), F.logsigmoid(log_or).mean().detach(),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="sft_weight"):
        train_dpo.make_dpo_loss(None, beta=lam, loss_type="orpo", sft_weight=1.0)


# -- TRL's own loss functions on the same tensors (skipped only where trl cannot be imported) ------------
def _trl(module):
    import os
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    return pytest.importorskip(module, reason="TRL is the oracle here (pip install trl)")


@pytest.mark.parametrize("loss_type, beta, smoothing", [("simpo", 2.0, 0.0), ("simpo", 0.5, 0.1),
                                                         ("sigmoid", 0.1, 0.0), ("sigmoid", 0.3, 0.2),
                                                         ("ipo", 0.2, 0.0)])
def test_losses_equal_trl_cpo_trainer(loss_type, beta, smoothing):
    """TRL's CPOTrainer.cpo_loss: SimPO on average log-probs; its sigmoid and ipo branches are DPO's and
    IPO's formulas on whatever scores they are given, here our log-ratios."""
    cpo = _trl("trl.experimental.cpo")
    torch.manual_seed(11)
    chosen, rejected = -torch.rand(7) * 3, -torch.rand(7) * 3
    trainer = types.SimpleNamespace(alpha=0.0, beta=beta, label_smoothing=smoothing, loss_type=loss_type,
                                    simpo_gamma=0.8, accelerator=types.SimpleNamespace(device="cpu"))
    trl_losses, trl_chosen_rewards, _ = cpo.CPOTrainer.cpo_loss(trainer, chosen, rejected)
    ours = train_dpo.preference_losses(chosen, rejected, beta, smoothing, loss_type, simpo_gamma=0.8)
    torch.testing.assert_close(ours, trl_losses)
    if loss_type == "simpo":  # and the logged rewards: β · average log-prob
        policy = tiny_model(0)
        batch = random_pair_batch(seed=12)
        _, metrics = train_dpo.make_dpo_loss(None, beta=beta, loss_type="simpo", label_smoothing=smoothing,
                                             simpo_gamma=0.8)(policy, batch, step_totals(batch))
        aw, al = _avg(policy, batch, "chosen").detach(), _avg(policy, batch, "rejected").detach()
        trl_losses, trl_chosen, trl_rejected = cpo.CPOTrainer.cpo_loss(trainer, aw, al)
        torch.testing.assert_close(metrics["rewards/chosen"], trl_chosen.mean())
        torch.testing.assert_close(metrics["rewards/margins"], (trl_chosen - trl_rejected).mean())


def test_orpo_equals_trl_orpo_trainer():
    """TRL's ORPOTrainer.odds_ratio_loss (its loss is nll − mean(losses)) and its logged log-odds metrics."""
    orpo = _trl("trl.experimental.orpo")
    torch.manual_seed(13)
    avg_w = -torch.rand(8) * 2
    avg_l = -torch.rand(8) * 2
    avg_w[0], avg_l[1] = -1e-3, -0.6931  # near p = 1, and at the branch point of log1mexp
    trainer = types.SimpleNamespace(beta=0.15, accelerator=types.SimpleNamespace(device="cpu"))
    trl_terms, trl_chosen, _, trl_ratio, trl_log_odds = orpo.ORPOTrainer.odds_ratio_loss(trainer, avg_w, avg_l)
    torch.testing.assert_close(train_dpo.preference_losses(avg_w, avg_l, 0.15, loss_type="orpo"), -trl_terms)
    log_odds = train_dpo.odds_ratio(avg_w, avg_l)
    torch.testing.assert_close(log_odds.mean(), trl_log_odds)
    torch.testing.assert_close(F.logsigmoid(log_odds).mean(), trl_ratio)


def test_stage_loss_equals_direct_formula_and_ignores_prompt_logits():
    """train_dpo's loss_fn on a real model against the formula computed from model.token_logprobs,
    with TRL's metric names."""
    policy, ref = tiny_model(0), tiny_model(1)
    batch = random_pair_batch()
    loss_fn = train_dpo.make_dpo_loss(train_dpo.reference_fn(ref_model=ref), beta=0.3, sft_weight=0.5)
    loss, metrics = loss_fn(policy, batch, step_totals(batch))

    def seq(model, name):
        return model.token_logprobs(*side(batch, name)).sum(-1)
    h = (seq(policy, "chosen") - seq(ref, "chosen")) - (seq(policy, "rejected") - seq(ref, "rejected"))
    n_chosen = (side(batch, "chosen")[1] != -100).sum()
    expect = -F.logsigmoid(0.3 * h).mean() - 0.5 * seq(policy, "chosen").sum() / n_chosen
    torch.testing.assert_close(loss, expect)
    chosen_r = 0.3 * (seq(policy, "chosen") - seq(ref, "chosen")).detach()
    rejected_r = 0.3 * (seq(policy, "rejected") - seq(ref, "rejected")).detach()
    assert set(metrics) >= {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                            "logps/chosen", "logps/rejected"}  # TRL's DPOTrainer names
    torch.testing.assert_close(metrics["rewards/margins"], (chosen_r - rejected_r).mean())
    torch.testing.assert_close(metrics["rewards/accuracies"], (chosen_r > rejected_r).float().mean())
    torch.testing.assert_close(metrics["logps/chosen"], seq(policy, "chosen").mean().detach())

    # the prompt is causal context only: a model whose logits differ only at prompt/padding
    # positions gives the same loss
    class PromptNoise(torch.nn.Module):
        def __init__(self, inner, labels):
            super().__init__()
            self.inner, self.masked = inner, labels == -100

        def forward(self, ids, return_aux=False):
            logits = self.inner(ids) + 50 * torch.randn(*ids.shape, 512) * self.masked.unsqueeze(-1)
            return (logits, torch.zeros(())) if return_aux else logits
    labels = pair_inputs(batch)[1]
    noisy_loss, _ = loss_fn(PromptNoise(policy, labels), batch, step_totals(batch))
    torch.testing.assert_close(noisy_loss, loss)


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo", "orpo"])
def test_loss_is_exact_across_micro_batches(loss_type):
    """Two micro-batches of one step (pairs and chosen tokens unevenly split) give the gradient of
    the whole batch at once: shares over the step's totals, not means per micro-batch (SimPO and
    ORPO too: ORPO's NLL is a token mean over the step's chosen targets)."""
    ref = tiny_model(1)
    whole = random_pair_batch(B=4, seed=8)
    parts = [{k: (v[rows] if torch.is_tensor(v) else None) for k, v in whole.items()} for rows in ([0], [1, 2, 3])]
    for part in parts:
        part["n_rows"] = part["chosen_ids"].shape[0]
        for name in ("chosen", "rejected"):
            part[f"n_{name}_targets"] = int(part[f"{name}_loss_mask"][:, 1:].sum())
    grads = []
    for micro in ([whole], parts):
        policy = tiny_model(0)
        reference = None if loss_type in train_dpo.REFERENCE_FREE else train_dpo.reference_fn(ref_model=ref)
        loss_fn = train_dpo.make_dpo_loss(reference, beta=0.2, sft_weight=0.0 if loss_type == "orpo" else 1.0,
                                          loss_type=loss_type)
        totals = step_totals(*micro)
        for b in micro:
            loss_fn(policy, b, totals)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def _train(policy, loss_fn, batch, steps=8, lr=1e-3):
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr)
    history = []
    for _ in range(steps):
        loss, metrics = loss_fn(policy, batch, step_totals(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({k: v.item() for k, v in metrics.items()})
    return history


def test_frozen_reference_gets_no_gradient_and_steps_raise_the_margin():
    policy = tiny_model(0)
    ref = train_dpo.frozen_reference(policy)
    before = copy.deepcopy(ref.state_dict())
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    batch = random_pair_batch(B=2, seed=3)
    history = _train(policy, train_dpo.make_dpo_loss(train_dpo.reference_fn(ref_model=ref), beta=0.1), batch)
    assert all(p.grad is None for p in ref.parameters())
    for k, v in ref.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert history[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at start
    assert history[-1]["rewards/margins"] > history[0]["rewards/margins"] + 0.1
    assert history[-1]["rewards/accuracies"] == 1.0


@pytest.mark.parametrize("loss_type, beta", [("simpo", 2.0), ("orpo", 0.5)])
def test_reference_free_steps_raise_the_margin(loss_type, beta):
    policy = tiny_model(0)
    batch = random_pair_batch(B=2, seed=3)
    history = _train(policy, train_dpo.make_dpo_loss(None, beta=beta, loss_type=loss_type), batch, steps=10)
    assert history[-1]["rewards/margins"] > history[0]["rewards/margins"] + 0.05
    assert history[-1]["rewards/accuracies"] == 1.0
    if loss_type == "orpo":  # the SFT half learns the chosen replies too
        assert history[-1]["nll_loss"] < history[0]["nll_loss"] - 0.5


def test_lora_reference_is_the_base_model_with_no_second_copy():
    base = tiny_model(0)
    policy = copy.deepcopy(base)
    params = apply_lora(policy, rank=4, alpha=8)
    reference = train_dpo.reference_fn(lora_model=policy)
    batch = random_pair_batch(B=2, seed=4)
    ids, labels = pair_inputs(batch)
    expect = sequence_logprobs(base(ids), labels)[0].detach()
    with torch.no_grad():  # a trained adapter changes the policy ...
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    history = _train(policy, train_dpo.make_dpo_loss(reference, beta=0.1), batch, steps=5)
    assert history[-1]["rewards/margins"] > history[0]["rewards/margins"]
    # ... but the reference (adapters off) is still exactly the base, and the base got no gradient
    torch.testing.assert_close(reference(ids, labels), expect)
    assert all(p.grad is None for n, p in policy.named_parameters() if "lora_" not in n)
    assert policy.training


# -- the script ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory):
    """A tiny 'SFT' checkpoint on the shipped tokenizer (random weights) plus small data files."""
    root = tmp_path_factory.mktemp("dpo")
    tok = Tokenizer.load()
    save_checkpoint(root / "sft", tiny_model(0, vocab_size=tok.vocab_size), tok)
    with open("dataset/demo/dpo.jsonl", encoding="utf-8") as f:
        pairs = [next(f) for _ in range(24)]
    (root / "pairs.jsonl").write_text("".join(pairs), encoding="utf-8")
    with open("dataset/demo/heldout_dpo.jsonl", encoding="utf-8") as f:
        held = [next(f) for _ in range(6)]
    (root / "held.jsonl").write_text("".join(held), encoding="utf-8")
    return root


def _argv(root, *extra):
    return ["--init_from", str(root / "sft"), "--data_path", str(root / "pairs.jsonl"),
            "--report_path", str(root / "held.jsonl"), "--save_dir", str(root / "out"), "--max_steps", "2",
            "--batch_size", "4", "--device", "cpu", "--num_workers", "0", "--use_tensorboard", "0",
            "--use_compile", "0", "--learning_rate", "1e-3", *extra]


def test_train_dpo_runs_end_to_end(sft_checkpoint):
    trainer = train_dpo.main(_argv(sft_checkpoint, "--save_weight", "dpo"))
    assert trainer.step == 2 and len(trainer.history) == 2
    assert (sft_checkpoint / "out" / "dpo" / "model.safetensors").is_file()
    before, after = trainer.heldout_margins
    assert before.shape == after.shape == (6,)


def test_precomputed_reference_equals_the_frozen_copy(sft_checkpoint):
    model, tok = load_checkpoint(sft_checkpoint / "sft")
    pairs = DPODataset(sft_checkpoint / "pairs.jsonl", tok, 64)
    collate = dpo_collate(tok.pad_id)
    ref_logps = train_dpo.precompute_reference(model, pairs, collate, 5, torch.device("cpu"),
                                               contextlib.nullcontext())
    rows = [0, 7, 13]
    batch = collate([pairs[i] for i in rows])
    direct = train_dpo.reference_fn(ref_model=model)(*pair_inputs(batch))
    torch.testing.assert_close(ref_logps[rows], torch.stack(direct.chunk(2), dim=1), rtol=1e-4, atol=1e-4)
    # and the loss_fn reads them from the batch instead of running a reference model
    with_ref = collate([train_dpo.WithReference(pairs, ref_logps)[i] for i in rows])
    assert with_ref["ref_chosen_logps"].shape == (3,)
    loss, metrics = train_dpo.make_dpo_loss(None, beta=0.1)(model, with_ref, step_totals(with_ref))
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-4)  # policy == reference
    trainer = train_dpo.main(_argv(sft_checkpoint, "--save_weight", "dpo_pre", "--precompute_ref", "1",
                                   "--report_path", "", "--eval_split", "0.2"))
    assert trainer.step == 2 and trainer.eval_history  # the held-out pairs got their own reference log-probs


def test_train_dpo_with_lora_saves_only_the_adapter(sft_checkpoint):
    trainer = train_dpo.main(_argv(sft_checkpoint, "--save_weight", "dpo_lora", "--use_lora", "1",
                                   "--report_path", "", "--loss_type", "ipo", "--sft_weight", "0.1"))
    assert trainer.step == 2
    folder = sft_checkpoint / "out" / "dpo_lora"
    assert (folder / "adapter.safetensors").is_file() and not (folder / "model.safetensors").exists()
    # resuming restores the adapter through the trainer's load_fn and carries on from step 2
    resumed = train_dpo.main(_argv(sft_checkpoint, "--save_weight", "dpo_lora", "--use_lora", "1",
                                   "--report_path", "", "--loss_type", "ipo", "--sft_weight", "0.1",
                                   "--from_resume", "1", "--max_steps", "3"))
    assert resumed.step == 3


def test_bad_flag_combination_is_a_clear_error(sft_checkpoint):
    with pytest.raises(ValueError, match="precompute_ref"):
        train_dpo.main(_argv(sft_checkpoint, "--use_lora", "1", "--precompute_ref", "1"))


def test_moe_policy_adds_the_router_balance_loss():
    torch.manual_seed(0)
    policy = MiniLLM(ModelConfig.preset("debug", vocab_size=512, use_moe=True, kernel_backend="torch"))
    reference = train_dpo.reference_fn(ref_model=train_dpo.frozen_reference(policy))
    batch = random_pair_batch(B=2, seed=5)
    totals = step_totals(batch)
    plain, _ = train_dpo.make_dpo_loss(reference, beta=0.1)(policy, batch, totals)
    with_aux, metrics = train_dpo.make_dpo_loss(reference, beta=0.1, aux_loss_coef=0.5)(policy, batch, totals)
    _, aux = policy(pair_inputs(batch)[0], return_aux=True)
    assert aux.item() > 0.5  # a real balance loss (≈1 when balanced), not the dense model's zero
    torch.testing.assert_close(metrics["aux_loss"], aux.detach())
    torch.testing.assert_close(with_aux, plain + 0.5 * aux)


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_runs_build_no_reference(sft_checkpoint, monkeypatch, loss_type):
    """No frozen copy, no LoRA-off reference, no precomputed log-probs: every way to make a reference fails here."""
    def no_reference(*args, **kwargs):
        raise AssertionError(f"{loss_type} built a reference")
    for name in ("frozen_reference", "reference_fn", "precompute_reference"):
        monkeypatch.setattr(train_dpo, name, no_reference)
    trainer = train_dpo.main(_argv(sft_checkpoint, "--save_weight", f"dpo_{loss_type}", "--loss_type", loss_type,
                                   "--eval_split", "0.2"))
    assert trainer.step == 2 and trainer.eval_history and len(trainer.heldout_margins[1]) == 6
    saved = yaml.safe_load((sft_checkpoint / "out" / f"dpo_{loss_type}" / "config.yaml").read_text())["stage"]
    assert saved["loss_type"] == loss_type and saved["beta"] == train_dpo.DEFAULT_BETA[loss_type]


@pytest.mark.parametrize("flags, match", [(["--loss_type", "simpo", "--precompute_ref", "1"], "no reference"),
                                          (["--loss_type", "orpo", "--sft_weight", "1"], "sft_weight"),
                                          (["--loss_type", "ipo", "--label_smoothing", "0.1"], "label_smoothing"),
                                          (["--simpo_gamma", "1.0"], "simpo_gamma")])
def test_reference_free_flag_misuse_is_a_clear_error(sft_checkpoint, flags, match):
    with pytest.raises(ValueError, match=match):
        train_dpo.main(_argv(sft_checkpoint, "--save_weight", "dpo_bad", *flags))
