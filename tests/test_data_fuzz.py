"""Bad data, every stage (issue 14): each loader, built as its stage script builds it with the shipped
tokenizer, meets broken lines. A bad line is a DataError naming `file:line` and the reason, or with
skip_bad=True a counted skip that leaves the good rows (ids and loss masks) exactly as a clean file
gives them; in-process and multiprocess builds agree; a BOM or CRLF endings change nothing; an empty
file is a clear error; a failed pretraining build caches nothing; and a stage script exits 2 with
`file:line`, never a traceback."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minillm.data import DataError, DPODataset, PretrainDataset, SFTDataset
from minillm.data import jsonl as jsonl_module
from minillm.tokenizer import Tokenizer, render_reasoning

TOK = Tokenizer.load()
REPO = Path(__file__).resolve().parent.parent
MAX_SEQ_LEN = 64
BOM = b"\xef\xbb\xbf"
SYSTEM_PROMPTS = ["You are a helpful assistant.", "你是一个乐于助人的助手。"]  # as train_full_sft adds them


def conv(*turns):
    return [{"role": r, "content": c} for r, c in zip(("user", "assistant") * len(turns), turns)]


# ---------------------------------------------------------------------------------------------- the stages

def build(stage, path, skip_bad=False, num_workers=0):
    """The dataset as the stage script builds it (SFT adds random system prompts; LoRA passes a seed)."""
    if stage == "pretrain":
        return PretrainDataset(path, TOK, 8, skip_bad=skip_bad, num_workers=num_workers)
    if stage == "sft":
        return SFTDataset(path, TOK, MAX_SEQ_LEN, skip_bad=skip_bad, system_prompts=SYSTEM_PROMPTS,
                          system_prompt_prob=0.5, seed=0, num_workers=num_workers)
    if stage == "lora":
        return SFTDataset(path, TOK, MAX_SEQ_LEN, skip_bad=skip_bad, seed=1337, num_workers=num_workers)
    if stage == "reasoning":
        return SFTDataset(path, TOK, MAX_SEQ_LEN, skip_bad=skip_bad, num_workers=num_workers)
    assert stage == "dpo"
    return DPODataset(path, TOK, MAX_SEQ_LEN, skip_bad=skip_bad, num_workers=num_workers)


def contents(ds):
    """Everything a stage trains on: the token stream, or every row's ids and loss mask."""
    if isinstance(ds, PretrainDataset):
        return np.asarray(ds.tokens).tolist()
    return [{k: v.tolist() for k, v in ds[i].items()} for i in range(len(ds))]


STAGES = ("pretrain", "sft", "lora", "dpo", "reasoning")
CHAT = ("sft", "lora", "dpo", "reasoning")

SFT_ROWS = [
    {"conversations": [{"role": "system", "content": "Be brief."}] + conv("What is 2+2?", "4.")},
    {"conversations": conv("Hi", "Hello! How can I help?", "Name a colour.", "Blue.")},
    {"conversations": conv("你好", "你好！有什么可以帮你？")},
    {"conversations": conv("Capital of France?", "Paris.")},
    {"conversations": [  # MiniMind-3's tool-use row: tools and tool_calls as JSON strings, a tool-role result
        {"role": "system", "content": "Tools ok.", "tools": '[{"name": "calculator", "parameters": {"type": "object"}}]'},
        {"role": "user", "content": "6 * 7?"},
        {"role": "assistant", "content": "", "tool_calls": '[{"name": "calculator", "arguments": {"expression": "6*7"}}]'},
        {"role": "tool", "content": '{"result": 42}'}, {"role": "assistant", "content": "42."}]},
]
GOOD = {
    "pretrain": [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "你好，世界。这是一个测试。"},
                 {"text": "minillm trains small models.\nA second line, \"quoted\"."}, {"text": "One more document."}],
    "sft": SFT_ROWS,
    "lora": SFT_ROWS,
    "dpo": [{"chosen": conv("2+2?", "4, because two and two make four."), "rejected": conv("2+2?", "5")},
            {"chosen": conv("你好", "你好！"), "rejected": conv("你好", "走开。")},
            {"chosen": [{"role": "system", "content": "Be kind."}] + conv("Hi", "Hello!"),
             "rejected": [{"role": "system", "content": "Be kind."}] + conv("Hi", "Go away.")},
            {"tools": [{"name": "calculator"}], "chosen": SFT_ROWS[4]["conversations"][1:],
             "rejected": conv("6 * 7?", "41.")}],
    "reasoning": [
        {"conversations": conv("2+2?", render_reasoning("Two and two make four.", "4"))},
        {"conversations": conv("3+4?") + [
            {"role": "assistant", "content": "7", "reasoning_content": "Three and four make seven."}]},
        {"conversations": conv("Think only.") + [{"role": "assistant", "content": "", "reasoning_content": "hmm"}]},
    ],
}


