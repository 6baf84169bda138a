"""Full SFT: the loss mask is exact (multi-turn, system prompt, truncation) and the script trains."""
import json
import math

import pytest
import torch
import yaml

import train_full_sft
from minillm.checkpoint import load_checkpoint, save_checkpoint
from minillm.config import ModelConfig
from minillm.data import IGNORE_INDEX, LengthGroupedBatchSampler, SFTDataset, pad_collate
from minillm.model import LossOutput, MiniLLM
from minillm.tokenizer import Tokenizer

TOK = Tokenizer.load()
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of Dakaia?"},
    {"role": "assistant", "content": "The capital of Dakaia is Tago."},
    {"role": "user", "content": "达卡亚的语言是什么？"},
    {"role": "assistant", "content": "达卡亚人说达卡亚语。"},
    {"role": "user", "content": "What is 36 + 20?"},
    {"role": "assistant", "content": "36 + 20 = 56."},
]
SHORT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def write_jsonl(path, conversations):
    path.write_text("".join(json.dumps({"conversations": c}, ensure_ascii=False) + "\n" for c in conversations),
                    encoding="utf-8")
    return path


def expected_targets(messages):
    """The tokens SFT must learn: each assistant reply's content followed by <|im_end|>, in order."""
    return [ids for m in messages if m["role"] == "assistant" for ids in TOK.encode(m["content"]) + [TOK.im_end_id]]


class Recorder(torch.nn.Module):
    """Stands in for the model: keeps the (input_ids, labels) the stage's loss hands it."""

    def forward(self, input_ids, labels=None, reduction="mean"):
        self.input_ids, self.labels = input_ids, labels
        zero = torch.zeros((), requires_grad=True)
        return LossOutput(zero, zero, zero.detach(), zero)


def stage_view(batch):
    """What train_full_sft.sft_loss trains on for this batch: its inputs and labels."""
    recorder = Recorder()
    train_full_sft.sft_loss(recorder, batch, {"n_targets": 1.0, "micro_batches": 1.0})
    return {**batch, "input_ids": recorder.input_ids, "labels": recorder.labels}


def batch_of(path, max_seq_len, **kwargs):
    ds = SFTDataset(path, TOK, max_seq_len, **kwargs)
    collate = pad_collate(TOK.pad_id)
    return ds, collate, stage_view(collate([ds[i] for i in range(len(ds))]))


def test_labels_are_exactly_the_assistant_turns_of_a_three_turn_conversation(tmp_path):
    ds, collate, batch = batch_of(write_jsonl(tmp_path / "sft.jsonl", [CONVERSATION, SHORT]), 512)
    full_ids, _ = TOK.render_chat(CONVERSATION)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert ids.tolist() == full_ids[:-1]  # the longest row is not padded
    trained = labels != IGNORE_INDEX
    assert labels[trained].tolist() == expected_targets(CONVERSATION)
    # every label is the next input token (shifted, not offset) ...
    assert all(labels[t] == full_ids[t + 1] for t in trained.nonzero().flatten().tolist())
    # ... and nothing of the system / user turns or the role headers is a target
    decoded = TOK.decode(labels[trained].tolist())
    assert decoded == "The capital of Dakaia is Tago.<|im_end|>达卡亚人说达卡亚语。<|im_end|>36 + 20 = 56.<|im_end|>"
    assert "helpful" not in decoded and "assistant" not in decoded
    # the short row: padded with pad_id, and padding is never a target
    short_ids, _ = TOK.render_chat(SHORT)
    n = len(short_ids)
    assert batch["input_ids"][1, n:].eq(TOK.pad_id).all() and batch["labels"][1, n - 1:].eq(IGNORE_INDEX).all()
    assert TOK.decode(batch["labels"][1][batch["labels"][1] != IGNORE_INDEX].tolist()) == "Hello!<|im_end|>"
    assert 0 < collate.padding_fraction() < 1


