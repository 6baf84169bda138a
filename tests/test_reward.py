"""Reward model: the scalar head against transformers' LlamaForSequenceClassification, the last-real-token
read, checkpoints that load_reward_model accepts (and refuses), the Bradley-Terry loss against the formula
and TRL's RewardTrainer, exact accumulation, and train_reward.py end to end with an exact resume."""
import types
from collections import defaultdict

import pytest
import torch
import yaml

import train_reward
from minillm.checkpoint import load_checkpoint, save_checkpoint
from minillm.config import ModelConfig
from minillm.data import DPODataset, dpo_collate
from minillm.errors import UserError
from minillm.model import MiniLLM
from minillm.reward import (RewardModel, WithLengths, is_reward_checkpoint, load_reward_model, pair_rewards,
                            reward_margins, save_reward_model)
from minillm.tokenizer import Tokenizer
from minillm.trainer import Trainer

PAD = 0


def tiny_lm(seed=0, vocab_size=512, **overrides):
    torch.manual_seed(seed)
    return MiniLLM(ModelConfig.preset("debug", vocab_size=vocab_size, kernel_backend="torch", **overrides))


def tiny_reward(seed=0, **overrides):
    lm = tiny_lm(seed, **overrides)
    torch.manual_seed(seed + 100)
    return RewardModel.from_lm(lm)


