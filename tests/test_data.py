"""minillm.data: jsonl errors, the token cache, packing, samplers, SFT / DPO rows and collation."""
import json

import numpy as np
import pytest
import torch

from torch.utils.data import DataLoader

from minillm import data
from minillm.data import (DataError, DPODataset, LengthGroupedBatchSampler, PretrainDataset, ShardedBatchSampler, SFTDataset,
                          build_token_cache, dpo_collate, holdout_split, pad_collate, packed_collate, read_jsonl)
from minillm.data import jsonl as jsonl_module
from minillm.data import pretrain as pretrain_module


class FakeTokenizer:
    """The Tokenizer API on one id per character, so expected rows can be written by hand."""
    pad_id, eos_id, im_start_id, im_end_id = 0, 1, 2, 3
    vocab_size = 300
    fingerprint = "fake-v1"

    def __init__(self):
        self.calls = 0

    def encode(self, text):
        self.calls += 1
        return [10 + ord(c) % 290 for c in text]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def render_chat(self, messages):
        ids, mask = [], []
        for m in messages:
            if m["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"bad role {m['role']!r}")
            head = [self.im_start_id] + self.encode(m["role"] + "\n")
            body = self.encode(m["content"]) + [self.im_end_id]
            learn = int(m["role"] == "assistant")
            ids += head + body + self.encode("\n")
            mask += [0] * len(head) + [learn] * len(body) + [0]
        return ids, mask


@pytest.fixture
def fake():
    return FakeTokenizer()


@pytest.fixture(params=["fake", "real"])
def tok(request):
    """Both the fake and the shipped SentencePiece tokenizer, where a test holds for any tokenizer."""
    if request.param == "fake":
        return FakeTokenizer()
    from minillm.tokenizer import Tokenizer
    return Tokenizer.load()


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


def conv(*turns):
    return [{"role": r, "content": c} for r, c in zip(("user", "assistant") * len(turns), turns)]


# ---------------------------------------------------------------------------------------------- pretraining

def test_packing_boundaries(tmp_path, tok):
    docs = ["hello world", "你好，世界", "abc", "the quick brown fox jumps"]
    src = write_jsonl(tmp_path / "pre.jsonl", [{"text": d} for d in docs])
    ds = PretrainDataset(src, tok, seq_len=8, num_workers=0)

    expected = [t for d in docs for t in tok.encode(d) + [tok.eos_id]]
    assert np.array_equal(np.asarray(ds.tokens), expected)  # EOS exactly after every document
    assert len(ds) == (len(expected) - 1) // 8
    for i in range(len(ds)):
        row = ds[i]  # 8 inputs and the 8 targets shifted by one: 9 ids
        assert row.dtype == torch.int64 and row.shape == (9,)
        assert row.tolist() == expected[i * 8: i * 8 + 9]
        if i:  # rows overlap by one: the last target of row i-1 is the first input of row i
            assert ds[i - 1][-1] == row[0]
    # every token after the first is a target exactly once
    targets = torch.cat([ds[i][1:] for i in range(len(ds))]).tolist()
    assert targets == expected[1: 1 + len(ds) * 8]
    batch = packed_collate([ds[0], ds[1]])
    assert batch["ids"].shape == (2, 9) and batch["n_targets"] == batch["n_tokens"] == 16


def test_corpus_shorter_than_a_row(tmp_path, tok):
    src = write_jsonl(tmp_path / "tiny.jsonl", [{"text": "ab"}])
    with pytest.raises(DataError, match="fewer than one row"):
        PretrainDataset(src, tok, seq_len=16, num_workers=0)


def test_cache_built_once_then_reused(tmp_path, fake):
    tok = fake
    src = write_jsonl(tmp_path / "pre.jsonl", [{"text": f"document {i}"} for i in range(20)])
    path = build_token_cache(src, tok, num_workers=0)
    assert path.parent == tmp_path and path.name.startswith("pre.jsonl.") and path.suffix == ".tokens"
    meta = json.loads(path.with_name(path.name + ".json").read_text())
    assert meta["n_docs"] == 20 and meta["dtype"] == "uint16" and meta["bad_lines"] == 0
    calls, mtime = tok.calls, path.stat().st_mtime_ns

    assert build_token_cache(src, tok, num_workers=0) == path
    PretrainDataset(src, tok, seq_len=4, num_workers=0)
    assert tok.calls == calls and path.stat().st_mtime_ns == mtime  # nothing tokenized again

    other = FakeTokenizer()
    other.fingerprint = "another-tokenizer"
    assert build_token_cache(src, other, num_workers=0) != path  # keyed by the tokenizer too


def test_half_written_cache_is_not_trusted(tmp_path, fake):
    tok = fake
    src = write_jsonl(tmp_path / "pre.jsonl", [{"text": "some text"}])
    path = build_token_cache(src, tok, num_workers=0)
    path.with_name(path.name + ".json").unlink()  # as if the run died before the sidecar
    calls = tok.calls
    assert build_token_cache(src, tok, num_workers=0) == path and tok.calls > calls


def test_cache_same_with_one_and_two_workers(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(jsonl_module, "_CHUNK_BYTES", 200)  # many chunks, so order across workers matters
    rows = [{"text": f"doc {i} " + "xyz" * (i % 7)} for i in range(300)]
    a = build_token_cache(write_jsonl(tmp_path / "a.jsonl", rows), tok, num_workers=1)
    b = build_token_cache(write_jsonl(tmp_path / "b.jsonl", rows), tok, num_workers=2)
    assert a.read_bytes() == b.read_bytes()


def test_unwritable_source_dir_falls_back_to_cache_dir(tmp_path, tok, monkeypatch):
    src = write_jsonl(tmp_path / "pre.jsonl", [{"text": "some text"}])
    monkeypatch.setenv("MINILLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrain_module.os, "access", lambda p, mode: False)
    path = build_token_cache(src, tok, num_workers=0)
    assert path.parent == tmp_path / "cache"
    assert build_token_cache(src, tok, num_workers=0) == path


# ---------------------------------------------------------------------------------------------- bad lines

PRE, SFT, DPO = "pretrain", "sft", "dpo"


@pytest.mark.parametrize("fmt, line, reason", [
    (PRE, '{"text": "ok"', "invalid JSON"),
    (PRE, '["text"]', "expected a JSON object"),
    (PRE, '{"txt": "ok"}', 'missing field "text"'),
    (PRE, '{"text": ""}', 'field "text" is empty'),
    (PRE, '{"text": 5}', 'field "text" must be a string'),
    (SFT, '{"conversations": []}', 'field "conversations" is empty'),
    (SFT, '{"conversations": [{"role": "bot", "content": "hi"}]}', "has role 'bot'"),
    (SFT, '{"conversations": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    (SFT, '{"conversations": [{"role": "user"}]}', 'no string "content"'),
    (DPO, '{"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "assistant", "content": "a"}]}',
     '"chosen" must end with an assistant turn'),
    # tool use (MiniMind-3's fields): each mistake named where it is
    (SFT, '{"conversations": [{"role": "user", "content": "q", "tool_calls": [{"name": "f"}]}, '
          '{"role": "assistant", "content": "a"}]}', '"conversations"[0] (user) has "tool_calls"; only assistant'),
    (SFT, '{"conversations": [{"role": "system", "content": "s", "tools": "[{\\"name\\": "}, '
          '{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
     '"conversations"[0] (system) "tools" is a string that is not valid JSON'),
    (SFT, '{"conversations": [{"role": "user", "content": "q", "tools": [{"name": "f"}]}, '
          '{"role": "assistant", "content": "a"}]}', 'tools belong on the system message'),
    (SFT, '{"tools": ["f"], "conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
     'the row "tools"[0] is a string, not a JSON schema object'),
    (SFT, '{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", '
          '"tool_calls": "[{\\"arguments\\": {}}]"}]}', '"conversations"[1] (assistant) "tool_calls"[0] needs a "name"'),
    (SFT, '{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", '
          '"tool_calls": [{"name": "f", "arguments": 3}]}]}', '"arguments" must be an object'),
    (SFT, '{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}',
     '"conversations"[1] (assistant) has empty "content"'),
    (SFT, '{"conversations": [{"role": "user", "content": "q"}, {"role": "tool", "content": 5}, '
          '{"role": "assistant", "content": "a"}]}', '"conversations"[1] (tool) "content" must be a string'),
])
def test_bad_line_names_file_line_and_reason(tmp_path, fmt, line, reason):
    good = {PRE: '{"text": "fine"}', SFT: json.dumps({"conversations": conv("q", "a")}),
            DPO: json.dumps({"chosen": conv("q", "a"), "rejected": conv("q", "b")})}[fmt]
    src = write_jsonl(tmp_path / "d.jsonl", [good, "", line, good])  # blank line 2 is ignored
    required, check = data.FORMATS[fmt]
    with pytest.raises(DataError) as e:
        list(read_jsonl(src, required, check=check))
    assert f"{src}:3: " in str(e.value) and reason in str(e.value) and "--skip_bad_lines" in str(e.value)


def test_skip_bad_counts_and_reports(tmp_path, tok):
    src = write_jsonl(tmp_path / "pre.jsonl", [{"text": "good one"}, "not json", {"text": ""}, {"text": "good two"}])
    report = data.BadLineReport(str(src))
    rows = list(read_jsonl(src, {"text": str}, skip_bad=True, report=report))
    assert [n for n, _ in rows] == [1, 4]
    assert str(report).startswith(f"skipped 2 bad lines in {src} (first: {src}:2: invalid JSON")

    with pytest.raises(DataError, match=f"{src}:2: invalid JSON"):
        build_token_cache(src, tok, num_workers=0)
    ds = PretrainDataset(src, tok, seq_len=4, skip_bad=True, num_workers=0)
    assert ds.bad_lines.count == 2 and ds.meta["n_docs"] == 2
    # a cache that skipped lines is not silently reused by a run that did not ask to skip
    with pytest.raises(DataError, match=f"{src}:2: invalid JSON"):
        build_token_cache(src, tok, num_workers=0)


def test_missing_file(tmp_path, tok):
    missing = tmp_path / "nope.jsonl"
    for call in (lambda: list(read_jsonl(missing)), lambda: build_token_cache(missing, tok),
                 lambda: SFTDataset(missing, tok, 16)):
        with pytest.raises(FileNotFoundError, match="nope.jsonl"):
            call()


# ---------------------------------------------------------------------------------------------- samplers

def take(it, k):
    it = iter(it)
    return [next(it) for _ in range(k)]


def rows_per_step(sampler_of, world_size, accumulation_steps, epoch=0):
    """[set of rows] per optimizer step, gathered over every rank's micro-batches."""
    per_rank = []
    for rank in range(world_size):
        sampler = sampler_of(rank)
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
    n_micro = len(per_rank[0])
    assert all(len(r) == n_micro for r in per_rank) and n_micro % accumulation_steps == 0
    steps = []
    for start in range(0, n_micro, accumulation_steps):
        rows = [i for r in per_rank for mb in r[start: start + accumulation_steps] for i in mb]
        assert all(len(mb) > 0 for r in per_rank for mb in r[start: start + accumulation_steps])
        steps.append(sorted(rows))
    return steps


SPLITS = [(8, 1, 1), (2, 1, 4), (4, 2, 1), (1, 2, 4), (2, 4, 1)]  # batch x ranks x accumulation = 8


@pytest.mark.parametrize("batch, world, accum", SPLITS)
def test_sharded_sampler_steps_do_not_depend_on_the_split(batch, world, accum):
    """Which rows train together in an optimizer step depends on batch x ranks x accumulation only."""
    one = rows_per_step(lambda r: ShardedBatchSampler(70, 8, seed=5), 1, 1)
    split = rows_per_step(lambda r: ShardedBatchSampler(70, batch, r, world, accum, seed=5), world, accum)
    assert split == one and len(one) == 70 // 8
    assert sorted(i for step in one for i in step) == sorted(set(i for step in one for i in step))  # no repeats


@pytest.mark.parametrize("batch, world, accum", SPLITS)
def test_length_grouped_steps_do_not_depend_on_the_split(batch, world, accum):
    lengths = np.random.default_rng(0).integers(1, 200, size=200)
    one = rows_per_step(lambda r: LengthGroupedBatchSampler(lengths, 8, seed=1, mega_batch_mult=4), 1, 1)
    split = rows_per_step(lambda r: LengthGroupedBatchSampler(lengths, batch, r, world, accum, seed=1,
                                                              mega_batch_mult=4), world, accum)
    assert split == one
    assert sorted(i for step in one for i in step) == list(range(200))  # every row once


def test_short_last_step_is_kept_when_every_micro_batch_gets_a_row():
    lengths = np.random.default_rng(0).integers(1, 200, size=203)  # 25 steps of 8 and one of 3
    rows = [i for step in rows_per_step(lambda r: LengthGroupedBatchSampler(lengths, 8, seed=1), 1, 1) for i in step]
    assert sorted(rows) == list(range(203))
    # split into 2 ranks x 2 micro-batches, 3 rows cannot give each a row: that step is left out
    steps = rows_per_step(lambda r: LengthGroupedBatchSampler(lengths, 2, r, 2, 2, seed=1), 2, 2)
    assert len(steps) == 25 and all(len(step) == 8 for step in steps)


def test_samplers_resume_mid_epoch():
    for make in (lambda: ShardedBatchSampler(70, 4, rank=1, world_size=2, accumulation_steps=2, seed=5),
                 lambda: LengthGroupedBatchSampler(np.arange(70) % 17 + 1, 4, 1, 2, 2, seed=5, mega_batch_mult=2)):
        full, resumed = make(), make()
        full.set_epoch(1)
        resumed.set_epoch(1, 4)  # the trainer's resume call: epoch 1, four micro-batches done
        assert list(resumed) == list(full)[4:] and len(resumed) == len(full) - 4
        other_epoch = make()
        assert list(other_epoch) != list(full)  # epoch 0's order differs


def test_length_grouped_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=500)
    single = list(LengthGroupedBatchSampler(lengths, batch_size=8, seed=1, mega_batch_mult=4))
    assert sorted(i for b in single for i in b) == list(range(500))  # every row once

    def padded(batches):
        return sum(len(b) * lengths[b].max() for b in batches) / sum(lengths[b].sum() for b in batches)
    random_batches = [np.arange(500)[i:i + 8] for i in range(0, 500, 8)]
    assert padded(single) < 1.25 and padded(random_batches) > 1.6
    # with accumulation, each micro-batch still holds neighbours in length
    accumulated = list(LengthGroupedBatchSampler(lengths, batch_size=2, accumulation_steps=4, seed=1, mega_batch_mult=4))
    assert padded(accumulated) < 1.25


def test_holdout_split_is_seeded_and_disjoint():
    class Rows:
        lengths = np.arange(100) + 1

        def __len__(self):
            return 100

        def __getitem__(self, i):
            return i
    train, held = holdout_split(Rows(), 0.1, seed=3)
    assert len(held) == 10 and len(train) == 90
    assert set(train[i] for i in range(90)).isdisjoint(held[i] for i in range(10))
    assert held.lengths.tolist() == [held[i] + 1 for i in range(10)]
    again, _ = holdout_split(Rows(), 0.1, seed=3)
    assert list(again.indices) == list(train.indices)
    with pytest.raises(ValueError, match="eval_split"):
        holdout_split(Rows(), 1.5, seed=3)


# ---------------------------------------------------------------------------------------------- SFT / DPO

def expected_row(tok, messages, max_seq_len):
    ids, mask = tok.render_chat(messages)
    return ids[:max_seq_len + 1], [bool(m) for m in mask[:max_seq_len + 1]]


def test_sft_items_are_the_rendered_conversation(tmp_path, tok):
    three_turns = [{"role": "system", "content": "be brief"}] + conv("hi", "hello!", "2+2?", "4", "bye", "ciao")
    src = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": three_turns}, {"conversations": conv("q", "a")}])
    ds = SFTDataset(src, tok, max_seq_len=512, num_workers=0)
    assert len(ds) == 2
    item = ds[0]
    ids, mask = expected_row(tok, three_turns, 512)
    assert item["ids"].tolist() == ids and item["loss_mask"].tolist() == mask
    # the masked tokens are exactly the three assistant answers, each followed by <|im_end|>
    learned = [t for t, m in zip(ids, mask) if m]
    assert learned == [t for a in ("hello!", "4", "ciao") for t in tok.encode(a) + [tok.im_end_id]]
    assert ds.lengths.tolist() == [len(ds[0]["ids"]) - 1, len(ds[1]["ids"]) - 1]


def test_sft_truncation_and_rows_with_nothing_to_learn(tmp_path, tok):
    long_answer = conv("q", "a long answer " * 10)
    long_question = conv("a very long question " * 10, "short")
    src = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": long_answer}, {"conversations": long_question}])
    ds = SFTDataset(src, tok, max_seq_len=40, num_workers=0)
    assert len(ds) == 1 and ds.n_no_target == 1 and "1 rows skipped" in ds.report()
    item = ds[0]
    ids, mask = expected_row(tok, long_answer, 40)
    assert len(item["ids"]) == len(item["loss_mask"]) == 41  # 40 inputs + the last target
    assert item["ids"].tolist() == ids and item["loss_mask"].tolist() == mask
    assert item["loss_mask"][-1]  # the answer runs to the row's end, its last target is real


def test_sft_system_prompt_insertion_is_deterministic(tmp_path, tok):
    rows = [{"conversations": conv(f"q{i}", f"a{i}")} for i in range(40)]
    rows.append({"conversations": [{"role": "system", "content": "own"}] + conv("q", "a")})
    src = write_jsonl(tmp_path / "sft.jsonl", rows)
    kw = dict(system_prompts=["SYS-A", "SYS-B"], system_prompt_prob=0.5, seed=3, num_workers=0)
    a, b = SFTDataset(src, tok, 128, **kw), SFTDataset(src, tok, 128, **kw)
    start = 1 + len(tok.encode("system\n"))  # after <|im_start|>system\n

    def has_prompt(item, prompt):
        ids = tok.encode(prompt)
        return item["ids"][start:start + len(ids)].tolist() == ids
    sys_a = [has_prompt(a[i], "SYS-A") for i in range(len(a))]
    sys_b = [has_prompt(a[i], "SYS-B") for i in range(len(a))]
    assert 5 < sum(sys_a) + sum(sys_b) < 35 and sum(sys_a) > 0 and sum(sys_b) > 0
    assert not sys_a[-1] and not sys_b[-1]  # a conversation with its own system prompt keeps it
    assert all(torch.equal(a[i]["ids"], b[i]["ids"]) for i in range(len(a)))


def test_pad_collate_by_hand(tmp_path, fake):
    tok = fake
    collate = pad_collate(tok.pad_id)
    items = [{"ids": torch.tensor([5, 6, 7]), "loss_mask": torch.tensor([False, True, False])},
             {"ids": torch.tensor([7, 8, 9, 10, 11]), "loss_mask": torch.tensor([False, False, True, True, True])}]
    batch = collate(items)
    assert batch["ids"].tolist() == [[5, 6, 7, 0, 0], [7, 8, 9, 10, 11]]
    assert batch["loss_mask"].tolist() == [[False, True, False, False, False], [False, False, True, True, True]]
    # counts the trainer totals per step: real input positions and targets (mask after the first token)
    assert batch["n_tokens"] == 2 + 4 and batch["n_targets"] == 1 + 3 and batch["n_rows"] == 2
    assert collate.padding_fraction() == pytest.approx(2 / 8)
    collate([{"ids": torch.tensor([1, 2, 3, 4]), "loss_mask": torch.ones(4, dtype=torch.bool)}])
    assert collate.padding_fraction() == pytest.approx(2 / 11)


def test_sft_dataloader_counts_padding_across_workers(tmp_path, tok):
    rows = [{"conversations": conv("q" * (i % 13 + 1), "a" * (i % 5 + 1))} for i in range(64)]
    ds = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", rows), tok, 128, num_workers=0)
    sampler = LengthGroupedBatchSampler(ds.lengths, batch_size=8, seed=0)
    expected_real = int(ds.lengths.sum())
    expected_total = sum(len(b) * int(ds.lengths[b].max()) for b in sampler)
    for workers in (0, 2):
        collate = pad_collate(tok.pad_id)
        loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
        assert sum(b["n_tokens"] for b in loader) == expected_real
        assert collate.padding_fraction() == pytest.approx(1 - expected_real / expected_total)


def test_dpo_items_and_collate(tmp_path, tok):
    chosen, rejected = conv("question?", "a good, long answer"), conv("question?", "bad")
    src = write_jsonl(tmp_path / "dpo.jsonl", [{"chosen": chosen, "rejected": rejected},
                                               {"chosen": conv("hi", "hello"), "rejected": conv("hi", "go away!")}])
    ds = DPODataset(src, tok, max_seq_len=64, num_workers=0)
    item = ds[0]
    for side, messages in (("chosen", chosen), ("rejected", rejected)):
        ids, mask = expected_row(tok, messages, 64)
        assert item[f"{side}_ids"].tolist() == ids and item[f"{side}_loss_mask"].tolist() == mask

    batch = dpo_collate(tok.pad_id)([ds[0], ds[1]])
    longest = max(len(ds[i][f"{s}_ids"]) for i in range(2) for s in ("chosen", "rejected"))
    assert {tuple(batch[k].shape) for k in ("chosen_ids", "chosen_loss_mask", "rejected_ids",
                                             "rejected_loss_mask")} == {(2, longest)}
    for side in ("chosen", "rejected"):
        for i in range(2):
            n = len(ds[i][f"{side}_ids"])
            assert batch[f"{side}_ids"][i, n:].eq(tok.pad_id).all()
            assert not batch[f"{side}_loss_mask"][i, n:].any()
            assert torch.equal(batch[f"{side}_loss_mask"][i, :n], ds[i][f"{side}_loss_mask"])
        assert batch[f"n_{side}_targets"] == sum(int(ds[i][f"{side}_loss_mask"][1:].sum()) for i in range(2))
    assert batch["n_rows"] == 2


# ---------------------------------------------------------------------------------------------- tool use
TOOL_ROW = {"conversations": [
    {"role": "system", "content": "You can compute.",
     "tools": '[{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]'},
    {"role": "user", "content": "What is 36 * 17?"},
    {"role": "assistant", "content": "", "tool_calls": '[{"name": "calculator", "arguments": {"expression": "36 * 17"}}]'},
    {"role": "tool", "content": '{"result": 612}'},
    {"role": "assistant", "content": "It is 612."},
    {"role": "user", "content": "And 2 + 3?"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "c2", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "2 + 3"}'}}]},
    {"role": "tool", "tool_call_id": "c2", "content": '{"result": 5}'},
    {"role": "assistant", "content": "It is 5."}]}


def test_multi_turn_tool_rows_train_on_calls_and_replies_only(tmp_path):
    """MiniMind-3's tool rows (tools and tool_calls as JSON strings) and OpenAI-shaped calls load as they are;
    the loss mask covers each call and reply with its <|im_end|>, never the schemas or a tool's result."""
    from minillm.tokenizer import Tokenizer, render_tools
    tok = Tokenizer.load()
    src = write_jsonl(tmp_path / "sft.jsonl", [TOOL_ROW, {"conversations": conv("q", "a")}])
    ds = SFTDataset(src, tok, max_seq_len=1024, num_workers=0,
                    system_prompts=["SYS"], system_prompt_prob=1.0)  # a tool row gets no random system prompt
    assert len(ds) == 2 and not ds.bad_lines
    ids, mask = ds[0]["ids"].tolist(), ds[0]["loss_mask"].tolist()
    tools = json.loads(TOOL_ROW["conversations"][0]["tools"])
    assert tok.decode(ids).startswith("<|im_start|>system\nYou can compute.\n\n" + render_tools(tools) + "<|im_end|>")
    learned = tok.decode([t for t, m in zip(ids, mask) if m])
    assert learned == ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "36 * 17"}}\n</tool_call>'
                       '<|im_end|>It is 612.<|im_end|>Checking.\n'
                       '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2 + 3"}}\n</tool_call>'
                       '<|im_end|>It is 5.<|im_end|>')
    not_learned = tok.decode([t for t, m in zip(ids, mask) if not m])
    assert '{"result": 612}' in not_learned and '{"result": 5}' in not_learned and '"parameters"' in not_learned
    # the same row as render_chat gives it, with its tools
    messages = json.loads(json.dumps(TOOL_ROW["conversations"]))
    messages[2]["tool_calls"] = json.loads(messages[2]["tool_calls"])
    assert (ids, [int(m) for m in mask]) == tok.render_chat(messages, tools=tools)
    assert "SYS" in tok.decode(ds[1]["ids"].tolist())
    # DPO pairs may call tools too (the row's "tools" here)
    pair = {"tools": tools, "chosen": TOOL_ROW["conversations"][1:5],
            "rejected": TOOL_ROW["conversations"][1:2] + [{"role": "assistant", "content": "No idea."}]}
    dpo = DPODataset(write_jsonl(tmp_path / "dpo.jsonl", [pair]), tok, max_seq_len=1024, num_workers=0)
    chosen = tok.decode(dpo[0]["chosen_ids"].tolist())
    assert chosen.startswith("<|im_start|>system\n# Tools") and "<tool_response>" in chosen


