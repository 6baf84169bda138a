"""minillm.data: jsonl errors, the token cache, packing, samplers, SFT / DPO rows and collation."""
import json

import numpy as np
import pytest
import torch

from minillm import data
from minillm.data import (DataError, DPODataset, LengthGroupedBatchSampler, PretrainDataset, ShardedBatchSampler, SFTDataset,
                          ShardedSampler, build_dataloader, build_token_cache, dpo_collate, pad_collate, read_jsonl)


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
        item = ds[i]
        assert item["input_ids"].dtype == torch.int64 and item["input_ids"].shape == (8,)
        assert torch.equal(item["input_ids"][1:], item["labels"][:-1])  # shifted by one
        assert item["input_ids"].tolist() == expected[i * 8: i * 8 + 8]
        if i:  # rows overlap by one: the last target of row i-1 is the first input of row i
            assert ds[i - 1]["labels"][-1] == item["input_ids"][0]
    # every token after the first is a target exactly once
    targets = torch.cat([ds[i]["labels"] for i in range(len(ds))]).tolist()
    assert targets == expected[1: 1 + len(ds) * 8]


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
    monkeypatch.setattr(data, "_CHUNK_BYTES", 200)  # many chunks, so order across workers matters
    rows = [{"text": f"doc {i} " + "xyz" * (i % 7)} for i in range(300)]
    a = build_token_cache(write_jsonl(tmp_path / "a.jsonl", rows), tok, num_workers=1)
    b = build_token_cache(write_jsonl(tmp_path / "b.jsonl", rows), tok, num_workers=2)
    assert a.read_bytes() == b.read_bytes()