def encode(row) -> bytes:
    return row if isinstance(row, bytes) else json.dumps(row, ensure_ascii=False).encode()


def write(path, lines):
    path.write_bytes(b"".join(encode(x) + b"\n" for x in lines))
    return path


def with_text(stage, text):
    """A row of the stage whose free text (a document, a user turn) is `text`."""
    if stage == "pretrain":
        return {"text": text}
    if stage == "dpo":
        return {"chosen": conv(text, "a"), "rejected": conv(text, "b")}
    return {"conversations": conv(text, "a")}


def with_messages(stage, messages):
    """A chat row of the stage with `messages` (DPO: as the chosen side, the rejected side fine)."""
    if stage == "dpo":
        return {"chosen": messages, "rejected": conv("q", "b")}
    return {"conversations": messages}


def spliced(stage, marker_bytes):
    """A row whose text holds raw bytes that json.dumps cannot write (invalid UTF-8, a bad escape)."""
    return encode(with_text(stage, "MARK")).replace(b"MARK", marker_bytes)


FIELD = {"pretrain": "text", "sft": "conversations", "lora": "conversations", "reasoning": "conversations",
         "dpo": "chosen"}
HUGE = 5 * 1024 * 1024

# fault -> (stages, stage -> the bad line, stage -> a reason the error must give)
FAULTS = {
    "truncated": (STAGES, lambda s: encode(GOOD[s][1]).decode()[:20].encode(), lambda s: "truncated?"),
    "list": (STAGES, lambda s: b"[1, 2]", lambda s: "expected a JSON object, got a list"),
    "number": (STAGES, lambda s: b"42", lambda s: "expected a JSON object, got a number"),
    "null": (STAGES, lambda s: b"null", lambda s: "expected a JSON object, got null"),
    "string": (STAGES, lambda s: b'"just text"', lambda s: "expected a JSON object, got a string"),
    "invalid_utf8": (STAGES, lambda s: spliced(s, b"ab\xff\xfecd"), lambda s: "not valid UTF-8"),
    "utf8_surrogate": (STAGES, lambda s: spliced(s, b"\xed\xa0\x80"), lambda s: "not valid UTF-8"),
    "escaped_surrogate": (STAGES, lambda s: spliced(s, b"ok \\ud800 ok"), lambda s: "unpaired surrogate"),
    "deep_nesting": (STAGES, lambda s: b"[" * 200_000, lambda s: "nested too deeply"),
    "huge_number": (STAGES, lambda s: b'{"%s": %s}' % (FIELD[s].encode(), b"7" * 5000), lambda s: "invalid JSON"),
    "huge_truncated": (STAGES, lambda s: encode(with_text(s, "x" * HUGE))[:-4], lambda s: "invalid JSON"),
    "missing_field": (STAGES, lambda s: b'{"other": 1}', lambda s: f'missing field "{FIELD[s]}"'),
    "wrong_type": (STAGES, lambda s: encode({**GOOD[s][0], FIELD[s]: {"a": 5} if s == "dpo" else 5}),
                   lambda s: f'field "{FIELD[s]}" must be ' + ("a list, got an object" if s == "dpo" else
                                                              "a string, got a number" if s == "pretrain" else
                                                              "a list, got a number")),
    "empty_field": (STAGES, lambda s: encode({**GOOD[s][0], FIELD[s]: "" if s == "pretrain" else []}),
                    lambda s: f'field "{FIELD[s]}" is empty'),
    "no_assistant": (CHAT, lambda s: encode(with_messages(s, conv("q"))),
                     lambda s: '"chosen" must end with an assistant turn' if s == "dpo" else "no assistant turn"),
    "system_only": (CHAT, lambda s: encode(with_messages(s, [{"role": "system", "content": "s"}])),
                    lambda s: "must end with an assistant turn" if s == "dpo" else "no assistant turn"),
    "unknown_role": (CHAT, lambda s: encode(with_messages(s, [{"role": "bot", "content": "q"}] + conv("q", "a")[1:])),
                     lambda s: "has role 'bot'; expected one of system, user, assistant"),
    "huge_role": (CHAT, lambda s: encode(with_messages(s, [{"role": "r" * HUGE, "content": "q"}] + conv("q", "a")[1:])),
                  lambda s: "has role 'rrrr"),
    "missing_role": (CHAT, lambda s: encode(with_messages(s, [{"content": "q"}] + conv("q", "a")[1:])),
                     lambda s: 'has no "role"'),
    "sharegpt": (CHAT, lambda s: encode(with_messages(s, [{"from": "human", "value": "q"},
                                                          {"from": "gpt", "value": "a"}])),
                 lambda s: "ShareGPT"),
    "message_not_object": (CHAT, lambda s: encode(with_messages(s, ["q"] + conv("q", "a")[1:])),
                           lambda s: 'is a string, not a {"role", "content"} object'),
    "content_list": (CHAT, lambda s: encode(with_messages(s, [
        {"role": "user", "content": [{"type": "text", "text": "q"}]}, {"role": "assistant", "content": "a"}])),
                     lambda s: '(user) "content" must be a string, got a list'),
    "content_null": (CHAT, lambda s: encode(with_messages(s, conv("q") + [{"role": "assistant", "content": None}])),
                     lambda s: '(assistant) "content" must be a string, got null'),
    "content_missing": (CHAT, lambda s: encode(with_messages(s, conv("q") + [{"role": "assistant"}])),
                        lambda s: 'no string "content"'),
    "content_empty": (CHAT, lambda s: encode(with_messages(s, conv("", "a"))), lambda s: '(user) has empty "content"'),
    "reasoning_not_string": (CHAT, lambda s: encode(with_messages(s, conv("q") + [
        {"role": "assistant", "content": "a", "reasoning_content": ["r"]}])),
        lambda s: '"reasoning_content" must be a string, got a list'),
    "reasoning_on_user": (CHAT, lambda s: encode(with_messages(s, [
        {"role": "user", "content": "q", "reasoning_content": "r"}] + conv("q", "a")[1:])),
        lambda s: "only assistant turns may carry reasoning"),
    "reasoning_twice": (CHAT, lambda s: encode(with_messages(s, conv("q") + [
        {"role": "assistant", "content": render_reasoning("r", "a"), "reasoning_content": "r"}])),
        lambda s: "not both"),
    "tool_calls_not_json": (CHAT, lambda s: encode(with_messages(s, conv("q") + [
        {"role": "assistant", "content": "", "tool_calls": "[{'name': 'f'}]"}])),
        lambda s: '"tool_calls" is a string that is not valid JSON'),
    "tool_call_without_name": (CHAT, lambda s: encode(with_messages(s, conv("q") + [
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}])),
        lambda s: '"tool_calls"[0] needs a "name"'),
    "tool_calls_on_a_tool_message": (CHAT, lambda s: encode(with_messages(s, conv("q", "a") + [
        {"role": "tool", "content": "r", "tool_calls": [{"name": "f"}]}] + conv("q", "a")[1:])),
        lambda s: 'has "tool_calls"; only assistant turns call tools'),
    "tools_not_a_list": (CHAT, lambda s: encode({**with_messages(s, conv("q", "a")), "tools": {"name": "f"}}),
                         lambda s: 'the row "tools" must be a list, got an object'),
}
CASES = [(stage, fault) for fault, (stages, _, _) in FAULTS.items() for stage in stages]


