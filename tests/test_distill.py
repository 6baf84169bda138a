"""Reasoning distillation: tag weights exactly on the tag targets, the format checker, the script end to end."""
import json

import pytest
import torch
import yaml
import torch.nn.functional as F

import train_distill_reason
from minillm.checkpoint import save_checkpoint
from minillm.config import ModelConfig
from minillm.data import SFTDataset
from minillm.model import MiniLLM
from minillm.reasoning import answer_matches, evaluate_reasoning, extract_answer, is_well_formed, parse_reply
from minillm.tokenizer import Tokenizer

ROWS = [
    {"conversations": [{"role": "user", "content": "Please compute 5 + 7."},
                       {"role": "assistant", "content": "<think>\n5 + 7 = 12.\n</think>\n<answer>\n12\n</answer>"}]},
    {"conversations": [{"role": "system", "content": "You are a helpful assistant."},
                       {"role": "user", "content": "请算一下29加22。"},
                       {"role": "assistant", "content": "51", "reasoning_content": "先算 29 + 20 = 49，再算 49 + 2 = 51。"}]},
    # a user turn that *mentions* a tag: its tokens are not targets, so they must get no weight
    {"conversations": [{"role": "user", "content": "What does <think> mean? 3 - 1?"},
                       {"role": "assistant", "content": "<think>\n3 - 1 = 2.\n</think>\n<answer>\n2\n</answer>"}]},
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load()


@pytest.fixture(scope="module")
def reasoning_batch(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("r1") / "r1.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    ds = SFTDataset(path, tok, max_seq_len=128)
    batch = train_distill_reason.TagCountingCollate(tok.pad_id, tok.think_tag_ids)([ds[i] for i in range(len(ds))])
    ids, mask = batch["ids"], batch["loss_mask"]
    batch["input_ids"], batch["labels"] = ids[:, :-1], ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    return batch


def one_step(batch):
    return {"n_targets": float(batch["n_targets"]), "n_tag_targets": float(batch["n_tag_targets"]),
            "micro_batches": 1.0}


def test_tag_weight_lands_exactly_on_tag_targets(tok, reasoning_batch):
    labels = reasoning_batch["labels"]
    w = train_distill_reason.tag_loss_weights(labels, tok.think_tag_ids, 10.0)
    assert w.shape == labels.shape
    tags = {"<think>", "</think>", "<answer>", "</answer>"}
    for row in range(labels.shape[0]):
        weighted = [t for t in range(labels.shape[1]) if w[row, t] == 10.0]
        # exactly the tags of the reply, in order, each once: row 1's reasoning_content renders as
        # MiniMind-3 does (no <answer> tags), the inline MiniMind2 rows keep their four
        expected = ["<think>", "</think>"] + ([] if row == 1 else ["<answer>", "</answer>"])
        assert [tok.id_to_piece(labels[row, t]) for t in weighted] == expected
        for t in range(labels.shape[1]):
            if t not in weighted:
                assert w[row, t] == 1.0
                assert labels[row, t] == -100 or tok.id_to_piece(labels[row, t]) not in tags
    # the tag in the user turn of row 2 is in input_ids but is not a target: unweighted
    assert (reasoning_batch["input_ids"][2] == tok.think_tag_ids[0]).sum() == 2


def test_weighted_loss_matches_direct_formula(tok, reasoning_batch):
    torch.manual_seed(0)
    model = MiniLLM(ModelConfig.preset("debug", vocab_size=tok.vocab_size, kernel_backend="torch"))
    loss_fn = train_distill_reason.make_reason_loss(tok.think_tag_ids, 10.0)
    assert reasoning_batch["n_tag_targets"] == 4 + 2 + 4  # the tags of each reply, counted by the collate
    loss, _ = loss_fn(model, reasoning_batch, one_step(reasoning_batch))
    ids, labels = reasoning_batch["input_ids"], reasoning_batch["labels"]
    nll = -model.token_logprobs(ids, labels)
    is_tag = torch.isin(labels, torch.tensor(tok.think_tag_ids))
    w = torch.where(is_tag, 10.0, 1.0) * (labels != -100)
    torch.testing.assert_close(loss, (nll * w).sum() / w.sum())
    # tag_weight 1 is plain SFT
    plain, _ = train_distill_reason.make_reason_loss(tok.think_tag_ids, 1.0)(model, reasoning_batch,
                                                                             one_step(reasoning_batch))
    torch.testing.assert_close(plain, F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), ignore_index=-100))


