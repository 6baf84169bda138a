"""Bits per byte: every token's byte count adds up to the text's UTF-8 length, the measure equals a hand
computation, and the held-out evaluation of every stage reports it."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

import train_pretrain
from minillm.config import ModelConfig
from minillm.evaluation import bits_per_byte, eval_loss, nats_and_bytes, token_byte_lengths
from minillm.model import MiniLLM
from minillm.tokenizer import Tokenizer

TEXTS = ["The capital of Kalo is Veri.", "卡洛的首都是维里。", "x=42 😀 ok", "  two  spaces\nand a line", "ÿ€"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load()


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_add_up_to_the_utf8_length(tok, text):
    lengths = token_byte_lengths(tok)
    assert int(lengths[tok.encode(text)].sum()) == len(text.encode("utf-8"))


def test_control_tokens_stand_for_no_bytes(tok):
    lengths = token_byte_lengths(tok)
    for name in ("pad", "endoftext", "im_start", "im_end"):
        assert lengths[tok.special_ids[name]] == 0, name
    assert lengths[tok.special_ids["think_start"]] == len("<think>")  # markup the reply really contains


def test_bits_per_byte_equals_a_hand_computation(tok):
    torch.manual_seed(0)
    model = MiniLLM(ModelConfig.preset("debug", vocab_size=len(tok))).eval()
    rows = [tok.encode(t) + [tok.eos_id] for t in TEXTS[:3]]
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), tok.pad_id)
    labels = torch.full((len(rows), length - 1), -100)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
        labels[r, :len(row) - 1] = torch.tensor(row[1:])
    lengths = token_byte_lengths(tok)
    with torch.no_grad():
        nats, n_bytes = nats_and_bytes(model, ids[:, :-1], labels, lengths)
        logp = F.log_softmax(model(ids[:, :-1]).float(), -1)
    want_nats, want_bytes = 0.0, 0
    for r, row in enumerate(rows):
        for t, target in enumerate(row[1:]):
            if target != tok.eos_id:  # the end-of-text token is no text: left out of both sums
                want_nats -= float(logp[r, t, target])
                want_bytes += int(lengths[target])
    assert int(n_bytes) == want_bytes == sum(len(t.encode()) for t in TEXTS[:3]) - sum(
        int(lengths[r[0]]) for r in rows)  # every byte but each row's first token (never a target)
    assert float(nats) == pytest.approx(want_nats, rel=1e-4)
    assert bits_per_byte(nats, n_bytes) == pytest.approx(want_nats / (math.log(2) * want_bytes), rel=1e-4)


def test_eval_loss_reports_bits_per_byte(tok, tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"text": "The capital of Kalo is Veri. The river of Kalo is the Tor."}\n')
    torch.manual_seed(0)
    model = MiniLLM(ModelConfig.preset("debug", vocab_size=len(tok)))
    stats = eval_loss(model, tok, path)
    # one row; every target but the final <|endoftext|> is text, so bpb's nats are the loss's sum
    # (loss x tokens) less that one target's: strictly between 0 and the whole sum in bits per byte
    all_nats = stats["loss"] * stats["tokens"]
    assert 0 < stats["bits_per_byte"] < all_nats / (math.log(2) * stats["bytes"])
    assert stats["bytes"] == len("The capital of Kalo is Veri. The river of Kalo is the Tor.".encode()) - \
        int(token_byte_lengths(tok)[tok.encode("The")[0]])


def test_held_out_evaluation_logs_bits_per_byte(corpus, tmp_path, capsys):
    train_pretrain.main(["--preset", "debug", "--max_seq_len", "32", "--batch_size", "4", "--num_workers", "0",
                         "--use_tensorboard", "0", "--data_path", str(corpus), "--save_dir", str(tmp_path),
                         "--max_steps", "2", "--eval_split", "0.05"])
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("eval step")][-1]
    loss, bpb = (float(re.search(rf"{k} ([0-9.]+)", line).group(1)) for k in ("loss", "bits_per_byte"))
    # the demo tokenizer averages a few bytes per token: bpb is the loss in bits spread over them
    assert 0.1 * loss / math.log(2) < bpb < loss / math.log(2), line
