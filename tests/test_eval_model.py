"""eval_model.py end to end (auto-test, interactive EOF, LoRA) and the evaluation helpers."""
import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval_model
from minillm.checkpoint import save_checkpoint
from minillm.config import ModelConfig, TrainConfig
from minillm.evaluation import detect_format, eval_loss, heldout_accuracy, is_correct, read_heldout
from minillm.lora import apply_lora, save_lora
from minillm.model import MiniLLM
from minillm.tokenizer import THINK_ON_PREFILL, Tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOK = Tokenizer.load()


@pytest.fixture(scope="module")
def save_dir(tmp_path_factory):
    """out/full_sft and out/pretrain (a tiny random model, recorded as trained on the demo data)
    and an adapter out/lora_medical on it."""
    out = tmp_path_factory.mktemp("out")
    torch.manual_seed(0)
    model = MiniLLM(ModelConfig.preset("debug", vocab_size=TOK.vocab_size))
    for name in ("pretrain", "full_sft"):
        save_checkpoint(out / name, model, TOK, TrainConfig(data_path="dataset/demo/sft.jsonl"))
    apply_lora(model, rank=2)
    save_lora(out / "lora_medical", model, {"train": {"data_path": "dataset/demo/lora_medical.jsonl"}})
    return out


def run_eval(*args, stdin=None):
    r = subprocess.run([sys.executable, str(ROOT / "eval_model.py"), "--device", "cpu", "--max_new_tokens", "5",
                        *args], cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_auto_test_streams_every_prompt_then_reports_heldout(save_dir):
    out = run_eval("--save_dir", str(save_dir), "--model_mode", "1", "--show_speed", "--lora_name", "lora_medical")
    assert "+ LoRA lora_medical" in out and "chat" in out
    assert out.count("user> ") == 4 and "What treats temlo fever?" in out  # the adapter's own prompts
    assert "tokens/s decode" in out
    assert "held-out accuracy on dataset/demo/heldout_medical.jsonl:" in out  # demo run -> its held-out set


def test_interactive_exits_cleanly_on_eof(save_dir):
    out = run_eval("--save_dir", str(save_dir), "--interactive", "--history_cnt", "2", stdin="Hello\n你好\n")
    assert out.count("assistant> ") == 2 and out.rstrip().endswith("user>")


def test_pretrain_mode_continues_raw_text(save_dir, tmp_path):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        eval_model.main(["--save_dir", str(save_dir), "--model_mode", "0", "--max_new_tokens", "3", "--device", "cpu"])
    out = buf.getvalue()
    assert "raw text continuation" in out and "prompt> Dakaia is a country whose capital" in out
    assert "held-out" not in out  # mode 0 reports held-out accuracy only when asked


def test_heldout_accuracy_counts_answers_contained_in_greedy_replies(tmp_path):
    assert is_correct("The capital is Tago.", "tago") and not is_correct("No idea.", "Tago")
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": a, "lang": l}) + "\n"
                            for q, a, l in [("Who?", "x", "en"), ("谁？", "y", "zh"), ("What?", "z", "en")]))
    rows = read_heldout(path)
    torch.manual_seed(0)
    model = MiniLLM(ModelConfig.preset("debug", vocab_size=TOK.vocab_size))
    result = heldout_accuracy(model, TOK, rows, max_new_tokens=4, batch_size=2)
    assert result.total == 3 and len(result.replies) == 3
    assert result.by_lang == {"en": (result.by_lang["en"][0], 2), "zh": (result.by_lang["zh"][0], 1)}
    assert result.correct == sum(is_correct(r, row["answer"]) for r, row in zip(result.replies, rows))
    assert "%" in result.summary()


