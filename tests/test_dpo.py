"""DPO: the loss against the formula, the masked sequence sums, the frozen reference, and train_dpo.py end to end."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import train_dpo
from minillm.checkpoint import load_checkpoint, save_checkpoint
from minillm.config import ModelConfig
from minillm.data import DPODataset, dpo_collate
from minillm.dpo import pair_batch, preference_loss, reward_metrics, sequence_logprobs
from minillm.lora import apply_lora
from minillm.model import MiniLLM
from minillm.tokenizer import Tokenizer


def tiny_model(seed=0, vocab_size=512):
    torch.manual_seed(seed)
    return MiniLLM(ModelConfig.preset("debug", vocab_size=vocab_size, kernel_backend="torch"))


def random_pair_batch(B=3, T=12, V=512, prompt=5, seed=0):
    """chosen/rejected rows sharing a prompt of `prompt` tokens (labels -100) and right padding."""
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for side in ("chosen", "rejected"):
        ids = torch.randint(0, V, (B, T), generator=g)
        labels = ids.roll(-1, dims=1).clone()
        labels[:, :prompt] = -100
        for row in range(B):  # different lengths: the tail is padding
            labels[row, T - 1 - row:] = -100
        batch[f"{side}_input_ids"], batch[f"{side}_labels"] = ids, labels
    batch["rejected_input_ids"][:, :prompt] = batch["chosen_input_ids"][:, :prompt]
    return batch


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
    out = preference_loss(pc, pr, rc, rr, beta=beta, label_smoothing=smoothing)
    expect = []
    for i in range(8):
        z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i]))
        expect.append(-(1 - smoothing) * torch.log(torch.sigmoid(z)) - smoothing * torch.log(torch.sigmoid(-z)))
    torch.testing.assert_close(out.loss, torch.stack(expect).mean())
    torch.testing.assert_close(out.chosen_rewards, beta * (pc - rc))
    torch.testing.assert_close(out.rejected_rewards, beta * (pr - rr))
    m = reward_metrics(out.chosen_rewards, out.rejected_rewards)
    torch.testing.assert_close(m["rewards/margin"], (beta * ((pc - rc) - (pr - rr))).mean())
    assert m["rewards/accuracy"].item() == ((pc - rc) > (pr - rr)).float().mean().item()


def test_ipo_loss_matches_formula():
    torch.manual_seed(2)
    pc, pr, rc, rr = (torch.randn(8) * 5 for _ in range(4))
    beta = 0.2
    out = preference_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    torch.testing.assert_close(out.loss, (((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2).mean())


def test_bad_loss_options_are_errors():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss(x, x, x, x, loss_type="hinge")
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(x, x, x, x, label_smoothing=0.5)


def test_stage_loss_equals_direct_formula_and_ignores_prompt_logits():
    """train_dpo's loss_fn on a real model against the formula computed from model.token_logprobs."""
    policy, ref = tiny_model(0), tiny_model(1)
    batch = random_pair_batch()
    loss_fn = train_dpo.make_dpo_loss(train_dpo.reference_fn(ref_model=ref), beta=0.3, sft_weight=0.5)
    loss, metrics = loss_fn(policy, batch)

    def seq(model, side):
        return model.token_logprobs(batch[f"{side}_input_ids"], batch[f"{side}_labels"]).sum(-1)
    h = (seq(policy, "chosen") - seq(ref, "chosen")) - (seq(policy, "rejected") - seq(ref, "rejected"))
    n_chosen = (batch["chosen_labels"] != -100).sum()
    expect = -F.logsigmoid(0.3 * h).mean() - 0.5 * seq(policy, "chosen").sum() / n_chosen
    torch.testing.assert_close(loss, expect)
    torch.testing.assert_close(metrics["rewards/margin"], (0.3 * h).mean().detach())

    # the prompt is causal context only: a model whose logits differ only at prompt/padding
    # positions gives the same loss
    class PromptNoise(torch.nn.Module):
        def __init__(self, inner, labels):
            super().__init__()
            self.inner, self.masked = inner, labels == -100

        def forward(self, ids):
            logits = self.inner(ids)
            return logits + 50 * torch.randn_like(logits) * self.masked.unsqueeze(-1)
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    noisy_loss, _ = loss_fn(PromptNoise(policy, labels), batch)
    torch.testing.assert_close(noisy_loss, loss)


def _train(policy, loss_fn, batch, steps=8, lr=1e-3):
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr)
    history = []
    for _ in range(steps):
        loss, metrics = loss_fn(policy, batch)
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
    assert history[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at start
    assert history[-1]["rewards/margin"] > history[0]["rewards/margin"] + 0.1
    assert history[-1]["rewards/accuracy"] == 1.0


def test_lora_reference_is_the_base_model_with_no_second_copy():
    base = tiny_model(0)
    policy = copy.deepcopy(base)
    params = apply_lora(policy, rank=4, alpha=8)
    reference = train_dpo.reference_fn(lora_model=policy)
    batch = random_pair_batch(B=2, seed=4)
    ids, labels = pair_batch(batch)
    expect = sequence_logprobs(base(ids), labels)[0].detach()
    with torch.no_grad():  # a trained adapter changes the policy ...
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    history = _train(policy, train_dpo.make_dpo_loss(reference, beta=0.1), batch, steps=5)
    assert history[-1]["rewards/margin"] > history[0]["rewards/margin"]
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
            "--eval_path", str(root / "held.jsonl"), "--save_dir", str(root / "out"), "--max_steps", "2",
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
    direct = train_dpo.reference_fn(ref_model=model)(*pair_batch(batch))
    torch.testing.assert_close(ref_logps[rows], torch.stack(direct.chunk(2), dim=1), rtol=1e-4, atol=1e-4)
    # and the loss_fn reads them from the batch instead of running a reference model
    with_ref = train_dpo.CollateWithReference(collate)([train_dpo.WithReference(pairs, ref_logps)[i] for i in rows])
    loss, metrics = train_dpo.make_dpo_loss(None, beta=0.1)(model, with_ref)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-4)  # policy == reference
    trainer = train_dpo.main(_argv(sft_checkpoint, "--save_weight", "dpo_pre", "--precompute_ref", "1",
                                   "--eval_path", ""))
    assert trainer.step == 2


def test_train_dpo_with_lora_saves_only_the_adapter(sft_checkpoint):
    trainer = train_dpo.main(_argv(sft_checkpoint, "--save_weight", "dpo_lora", "--use_lora", "1",
                                   "--eval_path", "", "--loss_type", "ipo", "--sft_weight", "0.1"))
    assert trainer.step == 2
    folder = sft_checkpoint / "out" / "dpo_lora"
    assert (folder / "adapter.safetensors").is_file() and not (folder / "model.safetensors").exists()
    # resuming restores the adapter through the trainer's load_fn and carries on from step 2
    resumed = train_dpo.main(_argv(sft_checkpoint, "--save_weight", "dpo_lora", "--use_lora", "1",
                                   "--eval_path", "", "--loss_type", "ipo", "--sft_weight", "0.1",
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
    plain, _ = train_dpo.make_dpo_loss(reference, beta=0.1)(policy, batch)
    with_aux, metrics = train_dpo.make_dpo_loss(reference, beta=0.1, aux_loss_coef=0.5)(policy, batch)
    _, aux = policy(torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]), return_aux=True)
    assert aux.item() > 0.5  # a real balance loss (≈1 when balanced), not the dense model's zero
    torch.testing.assert_close(metrics["aux_loss"], aux.detach())
    torch.testing.assert_close(with_aux, plain + 0.5 * aux)
