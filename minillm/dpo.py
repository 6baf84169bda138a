"""Direct preference optimisation: the loss math train_dpo.py calls, importable for tests.

Everything works on *sequence* log-probabilities: log π(y | x) summed over the response's
tokens only, i.e. over the positions whose (already shifted) label is not -100. The chat
template masks the prompt and the padding to -100, so neither ever reaches the loss.

    h   = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))
    sigmoid (DPO):        −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)      (ε = label smoothing: conservative DPO)
    ipo:                  (h − 1/(2β))²
    reward of a response: β·(log π(y) − log π_ref(y))
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from minillm.model import eval_mode

IGNORE_INDEX = -100
LOSS_TYPES = ("sigmoid", "ipo")


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, T, V], shifted labels [B, T] -> (Σ_t log p(label_t) over labels != -100 [B], token count [B]).

    Computed in fp32 through cross_entropy (one fused log-softmax + gather, no [B, T, V] log-prob copy).
    """
    token_nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                reduction="none").view_as(labels)
    mask = labels != IGNORE_INDEX
    return -(token_nll * mask).sum(-1), mask.sum(-1)


class PreferenceLoss(NamedTuple):
    loss: torch.Tensor              # mean over pairs, what to backpropagate
    chosen_rewards: torch.Tensor    # [B] β·(log π − log π_ref) on chosen, detached
    rejected_rewards: torch.Tensor  # [B] the same on rejected, detached


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0,
                    loss_type: str = "sigmoid") -> PreferenceLoss:
    """DPO / conservative DPO / IPO on sequence log-probs, each [B]. The ref_* get no gradient."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}: use one of {', '.join(LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing {label_smoothing} must be in [0, 0.5)")
    ref_chosen, ref_rejected = ref_chosen.detach(), ref_rejected.detach()
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return PreferenceLoss(losses.mean(), chosen_rewards, rejected_rewards)


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a DPO run logs: mean rewards, their margin and how often chosen out-scores rejected.
    Tensors, not floats: the trainer reads them once per log interval (no sync per step)."""
    return {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean()}


def chosen_nll(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Mean per-token NLL of the chosen responses (the SFT regulariser against DPO drifting off
    the chosen text, or a loss stuck at log 2 = 0.693)."""
    return -chosen_logps.sum() / chosen_tokens.sum().clamp(min=1)


def pair_batch(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen rows then rejected rows in one batch (dpo_collate pads both to one length)."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    return ids, labels


@torch.no_grad()
def preference_margins(model, tokenizer, rows, device, batch_size: int = 32) -> torch.Tensor:
    """log π(chosen) − log π(rejected) [N] for each held-out row's question (one user turn);
    the demo's preference measure (dataset/demo/heldout_dpo.jsonl rows: question, chosen, rejected)."""
    from minillm.data import dpo_collate

    collate = dpo_collate(tokenizer.pad_id)
    margins = []
    with eval_mode(model):
        for start in range(0, len(rows), batch_size):
            items = []
            for row in rows[start: start + batch_size]:
                item = {}
                for side in ("chosen", "rejected"):
                    ids, mask = tokenizer.render_chat([{"role": "user", "content": row["question"]},
                                                       {"role": "assistant", "content": row[side]}])
                    ids, mask = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
                    item[f"{side}_input_ids"] = ids[:-1]
                    item[f"{side}_labels"] = torch.where(mask[1:], ids[1:], -100)
                items.append(item)
            batch = {k: v.to(device) for k, v in collate(items).items()}
            ids, labels = pair_batch(batch)
            chosen, rejected = sequence_logprobs(model(ids), labels)[0].float().cpu().chunk(2)
            margins.append(chosen - rejected)
    return torch.cat(margins)