def test_eval_loss_on_every_stage_format(tmp_path):
    torch.manual_seed(0)
    model = MiniLLM(ModelConfig.preset("debug", vocab_size=TOK.vocab_size))
    conv = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}]
    files = {
        "pretrain": {"text": "Dakaia is a country. " * 40},
        "sft": {"conversations": conv},
        "dpo": {"chosen": conv, "rejected": conv[:1] + [{"role": "assistant", "content": "6"}]},
    }
    for fmt, row in files.items():
        path = tmp_path / f"{fmt}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        assert detect_format(path) == fmt
        stats = eval_loss(model, TOK, path, max_seq_len=64)
        assert stats["format"] == fmt and stats["tokens"] > 0
        assert math.isfinite(stats["loss"]) and stats["perplexity"] == pytest.approx(math.exp(stats["loss"]))
    # SFT: only the assistant turn counts, and the loss is its mean cross-entropy
    ids, mask = TOK.render_chat(conv)
    labels = torch.tensor([t if m else -100 for t, m in zip(ids[1:], mask[1:])])
    want = model(torch.tensor([ids[:-1]]), labels=labels[None]).ce_loss.item()
    assert eval_loss(model, TOK, tmp_path / "sft.jsonl")["loss"] == pytest.approx(want, rel=1e-5)
    assert eval_loss(model, TOK, tmp_path / "sft.jsonl")["tokens"] == sum(mask[1:])
    # pretrain text longer than a row: windows cover every token once
    n_text = len(TOK.encode(files["pretrain"]["text"])) + 1  # + EOS
    assert eval_loss(model, TOK, tmp_path / "pretrain.jsonl", max_seq_len=64)["tokens"] == n_text - 1


