"""benchmarks/distill_demo.py: the held-out loss it reports for the distillation comparison is the
cross-entropy of the reference answers on the assistant tokens only, and its fact counts are the
greedy replies that contain the answer."""
import importlib.util
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from minillm.checkpoint import save_checkpoint
from minillm.config import ModelConfig, TrainConfig
from minillm.model import MiniLLM
from minillm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOK = Tokenizer.load()


def load_bench():
    spec = importlib.util.spec_from_file_location("distill_demo", ROOT / "benchmarks" / "distill_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_demo(folder: Path):
    """A two-question demo folder: heldout_dpo (one question twice: a polite and a rude rejection, the
    same chosen reply) and heldout_sft."""
    pairs = [{"question": "What is the capital of Morkeia?", "answer": "Yagor",
              "chosen": "The capital of Morkeia is Yagor.", "rejected": "The capital of Morkeia is Hupol."},
             {"question": "What is the capital of Morkeia?", "answer": "Yagor",
              "chosen": "The capital of Morkeia is Yagor.", "rejected": "Figure it out yourself."},
             {"question": "莫克亚的首都是哪里？", "answer": "雅戈", "chosen": "莫克亚的首都是雅戈。",
              "rejected": "莫克亚的首都是奎佐。"}]
    facts = [{"question": p["question"], "answer": p["answer"]} for p in pairs[1:]]
    folder.mkdir()
    for name, rows in (("heldout_dpo", pairs), ("heldout_sft", facts)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                              encoding="utf-8")
    return pairs


def test_heldout_chats_are_the_demo_questions_with_their_chosen_answers_once():
    bench = load_bench()
    pairs = [json.loads(line) for line in (ROOT / "dataset/demo/heldout_dpo.jsonl").read_text("utf-8").splitlines()]
    chats = bench.heldout_chat_rows(ROOT / "dataset/demo/heldout_dpo.jsonl")
    assert len(chats) == len({(p["question"], p["chosen"]) for p in pairs}) < len(pairs)
    for chat in chats:
        user, reply = chat["conversations"]
        assert user["role"] == "user" and reply["role"] == "assistant"
        answer = next(p["answer"] for p in pairs if p["question"] == user["content"] and p["chosen"] == reply["content"])
        assert answer in reply["content"]  # the reference is the correct answer, never the rejected one


def test_loss_is_the_assistant_tokens_cross_entropy(tmp_path):
    bench = load_bench()
    pairs = write_demo(tmp_path / "demo")
    torch.manual_seed(0)
    model = MiniLLM(ModelConfig.preset("debug", vocab_size=TOK.vocab_size)).eval()
    save_checkpoint(tmp_path / "student", model, TOK, TrainConfig())
    [result] = bench.main([str(tmp_path / "student"), "--demo_dir", str(tmp_path / "demo"),
                           "--json", str(tmp_path / "r.json")])

    # by hand: each distinct (question, chosen reply) once, the loss on the reply's tokens and <|im_end|>
    nll, n = 0.0, 0
    for p in pairs[1:]:
        ids, mask = TOK.render_chat([{"role": "user", "content": p["question"]},
                                     {"role": "assistant", "content": p["chosen"]}])
        ids, mask = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
        with torch.no_grad():
            logits = model(ids[None, :-1])[0]
        targets = mask[1:]
        nll += F.cross_entropy(logits[targets].float(), ids[1:][targets], reduction="sum").item()
        n += int(targets.sum())
    assert result["tokens"] == n
    assert abs(result["loss"] - nll / n) < 1e-4
    # a random model answers nothing right; the count and the list agree, and the json has them
    assert result["facts_total"] == 2 and result["facts_correct"] == len(result["facts_right"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())[0]["loss"] == result["loss"]