def faulty_file(tmp_path, stage, bad_lines, name="bad.jsonl"):
    """Good rows with a blank line and the bad lines between them; -> (path, bad line numbers, clean path):
    the clean file has a blank line where each bad one was, so line numbers (which seed SFT's random
    system prompts) match."""
    good = GOOD[stage]
    lines, clean, bad_at = [good[0], b"", good[1]], [good[0], b"", good[1]], []
    for i, bad in enumerate(bad_lines):
        lines.append(bad)
        clean.append(b"")
        bad_at.append(len(lines))
        lines.append(good[(i + 2) % len(good)])
        clean.append(good[(i + 2) % len(good)])
    lines += good[2:]
    clean += good[2:]
    return write(tmp_path / name, lines), bad_at, write(tmp_path / f"clean-{name}", clean)


def expected_clean(stage, clean_path):
    return contents(build(stage, clean_path))


@pytest.mark.parametrize("stage, fault", CASES)
def test_bad_line_is_named_or_counted(tmp_path, stage, fault):
    _, make_line, reason = FAULTS[fault]
    path, (lineno,), clean = faulty_file(tmp_path, stage, [make_line(stage)])
    with pytest.raises(DataError) as err:
        build(stage, path)
    message = str(err.value)
    assert message.startswith(f"{path}:{lineno}: ") and reason(stage) in message, message
    assert "--skip_bad_lines 1" in message
    assert len(message) < 600  # a huge line never floods the error
    if stage == "pretrain":  # a failed build caches nothing
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, clean.name])

    ds = build(stage, path, skip_bad=True)
    assert ds.bad_lines.count == 1 and ds.bad_lines.first.startswith(f"{path}:{lineno}: ")
    assert reason(stage) in ds.bad_lines.first
    assert str(ds.bad_lines).startswith(f"skipped 1 bad lines in {path}")
    assert contents(ds) == expected_clean(stage, clean)
    if stage == "pretrain":  # a cache that skipped the line is not reused by a run that does not skip
        with pytest.raises(DataError, match=f"{path}:{lineno}: "):
            build(stage, path)


