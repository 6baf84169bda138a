"""Evaluation helpers shared by eval_model.py and later stages: held-out accuracy and loss/perplexity.

    rows = read_heldout("dataset/demo/heldout_sft.jsonl")     # [{"question", "answer", "lang"}]
    result = heldout_accuracy(model, tok, rows)               # greedy chat answers; .accuracy, .by_lang
    stats = eval_loss(model, tok, "dataset/demo/sft.jsonl")   # {"loss", "perplexity", "bits_per_byte", "tokens", ...}

A held-out answer counts as correct when the greedy reply contains the expected string
(case-insensitive). Questions are always asked in chat format, even to a pretrained model.

Bits per byte (nanochat's measure): the targets' summed cross-entropy in bits over the UTF-8 bytes of the
text they decode to. Unlike the loss per token it does not depend on the tokenizer, so a 2048-piece and a
6400-piece vocabulary (ours and MiniMind's) compare on equal terms. Control tokens (<|im_start|>,
<|im_end|>, <|endoftext|>, padding) stand for no text: they count in neither sum.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minillm.data import FORMATS, IGNORE_INDEX, DataError, read_jsonl
from minillm.errors import require_file
from minillm.generate import SamplingParams, generate_batch
from minillm.model import eval_mode

HELDOUT_FIELDS = {"question": str, "answer": str}


def read_heldout(path) -> list[dict]:
    """{"question", "answer"[, "lang"]} rows (the demo's heldout_*.jsonl format)."""
    require_file(path, "held-out file", 'pass a jsonl of {"question", "answer"} rows')
    rows = [obj for _, obj in read_jsonl(path, HELDOUT_FIELDS)]
    if not rows:
        raise DataError(f"{path}: no held-out questions")
    return rows


@dataclass
class HeldoutResult:
    correct: int
    total: int
    by_lang: dict[str, tuple[int, int]] = field(default_factory=dict)  # lang -> (correct, total)
    replies: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def summary(self) -> str:
        langs = ", ".join(f"{lang} {c}/{n}" for lang, (c, n) in sorted(self.by_lang.items()))
        return f"{100 * self.accuracy:.1f}% ({self.correct}/{self.total}; {langs})"


def is_correct(reply: str, answer: str) -> bool:
    return answer.strip().lower() in reply.lower()


@torch.no_grad()
def heldout_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int = 48,
                     batch_size: int = 32) -> HeldoutResult:
    """Greedy chat replies to every question, batched; correct when the reply contains the answer."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0,
                            stop_ids=tokenizer.stop_ids)
    result = HeldoutResult(0, 0)
    stops = set(tokenizer.stop_ids)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        prompts = [tokenizer.render_prompt(row["question"]) for row in chunk]
        outputs = generate_batch(model, prompts, params, pad_id=tokenizer.pad_id)
        for row, ids in zip(chunk, outputs):
            reply = tokenizer.decode([i for i in ids if i not in stops])
            ok = is_correct(reply, row["answer"])
            lang = row.get("lang", "?")
            c, n = result.by_lang.get(lang, (0, 0))
            result.by_lang[lang] = (c + ok, n + 1)
            result.correct += ok
            result.total += 1
            result.replies.append(reply)
    return result


# ----------------------------------------------------------------------------------------------
# loss and perplexity on any stage's data

def detect_format(path) -> str:
    """'pretrain' ({"text"}), 'sft' ({"conversations"}) or 'dpo' ({"chosen", "rejected"}) from the first line."""
    require_file(path, "evaluation data", "pass a jsonl file of any stage's format")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise DataError(f"{path}:{lineno}: not valid JSON") from None
            for name in ("dpo", "sft", "pretrain"):
                if isinstance(obj, dict) and all(k in obj for k in FORMATS[name][0]):
                    return name
            raise DataError(f'{path}:{lineno}: cannot tell the format: expected "text" (pretrain), '
                            f'"conversations" (SFT) or "chosen"/"rejected" (DPO)')
    raise DataError(f"{path}: empty file")


def _rows_for_eval(path, tokenizer, max_seq_len: int, fmt: str):
    """(ids, labels) rows of at most max_seq_len inputs: pretrain text in windows over the whole
    document (every token a target), chat rows truncated with the loss on the assistant turns."""
    required, check = FORMATS[fmt]
    for _, obj in read_jsonl(path, required, check=check):
        if fmt == "pretrain":
            ids = tokenizer.encode(obj["text"]) + [tokenizer.eos_id]
            for s in range(0, max(len(ids) - 1, 1), max_seq_len):
                window = ids[s: s + max_seq_len + 1]
                if len(window) >= 2:
                    yield window[:-1], window[1:]
        else:
            messages = obj["chosen"] if fmt == "dpo" else obj["conversations"]
            ids, mask = tokenizer.render_chat(messages)
            ids, mask = ids[: max_seq_len + 1], mask[: max_seq_len + 1]
            labels = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
            if any(l != IGNORE_INDEX for l in labels):
                yield ids[:-1], labels


@torch.no_grad()
def eval_loss(model, tokenizer, path, max_seq_len: int = 512, batch_size: int = 16, max_rows: int = 0) -> dict:
    """Token-weighted mean cross-entropy and perplexity over a jsonl of any stage's format
    (DPO files: the chosen replies). Only trained positions count: all text for pretraining,
    the assistant turns for chat data."""
    fmt = detect_format(path)
    device = next(model.parameters()).device
    total_nll, total_tokens, n_rows, batch = 0.0, 0, 0, []
    byte_lengths = token_byte_lengths(tokenizer)
    nats, n_bytes = torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)

    def flush():
        nonlocal total_nll, total_tokens, nats, n_bytes
        length = max(len(ids) for ids, _ in batch)
        ids_t = torch.full((len(batch), length), tokenizer.pad_id, dtype=torch.long)
        labels_t = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, labels) in enumerate(batch):
            ids_t[row, : len(ids)] = torch.tensor(ids)
            labels_t[row, : len(labels)] = torch.tensor(labels)
        ids_t, labels_t = ids_t.to(device), labels_t.to(device)
        n = int((labels_t != IGNORE_INDEX).sum())
        total_nll += float(model(ids_t, labels=labels_t).ce_loss) * n
        total_tokens += n
        batch_nats, batch_bytes = nats_and_bytes(model, ids_t, labels_t, byte_lengths)
        nats, n_bytes = nats + batch_nats, n_bytes + batch_bytes
        batch.clear()

    with eval_mode(model):
        for ids, labels in _rows_for_eval(path, tokenizer, max_seq_len, fmt):
            batch.append((ids, labels))
            n_rows += 1
            if len(batch) == batch_size:
                flush()
            if max_rows and n_rows >= max_rows:
                break
        if batch:
            flush()
    if total_tokens == 0:
        raise DataError(f"{path}: no tokens to evaluate")
    loss = total_nll / total_tokens
    return {"format": fmt, "rows": n_rows, "tokens": total_tokens, "loss": loss, "perplexity": math.exp(min(loss, 50)),
            "bits_per_byte": bits_per_byte(nats, n_bytes), "bytes": int(n_bytes)}


CONTROL_TOKENS = ("pad", "endoftext", "im_start", "im_end")
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """[V] the UTF-8 bytes each token id stands for in decoded text: a SentencePiece piece's text with
    "▁" as a space, 1 for a byte-fallback piece (<0xAB>), 0 for control tokens."""
    control = {tokenizer.special_ids.get(k) for k in CONTROL_TOKENS} - {None}
    lengths = []
    for i in range(len(tokenizer)):
        piece = tokenizer.id_to_piece(i)
        if i in control:
            lengths.append(0)
        elif _BYTE_PIECE.fullmatch(piece):
            lengths.append(1)
        else:
            lengths.append(len(piece.replace("\u2581", " ").encode("utf-8")))
    return torch.tensor(lengths, dtype=torch.long)


def nats_and_bytes(model, input_ids, labels, byte_lengths) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy in nats, summed UTF-8 bytes) over the targets that stand for text; device
    tensors, no host sync. Goes through the model's fused loss (no [B, T, V] logits kept)."""
    byte_lengths = byte_lengths.to(labels.device)
    counted = labels != IGNORE_INDEX
    n_bytes = torch.where(counted, byte_lengths[labels.clamp(min=0)], 0)
    labels = labels.masked_fill(n_bytes == 0, IGNORE_INDEX)
    return model(input_ids, labels=labels, reduction="sum").ce_loss.float(), n_bytes.sum()


def bits_per_byte(nats, n_bytes) -> float:
    return float(nats) / (math.log(2) * max(float(n_bytes), 1.0))


# the demo's held-out set for each stage (eval_model.py reports it by default on demo checkpoints)
DEMO_HELDOUT = {
    "full_sft": "heldout_sft.jsonl", "dpo": "heldout_sft.jsonl", "reason": "heldout_reason.jsonl",
    "lora_medical": "heldout_medical.jsonl", "lora_identity": "heldout_identity.jsonl",
}


def demo_heldout_path(name: str, demo_dir="dataset/demo") -> Path | None:
    """The held-out file for a demo stage or adapter name, if it exists."""
    file = DEMO_HELDOUT.get(name)
    path = Path(demo_dir) / file if file else None
    return path if path is not None and path.is_file() else None