def padded_rows(lengths, T=12, V=512, seed=0):
    """Right-padded ids [N, T] (pad id 0, never inside a row) and the lengths [N]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (len(lengths), T), generator=g)
    for row, n in enumerate(lengths):
        ids[row, n:] = PAD
    return ids, torch.tensor(lengths)


def random_pair_batch(B=3, T=10, V=512, seed=0):
    """A WithLengths-style batch: chosen/rejected rows of different lengths, right-padded, with counts."""
    g = torch.Generator().manual_seed(seed)
    batch = {"n_rows": B}
    for k, side in enumerate(("chosen", "rejected")):
        lengths = torch.randint(3, T + 1, (B,), generator=g)
        ids, _ = padded_rows(lengths.tolist(), T, V, seed=seed + k)
        batch[f"{side}_ids"], batch[f"{side}_length"] = ids, lengths
    return batch


def step_totals(*batches):
    keys = [k for k in batches[0] if k.startswith("n_")]
    return {**{k: float(sum(b[k] for b in batches)) for k in keys}, "micro_batches": float(len(batches))}


# -- the model --------------------------------------------------------------------------------------------
def test_rewards_equal_transformers_sequence_classification():
    """Same weights in transformers' LlamaForSequenceClassification (num_labels=1, which scores the
    last non-pad token): the same rewards, on rows of different lengths."""
    transformers = pytest.importorskip("transformers")
    from minillm.export import hf_config
    model = tiny_reward(0)
    with torch.no_grad():  # a head big enough that a wrong position would show
        model.score_head.weight.normal_(std=1.0)
    doc = hf_config(model.config, None)
    doc = {k: v for k, v in doc.items() if k not in ("architectures", "model_type")}
    hf = transformers.LlamaForSequenceClassification(
        transformers.LlamaConfig(**{**doc, "pad_token_id": PAD}, num_labels=1)).eval()
    state = dict(model.state_dict())
    state["score.weight"] = state.pop("score_head.weight")
    hf.load_state_dict(state, strict=True)
    ids, lengths = padded_rows([12, 7, 3, 1])
    with torch.no_grad():
        expect = hf(ids, attention_mask=(ids != PAD).long()).logits.squeeze(-1)
    torch.testing.assert_close(model(ids, lengths), expect, rtol=1e-5, atol=1e-5)
    assert expect.std() > 0.1


def test_reward_reads_the_last_real_token_and_ignores_padding():
    model = tiny_reward(1)
    ids, lengths = padded_rows([9, 5, 2])
    rewards = model(ids, lengths)
    assert rewards.dtype == torch.float32 and rewards.requires_grad and rewards.shape == (3,)
    # each row alone, unpadded
    for row, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(rewards[row], model(ids[row:row + 1, :n], [n])[0], rtol=1e-5, atol=1e-6)
    # what follows a row's last token does not matter; its last token does
    noisy = ids.clone()
    for row, n in enumerate(lengths.tolist()):
        noisy[row, n:] = torch.randint(1, 512, (ids.shape[1] - n,))
    torch.testing.assert_close(model(noisy, lengths), rewards)
    changed = ids.clone()
    changed[1, 4] = (changed[1, 4] + 1) % 512
    assert model(changed, lengths)[1] != rewards[1] and model(changed, lengths)[0] == rewards[0]
    # score: the same values, eval mode only inside, no graph; a list of lengths works too
    scored = model.score(ids, lengths.tolist())
    assert not scored.requires_grad and model.training
    torch.testing.assert_close(scored, rewards.detach())
    with pytest.raises(ValueError, match="lengths"):
        model(ids, [9, 0, 2])


def test_reward_model_shares_the_trunk_and_drops_the_lm_head():
    lm = tiny_lm(2, tie_word_embeddings=False)
    model = RewardModel.from_lm(lm)
    assert model.model is lm.model
    names = set(model.state_dict())
    assert "score_head.weight" in names and not any(n.startswith("lm_head") for n in names)
    assert model.state_dict()["score_head.weight"].shape == (1, lm.config.hidden_size)
    hidden = lm.forward_hidden(padded_rows([6])[0][:, :6])[0][0, -1]
    torch.testing.assert_close(model(padded_rows([6])[0][:, :6], [6])[0], model.score_head(hidden)[0])


def test_checkpoint_round_trip_and_clear_refusals(tmp_path):
    model = tiny_reward(3)
    tok = Tokenizer.load()
    save_reward_model(tmp_path / "rm", model, tok)
    assert yaml.safe_load((tmp_path / "rm" / "config.yaml").read_text())["stage"]["model_kind"] == "reward"
    assert is_reward_checkpoint(tmp_path / "rm")
    loaded = load_reward_model(tmp_path / "rm", "cpu")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    ids, lengths = padded_rows([8, 4])
    torch.testing.assert_close(loaded.score(ids, lengths), model.score(ids, lengths))

    with pytest.raises(UserError, match="no reward model at .*missing.*train_reward.py"):
        load_reward_model(tmp_path / "missing")
    save_checkpoint(tmp_path / "lm", tiny_lm(0), tok)  # a language model is not a reward model
    assert not is_reward_checkpoint(tmp_path / "lm")
    with pytest.raises(UserError, match="not a reward model checkpoint.*train_reward.py --init_from"):
        load_reward_model(tmp_path / "lm")


def test_heldout_margins_score_each_reply_after_its_question():
    tok = Tokenizer.load()
    model = tiny_reward(4, vocab_size=tok.vocab_size)
    rows = [{"question": "What is 2 + 3?", "chosen": "5.", "rejected": "Go away, I am busy today."},
            {"question": "Capital?", "chosen": "Yagor is the capital.", "rejected": "No."}]
    margins = reward_margins(model, tok, rows, "cpu", batch_size=1)
    for row, margin in zip(rows, margins):
        r = []
        for side in ("chosen", "rejected"):
            ids, _ = tok.render_chat([{"role": "user", "content": row["question"]},
                                      {"role": "assistant", "content": row[side]}])
            r.append(model.score(torch.tensor([ids]), [len(ids)])[0])
        torch.testing.assert_close(margin, r[0] - r[1])


# -- the loss ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("center", [0.0, 0.05])
def test_loss_is_bradley_terry_plus_trl_centering(center):
    model = tiny_reward(5)
    with torch.no_grad():
        model.score_head.weight.normal_(std=1.0)
    batch = random_pair_batch(B=4, seed=1)
    loss, metrics = train_reward.make_reward_loss(center)(model, batch, step_totals(batch))
    rc = model(batch["chosen_ids"], batch["chosen_length"]).detach()
    rr = model(batch["rejected_ids"], batch["rejected_length"]).detach()
    expect = sum(-torch.log(torch.sigmoid(rc[i] - rr[i])) + center * (rc[i] + rr[i]) ** 2 for i in range(4)) / 4
    torch.testing.assert_close(loss.detach(), expect)
    torch.testing.assert_close(metrics["accuracy"], (rc > rr).float().mean())
    torch.testing.assert_close(metrics["margin"], (rc - rr).mean())
    torch.testing.assert_close(metrics["mean_reward"], torch.cat([rc, rr]).mean())
    torch.testing.assert_close(metrics["rewards/chosen"], rc.mean())
    with pytest.raises(ValueError, match="center_rewards_coefficient"):
        train_reward.make_reward_loss(-1.0)


@pytest.mark.parametrize("center", [0.0, 0.1])
def test_loss_equals_trl_reward_trainer(center):
    """TRL's own RewardTrainer.compute_loss on the same rewards (its model call returns them as logits)."""
    trl = pytest.importorskip("trl", reason="TRL is the oracle here (pip install trl)")
    torch.manual_seed(6)
    rc, rr = torch.randn(5) * 2, torch.randn(5) * 2
    identity = types.SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x)
    # eval mode: the same loss and metrics, without TRL's training-only token count
    fake = types.SimpleNamespace(model=types.SimpleNamespace(training=False), accelerator=identity,
                                 args=types.SimpleNamespace(center_rewards_coefficient=center),
                                 _metrics={"eval": defaultdict(list)}, _total_train_tokens=0)

    def rewards_model(**inputs):
        return types.SimpleNamespace(logits=torch.cat([rc, rr]).unsqueeze(-1))
    trl_loss = trl.RewardTrainer.compute_loss(fake, rewards_model, {"attention_mask": torch.ones(10, 3)})

    class Fixed(torch.nn.Module):  # our loss_fn on the same rewards
        def forward(self, ids, lengths, return_aux=False):
            return torch.cat([rc, rr]), torch.zeros(())
    batch = {"chosen_ids": torch.zeros(5, 3, dtype=torch.long), "rejected_ids": torch.zeros(5, 3, dtype=torch.long),
             "chosen_length": torch.full((5,), 3), "rejected_length": torch.full((5,), 3), "n_rows": 5}
    loss, metrics = train_reward.make_reward_loss(center)(Fixed(), batch, step_totals(batch))
    torch.testing.assert_close(loss, trl_loss)
    assert metrics["accuracy"].item() == pytest.approx(fake._metrics["eval"]["accuracy"][0])
    assert metrics["margin"].item() == pytest.approx(fake._metrics["eval"]["margin"][0], rel=1e-5)
    assert metrics["mean_reward"].item() == pytest.approx(fake._metrics["eval"]["mean_reward"][0], rel=1e-5)


