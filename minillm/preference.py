"""Preference pairs: sequence log-probabilities of responses, and the held-out preference measure.

train_dpo.py builds the DPO / cDPO / IPO losses on top of `sequence_logprobs`; eval_model.py and
scripts/demo_report.py score held-out pairs with `preference_margins`.

A response's log-probability is log π(y | x) summed over its tokens only, i.e. over the positions
whose (already shifted) label is not -100: the chat template's loss mask keeps the prompt and the
padding out of it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minillm.data import IGNORE_INDEX, dpo_collate
from minillm.model import eval_mode


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, T, V], shifted labels [B, T] -> (Σ_t log p(label_t) over labels != -100 [B], token count [B]).

    Computed in fp32 through cross_entropy (one fused log-softmax + gather, no [B, T, V] log-prob copy).
    """
    token_nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                reduction="none").view_as(labels)
    mask = labels != IGNORE_INDEX
    return -(token_nll * mask).sum(-1), mask.sum(-1)


def pair_inputs(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of chosen rows then rejected rows, in one batch for one forward (dpo_collate
    pads both sides to one length). Labels keep the assistant's tokens only (the SFT rule)."""
    ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
    loss_mask = torch.cat([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
    return ids[:, :-1], ids[:, 1:].masked_fill(~loss_mask[:, 1:], IGNORE_INDEX)


def heldout_pair_batches(tokenizer, rows, device, batch_size: int = 32):
    """Held-out {question, chosen, rejected} rows as padded pair batches on `device`: each reply after its
    question as one user turn, rendered by the chat template (`{side}_ids`, `{side}_loss_mask`, and each
    row's real length `{side}_length`), in row order."""
    collate = dpo_collate(tokenizer.pad_id)
    for start in range(0, len(rows), batch_size):
        items = []
        for row in rows[start: start + batch_size]:
            item = {}
            for side in ("chosen", "rejected"):
                ids, mask = tokenizer.render_chat([{"role": "user", "content": row["question"]},
                                                   {"role": "assistant", "content": row[side]}])
                item[f"{side}_ids"], item[f"{side}_loss_mask"] = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
                item[f"{side}_length"] = torch.tensor(len(ids))
            items.append(item)
        yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(items).items()}


@torch.no_grad()
def preference_margins(model, tokenizer, rows, device, batch_size: int = 32) -> torch.Tensor:
    """log π(chosen) − log π(rejected) [N] for each held-out row's question (one user turn);
    the demo's preference measure (dataset/demo/heldout_dpo.jsonl rows: question, chosen, rejected)."""
    margins = []
    with eval_mode(model):
        for batch in heldout_pair_batches(tokenizer, rows, device, batch_size):
            inputs, labels = pair_inputs(batch)
            chosen, rejected = sequence_logprobs(model(inputs), labels)[0].float().cpu().chunk(2)
            margins.append(chosen - rejected)
    return torch.cat(margins)