@pytest.mark.parametrize("text, answer", [
    ("<think>\n5 + 7 = 12.\n</think>\n<answer>\n12\n</answer>", "12"),
    ("<think>a</think><answer>b</answer>", "b"),
    ("  <think>\nx\n</think>\n\n<answer>\n 42 \n</answer>\n", "42"),
    ("<think>\n5 + 7 = 12.\n</think>\n\n12", "12"),                # MiniMind-3: no answer tags
    ("<think>\n29 + 22\n</think>\n\n答案是 51。\n", "答案是 51。"),
])
def test_well_formed_replies(text, answer):
    assert is_well_formed(text) and extract_answer(text) == answer


@pytest.mark.parametrize("text", [
    "12",                                                        # no blocks
    "<think>\n5 + 7 = 12.\n</think>\n",                           # no answer
    "<answer>\n12\n</answer>",                                    # no think
    "<answer>\n12\n</answer><think>\nx\n</think>",                # wrong order
    "<think>\nx\n</think>\n<answer>\n12\n",                       # unclosed answer
    "<think>\n\n</think>\n<answer>\n12\n</answer>",               # empty think
    "<think>\nx\n</think>\n<answer>\n\n</answer>",                # empty answer
    "<think>\nx\n</think>\n<answer>\n12\n</answer> and more",     # trailing text
    "<think>\nx<think>y\n</think>\n<answer>\n12\n</answer>",      # nested tag
    "<think>\nx\n</think>\n<answer>\n1\n</answer><answer>2</answer>",  # two answers
    "<think>\n\n</think>\n\n12",                                 # MiniMind-3 form, empty think
    "<think>\nx\n</think>\n\n12</answer>",                       # stray tag after a bare answer
    "<think>\nx\n</think>\n\n12<think>y</think>",                # a second think block
])
def test_malformed_replies(text):
    assert not is_well_formed(text) and parse_reply(text) is None and extract_answer(text) is None


def test_answer_matching():
    assert answer_matches("28", "28") and answer_matches(" 28. ", "28") and answer_matches("28。", "28")
    assert not answer_matches("128", "28") and not answer_matches(None, "28")


def test_evaluate_reasoning_counts_format_and_answers(tok):
    """A 'model' that always replies with one fixed well-formed answer: compliance 100%, accuracy by answer."""
    reply = tok.encode("<think>\n1 + 1 = 2.\n</think>\n<answer>\n2\n</answer>") + [tok.im_end_id]

    class Scripted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = ModelConfig.preset("debug", vocab_size=tok.vocab_size)
            self.lm_head = torch.nn.Linear(1, 1)
            self.step = {}

        def forward(self, ids, cache=None):
            k = self.step.get(id(cache), 0)
            self.step[id(cache)] = k + 1
            cache.length += ids.shape[1]
            logits = torch.zeros(ids.shape[0], ids.shape[1], tok.vocab_size)
            logits[:, -1, reply[min(k, len(reply) - 1)]] = 1.0
            return logits

    rows = [{"question": "1 + 1?", "answer": "2"}, {"question": "2 + 1?", "answer": "3"}]
    report = evaluate_reasoning(Scripted(), tok, rows, max_new_tokens=32, batch_size=2)
    assert (report.n, report.well_formed, report.correct) == (2, 2, 1)
    assert report.compliance == 1.0 and report.accuracy == 0.5


def test_train_distill_reason_runs_end_to_end(tok, tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "sft", MiniLLM(ModelConfig.preset("debug", vocab_size=tok.vocab_size)), tok)
    data = tmp_path / "r1.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS * 4), encoding="utf-8")
    held = tmp_path / "held.jsonl"
    held.write_text('{"question": "Please compute 1 + 2.", "answer": "3"}\n'
                    '{"question": "计算3加4。", "answer": "7"}\n', encoding="utf-8")
    trainer = train_distill_reason.main([
        "--init_from", str(tmp_path / "sft"), "--data_path", str(data), "--report_path", str(held),
        "--report_max_new_tokens", "8", "--save_dir", str(tmp_path / "out"), "--max_steps", "2",
        "--batch_size", "4", "--device", "cpu", "--num_workers", "0", "--use_tensorboard", "0",
        "--use_compile", "0"])
    assert trainer.step == 2
    assert (tmp_path / "out" / "reason" / "model.safetensors").is_file()
    assert trainer.reasoning_report.n == 2
    saved = yaml.safe_load((tmp_path / "out" / "reason" / "config.yaml").read_text())
    assert saved["stage"]["tag_weight"] == 10.0 and saved["stage"]["report_max_new_tokens"] == 8