def test_loss_is_exact_across_micro_batches():
    """Two uneven micro-batches of one step give the whole batch's gradient (shares over the step's pairs)."""
    whole = random_pair_batch(B=4, seed=2)
    parts = [{k: (v[rows] if torch.is_tensor(v) else None) for k, v in whole.items()} for rows in ([0], [1, 2, 3])]
    for part in parts:
        part["n_rows"] = part["chosen_ids"].shape[0]
    grads = []
    for micro in ([whole], parts):
        model = tiny_reward(7)
        loss_fn = train_reward.make_reward_loss(0.1)
        totals = step_totals(*micro)
        for b in micro:
            loss_fn(model, b, totals)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_moe_trunk_adds_the_router_balance_loss():
    model = tiny_reward(8, use_moe=True)
    batch = random_pair_batch(B=2, seed=3)
    totals = step_totals(batch)
    plain, _ = train_reward.make_reward_loss()(model, batch, totals)
    with_aux, metrics = train_reward.make_reward_loss(aux_loss_coef=0.5)(model, batch, totals)
    _, _, aux = pair_rewards(model, batch, return_aux=True)
    assert aux.item() > 0.5
    torch.testing.assert_close(metrics["aux_loss"], aux.detach())
    torch.testing.assert_close(with_aux, plain + 0.5 * aux)