def test_empty_think_ratio_gives_that_share_of_plain_replies_an_empty_think_block(tmp_path):
    """Adaptive thinking (MiniMind's post_processing_chat): a seeded share of rows write the empty think
    block before each plain reply (learned, so the model answers after it); reasoning rows keep theirs."""
    from minillm.tokenizer import THINK_OFF_PREFILL, Tokenizer
    tok = Tokenizer.load()
    rows = [{"conversations": conv(f"q{i}", f"a{i}", "more", "ok")} for i in range(60)]
    rows.append({"conversations": [{"role": "user", "content": "2+2?"},
                                   {"role": "assistant", "content": "4", "reasoning_content": "two and two"}]})
    src = write_jsonl(tmp_path / "sft.jsonl", rows)
    a = SFTDataset(src, tok, 256, num_workers=0, empty_think_ratio=0.3, seed=1)
    b = SFTDataset(src, tok, 256, num_workers=0, empty_think_ratio=0.3, seed=1)
    plain = SFTDataset(src, tok, 256, num_workers=0)
    empty = [tok.decode(a[i]["ids"].tolist()).count("<|im_start|>assistant\n" + THINK_OFF_PREFILL) for i in range(60)]
    assert set(empty) == {0, 2} and 8 <= empty.count(2) <= 30  # every reply of a chosen row, about 30% of rows
    assert all(torch.equal(a[i]["ids"], b[i]["ids"]) for i in range(len(a)))  # seeded
    for i in range(60):
        ids, mask = a[i]["ids"].tolist(), a[i]["loss_mask"].tolist()
        if empty[i]:
            want = THINK_OFF_PREFILL + f"a{i}<|im_end|>" + THINK_OFF_PREFILL + "ok<|im_end|>"
            assert tok.decode([t for t, m in zip(ids, mask) if m]) == want
        else:
            assert torch.equal(a[i]["ids"], plain[i]["ids"])
    assert torch.equal(a[60]["ids"], plain[60]["ids"])  # the reasoning row: its own think block only
    with pytest.raises(DataError, match="empty_think_ratio 1.5"):
        SFTDataset(src, tok, 256, empty_think_ratio=1.5)
