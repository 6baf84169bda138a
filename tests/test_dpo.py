"""DPO: the loss against the formula (DPO, cDPO, IPO on per-token averages), the masked sequence sums,
the frozen reference, TRL's metric names, and train_dpo.py end to end."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

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


def test_loss_is_exact_across_micro_batches():
    """Two micro-batches of one step (pairs and chosen tokens unevenly split) give the gradient of
    the whole batch at once: shares over the step's totals, not means per micro-batch."""
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
        loss_fn = train_dpo.make_dpo_loss(train_dpo.reference_fn(ref_model=ref), beta=0.2, sft_weight=1.0)
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