@pytest.mark.parametrize("stage", STAGES)
def test_workers_agree_with_in_process(tmp_path, stage, monkeypatch):
    """Every fault of the stage in one file: the multiprocess map (small chunks, two workers) raises the
    same first error, skips the same lines and gives the same rows as the in-process build."""
    monkeypatch.setattr(jsonl_module, "_CHUNK_BYTES", 256)
    bad = [make_line(stage) for stages, make_line, _ in FAULTS.values() if stage in stages]
    results = {}
    for workers in (0, 2):
        path, bad_at, clean = faulty_file(tmp_path, stage, bad, name=f"w{workers}.jsonl")
        with pytest.raises(DataError) as err:
            build(stage, path, num_workers=workers)
        if stage == "pretrain":
            assert not [p for p in tmp_path.iterdir() if p.name.startswith(f"{path.name}.")]  # no cache, no temp
        ds = build(stage, path, skip_bad=True, num_workers=workers)
        assert ds.bad_lines.count == len(bad)
        results[workers] = (str(err.value).replace(str(path), "FILE"), ds.bad_lines.first.replace(str(path), "FILE"),
                            contents(ds))
        assert str(err.value).startswith(f"{path}:{bad_at[0]}: ")
    assert results[0] == results[2]
    assert results[0][2] == expected_clean(stage, clean)


# ---------------------------------------------------------------------------------------------- not errors