def test_unwritable_source_dir_falls_back_to_cache_dir(tmp_path, tok, monkeypatch):
    src = write_jsonl(tmp_path / "pre.jsonl", [{"text": "some text"}])
    monkeypatch.setenv("MINILLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data.os, "access", lambda p, mode: False)
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


def test_sampler_ranks_interleave_single_process_order():
    n, b = 103, 4
    single = list(ShardedSampler(n, seed=7))
    ranks = [list(ShardedSampler(n, rank=r, world_size=2, seed=7)) for r in range(2)]
    assert sorted(single) == list(range(n))
    assert len(ranks[0]) == len(ranks[1]) == n // 2
    for step in range(len(ranks[0]) // b):  # per-rank batch b == single-process batch 2b
        global_batch = ranks[0][step * b:(step + 1) * b] + ranks[1][step * b:(step + 1) * b]
        assert set(global_batch) == set(single[step * 2 * b:(step + 1) * 2 * b])


def test_sampler_resume_and_epochs():
    s = ShardedSampler(50, rank=1, world_size=2, seed=3)
    s.set_epoch(2)
    full = list(s)
    state = s.state_dict(consumed=9)
    resumed = ShardedSampler(50, rank=1, world_size=2, seed=3)
    resumed.load_state_dict(state)
    assert list(resumed) == full[9:] and len(resumed) == len(full) - 9
    # the same global position resumes on one process too
    one = ShardedSampler(50, seed=3)
    one.load_state_dict(state)
    one_full = ShardedSampler(50, seed=3)
    one_full.set_epoch(2)
    assert list(one) == list(one_full)[18:]

    s.set_epoch(3)
    other_rank = ShardedSampler(50, rank=0, world_size=2, seed=3)
    other_rank.set_epoch(3)
    assert list(s) != full and sorted(list(s) + list(other_rank)) == list(range(50))
    assert list(ShardedSampler(10, shuffle=False)) == list(range(10))
    with pytest.raises(ValueError, match="data or seed changed"):
        ShardedSampler(51, rank=1, world_size=2, seed=3).load_state_dict(state)


def test_sharded_batch_sampler_matches_single_process_and_resumes():
    single = list(ShardedBatchSampler(70, batch_size=8, seed=5))
    ranks = [list(ShardedBatchSampler(70, batch_size=4, rank=r, world_size=2, seed=5)) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 70 // 8
    for one, r0, r1 in zip(single, *ranks):
        assert set(one) == set(r0) | set(r1) and len(r0) == len(r1) == 4
    s = ShardedBatchSampler(70, batch_size=4, rank=1, world_size=2, seed=5)
    s.set_epoch(1, 3)  # the trainer's resume call: epoch 1, batch 3
    assert len(s) == 8 - 3
    full = ShardedBatchSampler(70, batch_size=4, rank=1, world_size=2, seed=5)
    full.set_epoch(1)
    assert list(s) == list(full)[3:] and list(full) != ranks[1]


def test_length_grouped_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=500)
    single = list(LengthGroupedBatchSampler(lengths, batch_size=8, seed=1, mega_batch_mult=4))
    assert sorted(i for b in single for i in b) == list(range(500))  # every row once
    ranks = [list(LengthGroupedBatchSampler(lengths, 4, rank=r, world_size=2, seed=1, mega_batch_mult=4))
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for one, r0, r1 in zip(single, *ranks):
        assert set(one) == set(r0) | set(r1)  # same global batches as one process with 2x batch

    def padded(batches):
        return sum(len(b) * lengths[b].max() for b in batches) / sum(lengths[b].sum() for b in batches)
    random_batches = [np.arange(500)[i:i + 8] for i in range(0, 500, 8)]
    assert padded(single) < 1.25 and padded(random_batches) > 1.6

    s = LengthGroupedBatchSampler(lengths, 8, seed=1, mega_batch_mult=4)
    s.set_epoch(1)
    full = list(s)
    assert full != single
    r = LengthGroupedBatchSampler(lengths, 8, seed=1, mega_batch_mult=4)
    r.load_state_dict(s.state_dict(consumed=5))
    assert list(r) == full[5:] and len(r) == len(full) - 5


# ---------------------------------------------------------------------------------------------- SFT / DPO

def expected_row(tok, messages, max_seq_len):
    ids, mask = tok.render_chat(messages)
    ids, mask = ids[:max_seq_len + 1], mask[:max_seq_len + 1]
    return ids[:-1], [t if m else -100 for t, m in zip(ids[1:], mask[1:])]


def test_sft_labels_are_masked_targets(tmp_path, tok):
    three_turns = [{"role": "system", "content": "be brief"}] + conv("hi", "hello!", "2+2?", "4", "bye", "ciao")
    src = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": three_turns}, {"conversations": conv("q", "a")}])
    ds = SFTDataset(src, tok, max_seq_len=512, num_workers=0)
    assert len(ds) == 2
    item = ds[0]
    ids, labels = expected_row(tok, three_turns, 512)
    assert item["input_ids"].tolist() == ids and item["labels"].tolist() == labels
    # the learned tokens are exactly the three assistant answers, each followed by <|im_end|>
    learned = [t for t in labels if t != -100]
    assert learned == [t for a in ("hello!", "4", "ciao") for t in tok.encode(a) + [tok.im_end_id]]
    assert ds.lengths.tolist() == [len(ds[0]["input_ids"]), len(ds[1]["input_ids"])]


def test_sft_truncation_and_rows_with_nothing_to_learn(tmp_path, tok):
    long_answer = conv("q", "a long answer " * 10)
    long_question = conv("a very long question " * 10, "short")
    src = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": long_answer}, {"conversations": long_question}])
    ds = SFTDataset(src, tok, max_seq_len=40, num_workers=0)
    assert len(ds) == 1 and ds.n_no_target == 1 and "1 rows skipped" in ds.report()
    item = ds[0]
    ids, labels = expected_row(tok, long_answer, 40)
    assert len(item["input_ids"]) == len(item["labels"]) == 40
    assert item["input_ids"].tolist() == ids and item["labels"].tolist() == labels
    assert item["labels"][-1] != -100  # the answer runs to the row's end, its last target is real


def test_sft_system_prompt_insertion_is_deterministic(tmp_path, tok):
    rows = [{"conversations": conv(f"q{i}", f"a{i}")} for i in range(40)]
    rows.append({"conversations": [{"role": "system", "content": "own"}] + conv("q", "a")})
    src = write_jsonl(tmp_path / "sft.jsonl", rows)
    kw = dict(system_prompts=["SYS-A", "SYS-B"], system_prompt_prob=0.5, seed=3, num_workers=0)
    a, b = SFTDataset(src, tok, 128, **kw), SFTDataset(src, tok, 128, **kw)
    start = 1 + len(tok.encode("system\n"))  # after <|im_start|>system\n

    def has_prompt(item, prompt):
        ids = tok.encode(prompt)
        return item["input_ids"][start:start + len(ids)].tolist() == ids
    sys_a = [has_prompt(a[i], "SYS-A") for i in range(len(a))]
    sys_b = [has_prompt(a[i], "SYS-B") for i in range(len(a))]
    assert 5 < sum(sys_a) + sum(sys_b) < 35 and sum(sys_a) > 0 and sum(sys_b) > 0
    assert not sys_a[-1] and not sys_b[-1]  # a conversation with its own system prompt keeps it
    assert all(torch.equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(len(a)))


def test_pad_collate_padding_fraction_by_hand(tmp_path, fake):
    tok = fake
    collate = pad_collate(tok.pad_id)
    items = [{"input_ids": torch.tensor([5, 6]), "labels": torch.tensor([6, -100])},
             {"input_ids": torch.tensor([7, 8, 9, 10]), "labels": torch.tensor([8, 9, 10, 11])}]
    batch = collate(items)
    assert batch["input_ids"].tolist() == [[5, 6, 0, 0], [7, 8, 9, 10]]
    assert batch["labels"].tolist() == [[6, -100, -100, -100], [8, 9, 10, 11]]
    assert collate.padding_fraction() == pytest.approx(2 / 8)
    collate([{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([2, 3, 4])}])
    assert collate.padding_fraction() == pytest.approx(2 / 11)


def test_sft_dataloader_counts_padding_across_workers(tmp_path, tok):
    rows = [{"conversations": conv("q" * (i % 13 + 1), "a" * (i % 5 + 1))} for i in range(64)]
    ds = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", rows), tok, 128, num_workers=0)
    sampler = LengthGroupedBatchSampler(ds.lengths, batch_size=8, seed=0)
    expected_real = int(ds.lengths.sum())
    expected_total = sum(len(b) * int(ds.lengths[b].max()) for b in sampler)
    for workers in (0, 2):
        collate = pad_collate(tok.pad_id)
        loader = build_dataloader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
        assert sum(int(b["input_ids"].numel()) for b in loader) == expected_total
        assert collate.padding_fraction() == pytest.approx(1 - expected_real / expected_total)


def test_dpo_items_and_collate(tmp_path, tok):
    chosen, rejected = conv("question?", "a good, long answer"), conv("question?", "bad")
    src = write_jsonl(tmp_path / "dpo.jsonl", [{"chosen": chosen, "rejected": rejected},
                                               {"chosen": conv("hi", "hello"), "rejected": conv("hi", "go away!")}])
    ds = DPODataset(src, tok, max_seq_len=64, num_workers=0)
    item = ds[0]
    for side, messages in (("chosen", chosen), ("rejected", rejected)):
        ids, labels = expected_row(tok, messages, 64)
        assert item[f"{side}_input_ids"].tolist() == ids and item[f"{side}_labels"].tolist() == labels

    batch = dpo_collate(tok.pad_id)([ds[0], ds[1]])
    longest = max(len(ds[i][k]) for i in range(2) for k in ("chosen_input_ids", "rejected_input_ids"))
    assert {tuple(t.shape) for t in batch.values()} == {(2, longest)}
    for side in ("chosen", "rejected"):
        for i in range(2):
            n = len(ds[i][f"{side}_input_ids"])
            assert batch[f"{side}_input_ids"][i, n:].eq(tok.pad_id).all()
            assert batch[f"{side}_labels"][i, n:].eq(-100).all()
            assert torch.equal(batch[f"{side}_labels"][i, :n], ds[i][f"{side}_labels"])
    torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # one forward for both
