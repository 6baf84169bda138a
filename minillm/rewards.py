"""Rewards for the RL stages: rule functions on the decoded completions, and a reward model, behind one call.

    reward_fn = make_reward_fn("answer:1.0,format:0.5,length:0.1", tokenizer)
    rewards, parts = reward_fn(rows, rollouts)    # [N] weighted sum, {rule: [N] unweighted values}

`rows` are the rlaif rows of the N rollouts (each prompt's row repeated once per generation), so a
rule can check a completion against its row's reference "answer". The rules:

    answer      1 when the completion's final answer contains the row's "answer" (case-insensitive; a
                number must not continue into more digits: "15" does not hold "5"), else 0. The final
                answer is the text inside <answer>...</answer> when there is one, else the text after
                the last </think>, else the whole completion. Rows without "answer" score 0 (counted:
                `reward_fn.missing_answers`, and said once).
    format      1 when the reply is MiniMind's think/answer format, else 0: one well-formed
                <think>...</think> block, then a non-empty answer (minillm.reasoning.parse_reply). Where the
                prompt already closed the think block (thinking off: THINK_OFF_PREFILL), the reply must be
                a non-empty answer with no think/answer tag of its own.
    length      -1 for a completion cut at the token limit without a stop token, else 0.
    repetition  minus MiniMind's n-gram repetition penalty of the final answer (train_grpo.py's
                rep_penalty: share of repeated word 3-grams x 2 x cap, capped at 0.5).
    model       the reward model's score of prompt + completion (minillm.reward: RewardModel.score).
"""
from __future__ import annotations

import re

import torch

from minillm.errors import UserError
from minillm.reasoning import TAGS, parse_reply
from minillm.tokenizer import THINK_OFF_PREFILL

RULES = ("answer", "format", "length", "repetition", "model")


# -- what a completion says ----------------------------------------------------------------------------
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def final_answer(text: str) -> str:
    """The part of a completion that counts as its answer: the last <answer> block's text, else what
    follows the last </think>, else all of it; stripped."""
    blocks = _ANSWER_BLOCK.findall(text)
    if blocks:
        return blocks[-1].strip()
    return text.rsplit("</think>", 1)[-1].strip()


def contains_answer(text: str, gold: str) -> bool:
    """`gold` occurs in `text` (case-insensitive), not as part of a longer number or ASCII word."""
    gold = gold.strip().lower()
    if not gold:
        return False
    before = r"(?<![0-9])" if gold[0].isdigit() else (r"(?<![A-Za-z])" if gold[0].isascii() and gold[0].isalpha() else "")
    after = r"(?![0-9])" if gold[-1].isdigit() else (r"(?![A-Za-z])" if gold[-1].isascii() and gold[-1].isalpha() else "")
    return re.search(before + re.escape(gold) + after, text.lower()) is not None


def rep_penalty(text: str, n: int = 3, cap: float = 0.5) -> float:
    """MiniMind's repetition penalty: share of repeated word n-grams, scaled by 2·cap, at most cap."""
    toks = re.findall(r"\w+|[^\w\s]", text.lower())
    grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    return min(cap, (len(grams) - len(set(grams))) * cap * 2 / len(grams)) if grams else 0.0


def well_formed(text: str, thinking_off: bool) -> bool:
    """MiniMind's reply format (see the module docstring); `thinking_off`: the prompt ended with the
    empty think block, so the completion is the answer alone."""
    if thinking_off:
        return bool(text.strip()) and not any(tag in text for tag in TAGS)
    return parse_reply(text) is not None


def parse_spec(spec: str) -> dict[str, float]:
    """"answer,format:0.5" -> {"answer": 1.0, "format": 0.5}; UserError on unknown names or bad weights."""
    weights = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, _, weight = item.partition(":")
        name = name.strip()
        if name not in RULES:
            raise UserError(f"unknown reward {name!r} in --rewards {spec!r}; the rewards are: {', '.join(RULES)} "
                            f"(comma-separated, each optionally name:weight)")
        if name in weights:
            raise UserError(f"reward {name!r} is given twice in --rewards {spec!r}")
        try:
            weights[name] = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise UserError(f"reward {name!r} in --rewards {spec!r}: weight {weight!r} is not a number") from None
    if not weights:
        raise UserError(f"--rewards {spec!r} names no reward; use some of: {', '.join(RULES)}")
    return weights


class RewardFunction:
    """Weighted rule rewards (and the reward model's score): see the module docstring.
    `missing_answers` counts rollouts whose row had no "answer" while the answer rule was on."""

    def __init__(self, weights: dict[str, float], tokenizer, reward_model=None):
        if "model" in weights and reward_model is None:
            raise UserError("the 'model' reward needs a reward model: pass --reward_model_path (a train_reward.py "
                            "checkpoint) or drop 'model' from --rewards")
        self.weights, self.tokenizer, self.reward_model = weights, tokenizer, reward_model
        self.stop_ids = set(tokenizer.stop_ids)
        self.think_off = tokenizer.encode(THINK_OFF_PREFILL)
        self.missing_answers = 0

    def texts(self, rollouts) -> list[str]:
        """Each completion decoded without its stop token."""
        return [self.tokenizer.decode([t for t in c if t not in self.stop_ids]) for c in rollouts.completions]

    def thinking_off(self, rollouts) -> list[bool]:
        """Whether each row's prompt ends with the empty think block (thinking switched off)."""
        k, out = len(self.think_off), []
        for row, completion in enumerate(rollouts.completions):
            prompt_end = rollouts.lengths[row] - len(completion)
            out.append(prompt_end >= k and rollouts.ids[row, prompt_end - k: prompt_end].tolist() == self.think_off)
        return out

    def __call__(self, rows: list[dict], rollouts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device = rollouts.ids.device
        n = len(rollouts.completions)
        if len(rows) != n:
            raise ValueError(f"{len(rows)} rows for {n} rollouts: repeat each prompt's row once per generation")
        texts = self.texts(rollouts)
        answers = [final_answer(t) for t in texts]
        parts = {}
        for name in self.weights:
            if name == "answer":
                missing = sum("answer" not in row for row in rows)
                if missing and not self.missing_answers:
                    print(f"warning: {missing} of {n} rollouts come from rows without an \"answer\" field; the "
                          f"answer reward gives them 0", flush=True)
                self.missing_answers += missing
                values = [float("answer" in row and contains_answer(a, row["answer"])) for row, a in zip(rows, answers)]
            elif name == "format":
                values = [float(well_formed(t, off)) for t, off in zip(texts, self.thinking_off(rollouts))]
            elif name == "length":
                values = [0.0 if done else -1.0 for done in rollouts.finished.tolist()]
            elif name == "repetition":
                values = [-rep_penalty(a) for a in answers]
            else:  # model
                with torch.no_grad():
                    score = self.reward_model.score(rollouts.ids, rollouts.lengths)
                parts[name] = score.detach().float().to(device)
                continue
            parts[name] = torch.tensor(values, dtype=torch.float32, device=device)
        rewards = sum(self.weights[name] * value for name, value in parts.items())
        return rewards, parts


def make_reward_fn(spec: str, tokenizer, reward_model=None) -> RewardFunction:
    """`spec`: comma list of rule names, each optionally `name:weight` (e.g. "answer:1.0,format:0.5")."""
    return RewardFunction(parse_spec(spec), tokenizer, reward_model)