def variant_bytes(rows, variant) -> bytes:
    lines = [encode(r) for r in rows]
    if variant == "bom mid-file":  # two files joined with `cat`, the second saved with a BOM
        half = len(lines) // 2 + 1
        return b"".join(x + b"\n" for x in lines[:half]) + BOM + b"".join(x + b"\n" for x in lines[half:])
    ending = b"\r\n" if "crlf" in variant else b"\n"
    return (BOM if "bom" in variant else b"") + b"".join(x + ending for x in lines)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("variant", ["bom", "crlf", "bom+crlf", "bom mid-file"])
def test_bom_and_crlf_load_as_the_plain_file(tmp_path, stage, variant, monkeypatch):
    monkeypatch.setattr(jsonl_module, "_CHUNK_BYTES", 128)
    rows = GOOD[stage] + [b""] + GOOD[stage]
    expected = contents(build(stage, write(tmp_path / "plain.jsonl", rows)))
    for workers in (0, 2):
        path = tmp_path / f"variant{workers}.jsonl"
        path.write_bytes(variant_bytes(rows, variant))
        ds = build(stage, path, num_workers=workers)
        assert ds.bad_lines.count == 0 and contents(ds) == expected


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("content", [b"", b"\n\n   \n", b"\r\n\r\n", b"\xef\xbb\xbf", b"\xef\xbb\xbf\n\n"],
                         ids=["empty", "blank lines", "blank crlf", "bom only", "bom and blank"])
