"""Reasoning replies: the think/answer format check, answer extraction, and the held-out report
that train_distill_reason.py prints after training (eval_model.py can call it too).

A well-formed reply is exactly one think block followed by the answer, in either of two forms:
    <think>\\n...reasoning...\\n</think>\\n<answer>\\n...answer...\\n</answer>   (MiniMind2's r1 data)
    <think>\\n...reasoning...\\n</think>\\n\\n...answer...                       (MiniMind-3: reasoning_content)
(whitespace between and around the blocks is free; the reasoning and the answer must hold some text
and no tag of their own).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from minillm.evaluation import heldout_accuracy

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_THINK = re.compile(r"\s*<think>(.*?)</think>(.*)", re.DOTALL)
_ANSWER = re.compile(r"\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def parse_reply(text: str) -> tuple[str, str] | None:
    """(reasoning, answer), both stripped, if `text` is well-formed (either form); else None."""
    m = _THINK.fullmatch(text)
    if m is None:
        return None
    tagged = _ANSWER.fullmatch(m.group(2))  # MiniMind2's answer block, else MiniMind-3's bare answer
    reasoning, answer = m.group(1).strip(), (tagged.group(1) if tagged else m.group(2)).strip()
    if not reasoning or not answer or any(tag in reasoning or tag in answer for tag in TAGS):
        return None
    return reasoning, answer


def is_well_formed(text: str) -> bool:
    return parse_reply(text) is not None


def extract_answer(text: str) -> str | None:
    """The answer block's text of a well-formed reply (None otherwise)."""
    parsed = parse_reply(text)
    return parsed[1] if parsed else None


def answer_matches(answer: str | None, gold: str) -> bool:
    """Exact match after trimming whitespace and a final full stop ("28." == "28", "128" != "28")."""
    if answer is None:
        return False
    return answer.strip().rstrip(".。").strip() == gold.strip()


@dataclass
class ReasoningReport:
    n: int
    well_formed: int
    correct: int
    replies: list[str]

    @property
    def compliance(self) -> float:
        return self.well_formed / max(self.n, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.n, 1)

    def __str__(self) -> str:
        return (f"format compliance {self.compliance:.1%} ({self.well_formed}/{self.n}), "
                f"answer accuracy {self.accuracy:.1%} ({self.correct}/{self.n})")


def evaluate_reasoning(model, tokenizer, rows: list[dict], max_new_tokens: int = 128,
                       batch_size: int = 32) -> ReasoningReport:
    """Greedy replies to each row's question (evaluation.heldout_accuracy's generation): how many
    are well-formed, and how many hold the right answer *in the answer block* (containment
    anywhere in the reply, as heldout_accuracy counts, would credit a number in the reasoning)."""
    replies = heldout_accuracy(model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size).replies
    well_formed = sum(is_well_formed(r) for r in replies)
    correct = sum(answer_matches(extract_answer(r), str(row["answer"])) for r, row in zip(replies, rows))
    return ReasoningReport(len(rows), well_formed, correct, replies)