def test_steps_separate_chosen_from_rejected():
    model = tiny_reward(9)
    batch = random_pair_batch(B=4, seed=4)
    loss_fn = train_reward.make_reward_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(15):
        loss, metrics = loss_fn(model, batch, step_totals(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append((loss.item(), metrics["margin"].item(), metrics["accuracy"].item()))
    assert history[-1][0] < 0.5 * history[0][0]
    assert history[-1][1] > history[0][1] + 1.0 and history[-1][2] == 1.0


# -- the script -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory):
    """A tiny 'SFT' checkpoint on the shipped tokenizer (random weights) plus small data files."""
    root = tmp_path_factory.mktemp("reward")
    tok = Tokenizer.load()
    save_checkpoint(root / "sft", tiny_lm(0, vocab_size=tok.vocab_size), tok)
    with open("dataset/demo/dpo.jsonl", encoding="utf-8") as f:
        pairs = [next(f) for _ in range(24)]
    (root / "pairs.jsonl").write_text("".join(pairs), encoding="utf-8")
    with open("dataset/demo/heldout_dpo.jsonl", encoding="utf-8") as f:
        held = [next(f) for _ in range(6)]
    (root / "held.jsonl").write_text("".join(held), encoding="utf-8")
    return root


def _argv(root, *extra):
    return ["--init_from", str(root / "sft"), "--data_path", str(root / "pairs.jsonl"),
            "--report_path", str(root / "held.jsonl"), "--save_dir", str(root / "out"), "--max_steps", "4",
            "--batch_size", "4", "--device", "cpu", "--num_workers", "0", "--use_tensorboard", "0",
            "--use_compile", "0", "--learning_rate", "1e-3", "--log_interval", "1", *extra]


def test_train_reward_end_to_end_saves_a_loadable_reward_model(sft_checkpoint):
    trainer = train_reward.main(_argv(sft_checkpoint, "--save_weight", "rm", "--eval_split", "0.2",
                                      "--center_rewards_coefficient", "0.01"))
    assert trainer.step == 4 and trainer.eval_history
    folder = sft_checkpoint / "out" / "rm"
    doc = yaml.safe_load((folder / "config.yaml").read_text())
    assert doc["stage"]["model_kind"] == "reward" and doc["stage"]["center_rewards_coefficient"] == 0.01
    loaded = load_reward_model(folder)
    before, after = trainer.heldout_margins
    assert before.shape == after.shape == (6,)
    tok = Tokenizer.load(folder)
    rows = [yaml.safe_load(line) for line in (sft_checkpoint / "held.jsonl").read_text().splitlines()]
    torch.testing.assert_close(reward_margins(loaded, tok, rows, "cpu"), after, rtol=1e-5, atol=1e-5)
    # the trunk moved away from the SFT weights it started from
    sft, _ = load_checkpoint(sft_checkpoint / "sft", with_tokenizer=False)
    assert not torch.equal(sft.model.norm.weight, loaded.model.norm.weight)


def test_train_reward_resume_equals_an_uninterrupted_run(sft_checkpoint, monkeypatch):
    whole = train_reward.main(_argv(sft_checkpoint, "--save_weight", "whole", "--save_interval", "2",
                                    "--report_path", ""))

    class Crash(Exception):
        pass
    original_save = Trainer.save

    def save_then_crash(self):
        original_save(self)
        if self.step == 2:
            raise Crash
    monkeypatch.setattr(Trainer, "save", save_then_crash)
    with pytest.raises(Crash):
        train_reward.main(_argv(sft_checkpoint, "--save_weight", "parts", "--save_interval", "2", "--report_path", ""))
    monkeypatch.setattr(Trainer, "save", original_save)
    resumed = train_reward.main(_argv(sft_checkpoint, "--save_weight", "parts", "--save_interval", "2",
                                      "--report_path", "", "--from_resume", "1"))
    assert resumed.history == whole.history[2:]  # exact on CPU
    a, b = (load_reward_model(sft_checkpoint / "out" / name) for name in ("whole", "parts"))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_collated_lengths_are_the_rows_real_lengths(sft_checkpoint):
    tok = Tokenizer.load()
    pairs = WithLengths(DPODataset(sft_checkpoint / "pairs.jsonl", tok, 64))
    batch = dpo_collate(tok.pad_id)([pairs[i] for i in (0, 3, 5)])
    for k, i in enumerate((0, 3, 5)):
        for side in ("chosen", "rejected"):
            n = int(batch[f"{side}_length"][k])
            assert n == len(pairs.pairs[i][f"{side}_ids"])
            assert (batch[f"{side}_ids"][k, n:] == tok.pad_id).all() and batch[f"{side}_ids"][k, n - 1] != tok.pad_id


def test_bad_inputs_are_clear_errors(sft_checkpoint, tmp_path):
    with pytest.raises(UserError, match="center_rewards_coefficient"):
        train_reward.main(_argv(sft_checkpoint, "--save_weight", "bad", "--center_rewards_coefficient", "-1"))
    bad = tmp_path / "held.jsonl"
    bad.write_text('{"question": "q", "chosen": "a"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"held.jsonl:1.*rejected"):
        train_reward.main(_argv(sft_checkpoint, "--save_weight", "bad2", "--report_path", str(bad)))