def test_a_file_with_no_rows_is_a_clear_error(tmp_path, stage, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    for skip_bad in (False, True):
        with pytest.raises(DataError, match="no rows: the file is empty or holds only blank lines") as err:
            build(stage, path, skip_bad=skip_bad)
        assert str(err.value).startswith(f"{path}: ")
    assert [p.name for p in tmp_path.iterdir()] == ["empty.jsonl"]  # no cache of nothing


@pytest.mark.parametrize("stage", STAGES)
def test_every_line_bad_with_skip_is_a_clear_error(tmp_path, stage):
    path = write(tmp_path / "bad.jsonl", [b"null", b"", b"[1]"])
    with pytest.raises(DataError) as err:
        build(stage, path, skip_bad=True)
    assert str(err.value).startswith(f"{path}: no usable rows in 2 lines (skipped 2 bad lines in {path} "
                                      f"(first: {path}:1: expected a JSON object, got null")
    assert [p.name for p in tmp_path.iterdir()] == ["bad.jsonl"]


@pytest.mark.parametrize("stage", CHAT)
def test_unknown_fields_are_ignored(tmp_path, stage):
    def extra(row):
        row = {**row, "id": 7, "source": {"x": [1]}}
        for field in ("conversations", "chosen", "rejected"):
            if field in row:
                row[field] = [{"tool_calls": None, **m, "name": "n", "weight": 0.5} for m in row[field]]
        return row
    plain = contents(build(stage, write(tmp_path / "plain.jsonl", GOOD[stage])))
    assert contents(build(stage, write(tmp_path / "extra.jsonl", [extra(r) for r in GOOD[stage]]))) == plain


@pytest.mark.parametrize("stage", STAGES)
def test_an_unreadable_file_is_a_clear_error(tmp_path, stage, monkeypatch):
    path = write(tmp_path / "locked.jsonl", GOOD[stage])
    def locked(*args, **kwargs):  # as `chmod 000` does for a user who is not root
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(jsonl_module, "open", locked, raising=False)
    with pytest.raises(DataError, match="cannot read the file"):
        build(stage, path)


def learned(item):
    """The ids the stage trains on (loss_mask), decoded."""
    return TOK.decode([t for t, m in zip(item["ids"].tolist(), item["loss_mask"].tolist()) if m])


def test_assistant_first_and_system_anywhere_are_fine(tmp_path):
    """Decided: a conversation may open with the assistant, and a system message may stand anywhere.
    Each turn is rendered where it is, only assistant turns train, and a conversation with a system
    message anywhere gets no random system prompt on top."""
    assistant_first = [{"role": "assistant", "content": "Hello, ask me anything."}] + conv("2+2?", "4")
    system_later = (conv("Hi", "Hello!") + [{"role": "system", "content": "Now answer in French."}]
                    + conv("Bye", "Adieu"))
    path = write(tmp_path / "sft.jsonl", [{"conversations": assistant_first}, {"conversations": system_later}])
    ds = SFTDataset(path, TOK, 256, system_prompts=["RANDOM SYSTEM PROMPT"], system_prompt_prob=1.0)
    assert len(ds) == 2 and ds.bad_lines.count == 0
    random_prompt = [{"role": "system", "content": "RANDOM SYSTEM PROMPT"}]
    for item, messages in zip((ds[0], ds[1]), (random_prompt + assistant_first, system_later)):
        ids, mask = TOK.render_chat(messages)
        assert item["ids"].tolist() == ids and item["loss_mask"].tolist() == [bool(m) for m in mask]
    assert learned(ds[0]) == "Hello, ask me anything.<|im_end|>4<|im_end|>"
    assert learned(ds[1]) == "Hello!<|im_end|>Adieu<|im_end|>"


def test_reasoning_content_trains_as_the_think_block(tmp_path):
    as_field = conv("3+4?") + [{"role": "assistant", "content": "7", "reasoning_content": "Three and four."}]
    as_text = conv("3+4?", render_reasoning("Three and four.", "7"))
    ds = SFTDataset(write(tmp_path / "r.jsonl", [{"conversations": as_field}, {"conversations": as_text}]),
                    TOK, MAX_SEQ_LEN)
    assert contents(ds)[0] == contents(ds)[1]
    learned = [i for i, m in zip(ds[0]["ids"].tolist(), ds[0]["loss_mask"].tolist()) if m]
    assert all(TOK.special_ids[k] in learned for k in ("think_start", "think_end"))  # MiniMind-3: no <answer>


@pytest.mark.parametrize("stage", ["pretrain", "lora"])  # lora: SFT rows, no random system prompt
def test_a_huge_good_line_loads(tmp_path, stage):
    text = "lorem ipsum dolor sit amet " * (HUGE // 27)
    path = write(tmp_path / "huge.jsonl", [GOOD[stage][0], with_text(stage, text) if stage == "pretrain" else
                                           {"conversations": conv("Tell me a lot.", text)}])
    ds = build(stage, path)
    if stage == "pretrain":
        assert ds.meta["n_docs"] == 2 and ds.n_tokens > HUGE // 27
        return
    ids, mask = TOK.render_chat(conv("Tell me a lot.", "lorem ipsum dolor sit amet " * 40))
    row = contents(ds)[1]  # cut to max_seq_len + 1, ids and mask together
    assert row["ids"] == ids[:MAX_SEQ_LEN + 1] and row["loss_mask"] == [bool(m) for m in mask[:MAX_SEQ_LEN + 1]]


# ---------------------------------------------------------------------------------------------- a stage script

def test_stage_script_exits_2_naming_the_line(tmp_path):
    import torch

    from minillm import save_checkpoint
    from minillm.config import ModelConfig
    from minillm.model import MiniLLM
    torch.manual_seed(0)
    base = tmp_path / "base"
    save_checkpoint(base, MiniLLM(ModelConfig.preset("debug", vocab_size=TOK.vocab_size)), TOK)
    path = write(tmp_path / "sft.jsonl", SFT_ROWS[:2] + [b'{"conversations": [{"role": "user", "content": null}]}']
                 + SFT_ROWS[2:])
    flags = [sys.executable, str(REPO / "train_full_sft.py"), "--init_from", str(base), "--data_path", str(path),
             "--save_dir", str(tmp_path / "out"), "--max_steps", "1", "--batch_size", "2", "--num_workers", "0",
             "--use_tensorboard", "0", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(flags, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 2, run.stderr
    assert f"{path}:3: " in run.stderr and '"content" must be a string, got null' in run.stderr
    assert "--skip_bad_lines 1" in run.stderr and "Traceback" not in run.stderr