def test_truncation_cuts_ids_and_mask_together(tmp_path):
    full_ids, full_mask = TOK.render_chat(CONVERSATION)
    # cut inside the second assistant reply: the row keeps max_seq_len + 1 tokens, so targets up to
    # index max_seq_len, i.e. the reply's first two tokens
    second_reply_start = [i for i, m in enumerate(full_mask) if m][len(TOK.encode("The capital of Dakaia is Tago.")) + 1]
    max_seq_len = second_reply_start + 1
    ds, _, batch = batch_of(write_jsonl(tmp_path / "sft.jsonl", [CONVERSATION]), max_seq_len)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert len(ids) == len(labels) == max_seq_len
    assert ids.tolist() == full_ids[:max_seq_len]
    want = [full_ids[t + 1] if full_mask[t + 1] else IGNORE_INDEX for t in range(max_seq_len)]
    assert labels.tolist() == want
    first_turn = TOK.encode("The capital of Dakaia is Tago.") + [TOK.im_end_id]
    assert labels[labels != IGNORE_INDEX].tolist()[: len(first_turn)] == first_turn
    assert len(labels[labels != IGNORE_INDEX]) == len(first_turn) + 2  # two tokens of the second reply

    # a row cut before any assistant token has nothing to learn: skipped and counted
    short_len = len(TOK.render_chat(SHORT)[0])
    assert full_mask.index(1) > short_len
    ds = SFTDataset(write_jsonl(tmp_path / "two.jsonl", [CONVERSATION, SHORT]), TOK, short_len - 1)
    assert len(ds) == 1 and ds.n_no_target == 1


def test_random_system_prompt_is_inserted_and_never_trained(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [SHORT])
    ds = SFTDataset(path, TOK, 512, system_prompts=["你是一个乐于助人的助手。"], system_prompt_prob=1.0)
    view = stage_view(pad_collate(TOK.pad_id)([ds[0]]))
    item = {"input_ids": view["input_ids"][0], "labels": view["labels"][0]}
    assert TOK.decode(item["input_ids"].tolist()).startswith("<|im_start|>system\n你是一个乐于助人的助手。<|im_end|>")
    assert TOK.decode(item["labels"][item["labels"] != IGNORE_INDEX].tolist()) == "Hello!<|im_end|>"


def tiny_checkpoint(folder):
    torch.manual_seed(0)
    save_checkpoint(folder, MiniLLM(ModelConfig.preset("debug", vocab_size=TOK.vocab_size)), TOK)
    return folder


def test_train_full_sft_runs_and_saves(tmp_path, capsys):
    base = tiny_checkpoint(tmp_path / "pretrain")
    data = write_jsonl(tmp_path / "sft.jsonl", [CONVERSATION, SHORT] * 8)
    trainer = train_full_sft.main(["--init_from", str(base), "--data_path", str(data), "--save_dir",
                                   str(tmp_path / "out"), "--batch_size", "4", "--max_steps", "3",
                                   "--num_workers", "0", "--use_tensorboard", "0", "--log_interval", "1",
                                   "--system_prompt_prob", "0.5"])
    assert trainer.step == 3 and all(math.isfinite(x) for x in trainer.history)
    out = capsys.readouterr().out
    assert "padding:" in out
    trained, _ = load_checkpoint(tmp_path / "out" / "full_sft")
    before, _ = load_checkpoint(base)
    assert not torch.equal(trained.model.layers[0].mlp.up_proj.weight, before.model.layers[0].mlp.up_proj.weight)
    # the stage's own flags are recorded beside the common ones, so the run can be reproduced
    saved = yaml.safe_load((tmp_path / "out" / "full_sft" / "config.yaml").read_text())
    assert saved["stage"] == {"system_prompt_prob": 0.5, "empty_think_ratio": 0.0} and saved["train"]["batch_size"] == 4


def test_length_grouping_keeps_padding_low():
    torch.manual_seed(0)
    lengths = torch.randint(5, 200, (512,)).numpy()
    sampler = LengthGroupedBatchSampler(lengths, 8, seed=0)
    batches = list(sampler)
    real = sum(lengths[b].sum() for b in batches)
    total = sum(lengths[b].max() * len(b) for b in batches)
    assert 1 - real / total < 0.1  # random batches of this spread pad about half


def test_stage_default_start_follows_save_dir(tmp_path, capsys):
    """With no --init_from, SFT starts from <save_dir>/pretrain, so one --save_dir chains the stages;
    a missing one is an error that names it."""
    run = tmp_path / "runs" / "a"
    tiny_checkpoint(run / "pretrain")
    data = write_jsonl(tmp_path / "sft.jsonl", [CONVERSATION, SHORT] * 4)
    flags = ["--data_path", str(data), "--batch_size", "4", "--max_steps", "1", "--num_workers", "0",
             "--use_tensorboard", "0"]
    train_full_sft.main(flags + ["--save_dir", str(run)])
    assert f"from {run / 'pretrain'}" in capsys.readouterr().out
    assert (run / "full_sft" / "config.yaml").exists()
    empty = tmp_path / "runs" / "b"
    with pytest.raises((FileNotFoundError, SystemExit)) as err:
        train_full_sft.main(flags + ["--save_dir", str(empty)])
    assert str(empty / "pretrain") in str(err.value) + capsys.readouterr().err
