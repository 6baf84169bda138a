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
from minillm.tokenizer import Tokenizer

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