def test_demo_report_evaluates_what_exists_and_names_what_does_not(save_dir, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_report", ROOT / "scripts" / "demo_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    table = dict(report.main(["--save_dir", str(save_dir), "--limit", "2", "--markdown"]))
    assert set(table) == {label for label, _, _ in report.STAGES}
    for label in ("pretrain", "full SFT", "SFT + lora_medical"):  # in the fixture
        cells = table[label]
        assert cells["facts"].endswith("%") and cells["preference"].count("%") == 1
        assert cells["reasoning"].startswith("format ")
    for label in ("SFT + lora_identity", "DPO", "reasoning distill"):  # not in the fixture
        assert set(table[label].values()) == {"not trained"}
    out = capsys.readouterr().out
    assert "| stage | facts | medical | identity | preference | reasoning |" in out


def test_auto_test_prompts_name_entities_of_the_current_demo_world():
    """The demo data is generated; a regenerated world must not leave the prompts asking about nobody."""
    for name, entities in eval_model.PROMPT_ENTITIES.items():
        text = (ROOT / "dataset" / "demo" / f"{name}.jsonl").read_text(encoding="utf-8")
        prompts = "".join(eval_model.LORA_PROMPTS.get(name, [])) or "".join(sum(eval_model.PROMPTS.values(), []))
        for entity in entities:
            assert entity in prompts and entity in text, entity


def test_reasoning_mode_reports_format_compliance(save_dir, tmp_path):
    held = tmp_path / "held.jsonl"
    held.write_text('{"question": "What is 1 + 2?", "answer": "3"}\n', encoding="utf-8")
    out = run_eval("--checkpoint", str(save_dir / "full_sft"), "--model_mode", "3", "--heldout", str(held))
    assert f"held-out on {held}: format compliance 0.0% (0/1), answer accuracy 0.0% (0/1)" in out


# ---- chat mode survives the user (issue 14) ----------------------------------------------------------

def run_chat_bytes(save_dir, stdin: bytes, *args):
    """The real script, --interactive, raw bytes on stdin; -> (returncode, stdout as text)."""
    r = subprocess.run([sys.executable, str(ROOT / "eval_model.py"), "--device", "cpu", "--max_new_tokens", "5",
                        "--save_dir", str(save_dir), "--interactive", *args], cwd=ROOT, input=stdin,
                       capture_output=True, timeout=120)
    return r.returncode, r.stdout.decode("utf-8"), r.stderr.decode("utf-8", "replace")


def shown_prompts(out: str) -> list:
    """The rendered prompts --show_prompt printed, in order."""
    import ast
    return [ast.literal_eval(line.split("[prompt: ", 1)[1].split("] ", 1)[1])
            for line in out.splitlines() if "[prompt: " in line]


def test_chat_commands_bad_bytes_empty_lines_and_an_overlong_prompt(save_dir):
    long_prompt = "apple " * 2000 + "THE END"
    assert len(TOK.encode(long_prompt)) >= 5000
    script = b"\n".join([
        b"/help", b"", b"   ", b"hello there",
        b"bad \xff\xfe bytes \xc3",                       # invalid UTF-8: still a turn
        b"/clear", b"after clear",
        b"/system You are Zorbo the helpful.", b"who are you",
        b"/think off", b"answer directly", b"/think on",
        b"/bogus", b"/system", long_prompt.encode(), b"/exit", b"never read"]) + b"\n"
    rc, out, err = run_chat_bytes(save_dir, script, "--history_cnt", "4", "--show_prompt")
    assert rc == 0, err
    assert err == ""
    for name in ("/help", "/clear", "/system TEXT", "/think on|off", "/exit"):
        assert name in out
    assert "[unknown command /bogus" in out
    prompts = shown_prompts(out)
    # turns: hello, bad bytes, after clear, who are you, answer directly, the long one; empty lines skipped
    assert len(prompts) == 6 and out.count("assistant> ") == 6
    assert "bad \ufffd\ufffd bytes \ufffd" in prompts[1] and "hello there" in prompts[1]  # history kept so far
    assert "hello there" not in prompts[2] and "bad" not in prompts[2]                 # /clear forgot it
    assert prompts[3].startswith("<|im_start|>system\nYou are Zorbo the helpful.<|im_end|>\n")
    assert prompts[4].endswith("<|im_start|>assistant\n" + eval_model.THINK_OFF_PREFILL)  # /think off
    assert "Zorbo" not in prompts[5]                                                    # /system alone
    notice = [line for line in out.splitlines() if "[prompt too long:" in line]
    assert len(notice) == 1 and "dropped 4 oldest history messages" in notice[0], notice
    # the tail is kept, and /think on opened the think block (MiniMind's open_thinking 1)
    assert prompts[5].endswith("apple THE END<|im_end|>\n<|im_start|>assistant\n" + THINK_ON_PREFILL)
    assert len(TOK.encode(prompts[5])) <= 1024 - 5
    last_reply = out.split("assistant> ")[-1].splitlines()[0]
    assert last_reply.strip()  # the model still answered the cut prompt
    assert "never read" not in out and out.rstrip().endswith("user>")  # /exit quit at once


def test_chat_eof_after_an_unterminated_bad_line_exits_zero(save_dir):
    rc, out, err = run_chat_bytes(save_dir, b"hi\n\n\xe4\xbd")  # a half character, then EOF
    assert rc == 0 and err == "", err
    assert out.count("assistant> ") == 2 and out.rstrip().endswith("user>")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return MiniLLM(ModelConfig.preset("debug", vocab_size=TOK.vocab_size)).eval()


def chat_args(*argv):
    return eval_model.build_parser().parse_args(["--device", "cpu", "--max_new_tokens", "3", *argv])


def scripted(*events):
    """A stand-in for input(): returns lines, raises the exceptions given, then EOF; records its calls."""
    events = list(events)

    def read(prompt):
        read.calls += 1
        print(prompt, end="")
        if not events:
            raise EOFError
        event = events.pop(0)
        if isinstance(event, BaseException) or (isinstance(event, type) and issubclass(event, BaseException)):
            raise event
        return event
    read.calls = 0
    return read


def test_build_prompt_system_think_and_truncation_order(tiny):
    args = chat_args("--history_cnt", "10")
    room = 1024 - 3
    ids, kept, notice = eval_model.build_prompt(TOK, tiny.config, [], "hi", args, True, system="Be brief.",
                                                think=False)
    assert "Be brief." in TOK.decode(ids) and notice == "" and kept == "hi"
    prefill = TOK.encode(eval_model.THINK_OFF_PREFILL)
    assert ids[-len(prefill):] == prefill and ids[-len(prefill)] == TOK.special_ids["think_start"]
    assert TOK.special_ids["think_end"] in ids[-len(prefill):]
    # long history + a short prompt: only history goes, oldest first, and the prompt stays whole
    history = [{"role": "user", "content": "old " * 600}, {"role": "assistant", "content": "reply " * 100},
               {"role": "user", "content": "recent"}, {"role": "assistant", "content": "ok"}]
    ids, kept, notice = eval_model.build_prompt(TOK, tiny.config, history, "question?", args, True)
    text = TOK.decode(ids)
    assert kept == "question?" and "old" not in text and "recent" in text and len(ids) <= room
    assert notice.endswith("dropped 1 oldest history message]") and "reply" in text
    # a prompt longer than the context by itself: its oldest tokens go, the ids fill the room exactly or nearly
    long = "".join(f"w{i} " for i in range(3000))
    ids, kept, notice = eval_model.build_prompt(TOK, tiny.config, history, long, args, True)
    assert room - 3 <= len(ids) <= room and long.endswith(kept) and kept.endswith("w2999 ")
    assert "dropped 4 oldest history messages, the first" in notice
    # raw continuation (pretrain): the last `room` tokens
    ids, kept, notice = eval_model.build_prompt(TOK, tiny.config, [], long, args, False)
    assert ids == TOK.encode(long)[-room:] and "kept its last 1021 tokens" in notice


def test_engine_refuses_an_overlong_prompt_when_called_not_on_first_step(tiny):
    from minillm.errors import UserError
    from minillm.generate import PromptTooLongError

    with pytest.raises(PromptTooLongError, match="max_position_embeddings=1024: shorten the prompt to at most 1020"):
        eval_model.generate(tiny, TOK, [7] * 1021, max_new_tokens=4, stream=True)  # raised before iterating
    with pytest.raises(UserError, match="lower max_new_tokens below 1024"):
        eval_model.generate(tiny, TOK, [7], max_new_tokens=1024)
    assert isinstance(eval_model.generate(tiny, TOK, [7] * 1020, max_new_tokens=4, temperature=0), str)  # fits


def test_ctrl_c_at_the_prompt_clears_the_line_and_twice_quits(tiny, capsys):
    read = scripted(KeyboardInterrupt, "hello", KeyboardInterrupt, "again")
    state = eval_model.chat_loop(tiny, TOK, chat_args("--history_cnt", "4"), True, read=read)
    assert read.calls == 5  # ... then EOF
    assert [m["content"] for m in state.history if m["role"] == "user"] == ["hello", "again"]
    assert capsys.readouterr().out.count("[Ctrl-C again, Ctrl-D or /exit to quit]") == 2

    read = scripted(KeyboardInterrupt, KeyboardInterrupt, "never read")
    state = eval_model.chat_loop(tiny, TOK, chat_args(), True, read=read)
    assert read.calls == 2 and state.history == []


def test_ctrl_c_mid_reply_stops_it_and_the_chat_goes_on(tiny, capsys, monkeypatch):
    calls = []

    def stub_generate(model, tok, prompt_ids, **kw):
        calls.append(list(prompt_ids))
        assert kw["stream"]

        def pieces():
            yield "partial "
            yield "reply"
            if len(calls) == 1:
                raise KeyboardInterrupt  # the user pressed Ctrl-C while the first reply streamed
            yield " done"
        return pieces()

    monkeypatch.setattr(eval_model, "generate", stub_generate)
    read = scripted("first question", "second question", "/exit", "never read")
    state = eval_model.chat_loop(tiny, TOK, chat_args("--history_cnt", "4"), True, read=read)
    out = capsys.readouterr().out
    assert "assistant> partial reply\n[interrupted; this turn is not kept in the history]" in out
    assert state.history == [{"role": "user", "content": "second question"},
                             {"role": "assistant", "content": "partial reply done"}]
    assert "first question" not in TOK.decode(calls[1])  # the cut turn is not in the next prompt
    assert read.calls == 3  # /exit ended it


# ---- tool use -------------------------------------------------------------------------------------------
def test_tool_calls_are_run_shown_and_fed_back(tiny, capsys, monkeypatch, tmp_path):
    """--tools: the model's call is run, the call and result printed, the result is in the next prompt, and
    the turn (call, result, answer) joins the history; a malformed call comes back as an error result."""
    prompts = []
    replies = {0: '<tool_call>\n{"name": "calculator", "arguments": {"expression": "36 * 17"}}\n</tool_call>',
               1: '<tool_call>{"name": "lookup", "arguments": {"entity": "dakaia"}}</tool_call>',
               2: "It is 612; Dakaia's capital is Tarsen."}

    def stub_generate(model, tok, prompt_ids, **kw):
        prompts.append(tok.decode(prompt_ids))
        return iter([replies[len(prompts) - 1]])

    monkeypatch.setattr(eval_model, "generate", stub_generate)
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps({"Dakaia": {"capital": "Tarsen", "language": "Oskese"}}), encoding="utf-8")
    args = chat_args("--tools", "calculator,lookup", "--tool_facts", str(facts))
    registry = eval_model.load_tools(args, TOK)
    history = []
    answer = eval_model.chat_turn(tiny, TOK, history, "What is 36 * 17?", args, True, tools=registry)
    out = capsys.readouterr().out
    assert answer == replies[2] and len(prompts) == 3
    assert '[tool call] calculator {"expression": "36 * 17"}\n[tool result] {"result": 612}' in out
    assert '[tool result] {"entity": "Dakaia", "capital": "Tarsen", "language": "Oskese"}' in out
    assert prompts[0].startswith("<|im_start|>system\n# Tools") and '"name": "lookup"' in prompts[0]
    assert prompts[1].endswith('<tool_response>\n{"result": 612}\n</tool_response><|im_end|>\n'
                               '<|im_start|>assistant\n')
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    # the next turn's prompt holds the whole tool exchange, rendered as in training
    ids = eval_model.build_prompt(TOK, tiny.config, history, "thanks", chat_args("--history_cnt", "10"), True,
                                  tools=registry.schemas())[0]
    assert TOK.decode(ids) == TOK.decode(TOK.render_prompt(history + [{"role": "user", "content": "thanks"}],
                                                           tools=registry.schemas()))

    # malformed calls and --max_tool_rounds: errors are results the model reads; the last round is not run
    prompts.clear()
    replies.update({0: '<tool_call>{"name": calculator}</tool_call>', 1: '<tool_call>{"name": "nope"}</tool_call>',
                    2: '<tool_call>{"name": "calculator", "arguments": {"expression": "1/0"}}</tool_call>'})
    args.max_tool_rounds = 2
    eval_model.chat_turn(tiny, TOK, [], "go", args, True, tools=registry)
    out = capsys.readouterr().out
    assert "not valid JSON" in prompts[1] and "unknown tool 'nope'" in prompts[2] and len(prompts) == 3
    assert "[--max_tool_rounds 2 reached: the calls in this reply are not run]" in out


def test_tools_flag_runs_auto_test_and_names_bad_tools(save_dir, tmp_path):
    facts = tmp_path / "facts.json"
    facts.write_text('{"Dakaia": {"capital": "Tarsen"}}', encoding="utf-8")
    out = run_eval("--save_dir", str(save_dir), "--tools", "calculator,lookup", "--tool_facts", str(facts),
                   "--heldout", "none", "--open_thinking", "0")
    assert "tools: calculator, lookup" in out and out.count("user> ") == len(eval_model.TOOL_PROMPTS)
    for bad, message in ((["--tools", "calculator,web"], "--tools: unknown tool web; the tools are: calculator, lookup"),
                         (["--tools", "lookup", "--tool_facts", str(tmp_path / "none.json")], "none.json")):
        r = subprocess.run([sys.executable, str(ROOT / "eval_model.py"), "--device", "cpu", "--save_dir",
                            str(save_dir), *bad], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
