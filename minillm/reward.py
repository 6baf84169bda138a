"""Reward models: the decoder with a scalar head on each row's last real token, and their checkpoints.

train_reward.py trains one with the Bradley-Terry loss on preference pairs; the RL stages load it by
path (`load_reward_model`) and score their rollouts with `RewardModel.score`.

The architecture is transformers' `LlamaForSequenceClassification` with num_labels=1: the final-norm
hidden state at the last real position of each right-padded row, through a bias-free linear head.
The trunk is the language model's (parameter names `model.*`, loaded from an SFT checkpoint); the LM
head is dropped and `score_head.weight` [1, hidden] takes its place. A reward checkpoint is an ordinary
checkpoint folder (model.safetensors, config.yaml, tokenizer.model) whose config.yaml says
`stage: {model_kind: reward}`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from minillm.checkpoint import CONFIG, load_config, load_weights, resolve_checkpoint, save_checkpoint
from minillm.config import ModelConfig
from minillm.data import read_jsonl
from minillm.errors import NotFound, UserError
from minillm.model import Decoder, MiniLLM, Trunk, eval_mode
from minillm.preference import heldout_pair_batches

MODEL_KIND = "reward"  # config.yaml's stage.model_kind of a reward checkpoint


class RewardModel(Trunk):
    """`model(ids, lengths)` -> one scalar reward per row [N] (fp32), differentiable.

    ids [N, T] are right-padded and `lengths` [N] (a LongTensor or a list) count each row's real
    tokens; the reward is read at position lengths - 1. Causal attention keeps the padding after a
    row's last token from changing anything before it, so no attention mask is needed.

    The trunk is a `Decoder` (the LM's `model` module: embeddings, blocks, final norm) run by the shared
    `Trunk` forward. Not a MiniLLM: code that takes a MiniLLM for a language model (logits, generation,
    bits per byte) must not take a reward model for one.
    """

    def __init__(self, cfg: ModelConfig, trunk: Decoder | None = None):
        super().__init__(cfg, trunk if trunk is not None else MiniLLM(cfg).model)  # MiniLLM's initialisation
        self.score_head = nn.Linear(cfg.hidden_size, 1, bias=False)
        nn.init.normal_(self.score_head.weight, std=cfg.initializer_range)  # as transformers inits `score`

    @classmethod
    def from_lm(cls, lm: MiniLLM) -> "RewardModel":
        """A reward model on `lm`'s trunk (its decoder module itself, not a copy; the LM head is left
        out) with a new score head."""
        return cls(lm.config, trunk=lm.model).to(lm.model.embed_tokens.weight.device)

    def forward(self, ids: torch.Tensor, lengths, return_aux: bool = False):
        """-> rewards [N] (with return_aux: (rewards, the MoE balance loss of this forward))."""
        if not torch.is_tensor(lengths):
            bad = [n for n in lengths if not 1 <= n <= ids.shape[1]]
            if bad or len(lengths) != ids.shape[0]:
                raise ValueError(f"lengths must give each of the {ids.shape[0]} rows a length in 1..{ids.shape[1]}; "
                                 f"got {list(lengths)}")
        lengths = torch.as_tensor(lengths, device=ids.device)
        hidden, aux = self.forward_hidden(ids)
        last = hidden[torch.arange(ids.shape[0], device=ids.device), lengths - 1]  # [N, H]
        rewards = self.score_head(last).squeeze(-1).float()
        return (rewards, aux) if return_aux else rewards

    @torch.no_grad()
    def score(self, ids: torch.Tensor, lengths) -> torch.Tensor:
        """Rewards [N] in eval mode without autograd (what the RL stages call on their rollouts)."""
        with eval_mode(self):
            return self(ids, lengths)


def save_reward_model(folder, model: RewardModel, tokenizer=None, **kwargs):
    """save_checkpoint with the reward mark in config.yaml (train_reward.py's checkpoints carry it too)."""
    extra = kwargs.pop("extra", None) or {}
    extra["stage"] = {**extra.get("stage", {}), "model_kind": MODEL_KIND}
    return save_checkpoint(folder, model, tokenizer, extra=extra, **kwargs)


def is_reward_checkpoint(folder) -> bool:
    """True when `folder` (or its .old twin) is a checkpoint whose config.yaml marks a reward model."""
    try:
        _, doc = load_config(resolve_checkpoint(folder))
    except (UserError, FileNotFoundError):
        return False
    stage = doc.get("stage")
    return isinstance(stage, dict) and stage.get("model_kind") == MODEL_KIND


def load_reward_model(path, device="cpu", kernel_backend: str | None = None) -> RewardModel:
    """A reward checkpoint (train_reward.py's folder) on `device`, in eval mode, no parameter wanting a
    gradient. A UserError when `path` is missing or holds something other than a reward model."""
    from minillm import hf
    if hf.import_source(path) is not None:
        raise UserError(f"{path} is an imported language model (transformers folder or .pth), not a reward "
                        f"model; train one with `python train_reward.py --init_from {path}` and pass its folder")
    try:
        folder = resolve_checkpoint(path)
    except FileNotFoundError:
        raise NotFound(f"no reward model at {path} (expected a folder with model.safetensors and {CONFIG}); "
                       f"train one with `python train_reward.py` (it writes out/reward) or pass the right "
                       f"folder") from None
    cfg, doc = load_config(folder)
    stage = doc.get("stage")
    if not (isinstance(stage, dict) and stage.get("model_kind") == MODEL_KIND):
        raise UserError(f"{folder} is not a reward model checkpoint ({folder / CONFIG} has no "
                        f"'stage: {{model_kind: {MODEL_KIND}}}'): it is a language model; train a reward model "
                        f"from it with `python train_reward.py --init_from {path}` and pass that folder")
    if kernel_backend is not None:
        cfg.kernel_backend = kernel_backend
    model = load_weights(RewardModel(cfg), folder).to(device).eval()
    model.requires_grad_(False)
    return model


# -- preference pairs -------------------------------------------------------------------------------
class WithLengths(Dataset):
    """Preference pairs (DPODataset items) that also carry each side's real length, so the collate
    stacks `chosen_length` / `rejected_length` [B] beside the right-padded ids."""

    def __init__(self, pairs):
        self.pairs, self.lengths = pairs, pairs.lengths

    def __len__(self):
        return len(self.pairs)

    def __getattr__(self, name):  # report(), bad_lines, ... of the pairs
        if name == "pairs":
            raise AttributeError(name)
        return getattr(self.pairs, name)

    def __getitem__(self, i):
        item = dict(self.pairs[i])
        for side in ("chosen", "rejected"):
            item[f"{side}_length"] = torch.tensor(len(item[f"{side}_ids"]))
        return item


def pair_rewards(model, batch, return_aux: bool = False):
    """(chosen rewards [B], rejected rewards [B]) of a WithLengths batch, in one forward over both sides
    (dpo_collate pads them to one length); with return_aux also the MoE balance loss."""
    ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
    lengths = torch.cat([batch["chosen_length"], batch["rejected_length"]])
    rewards, aux = model(ids, lengths, return_aux=True)
    chosen, rejected = rewards.chunk(2)
    return (chosen, rejected, aux) if return_aux else (chosen, rejected)


HELDOUT_PAIR_FIELDS = {"question": str, "chosen": str, "rejected": str}


def read_heldout_pairs(path) -> list[dict]:
    """{"question", "chosen", "rejected"} rows (dataset/demo/heldout_dpo.jsonl), checked line by line."""
    from minillm.errors import require_file
    require_file(path, "held-out pairs file", 'pass a jsonl of {"question", "chosen", "rejected"} rows')
    rows = [obj for _, obj in read_jsonl(path, HELDOUT_PAIR_FIELDS)]
    if not rows:
        raise UserError(f"{path}: no held-out pairs")
    return rows


@torch.no_grad()
def reward_margins(model: RewardModel, tokenizer, rows, device, batch_size: int = 32) -> torch.Tensor:
    """r(chosen) - r(rejected) [N] for held-out rows {question, chosen, rejected}, each reply scored
    after its question as one user turn; > 0 where the model prefers the chosen reply."""
    margins = []
    with eval_mode(model):
        for batch in heldout_pair_batches(tokenizer, rows, device, batch_size):
            chosen, rejected = pair_rewards(model, batch)
            margins.append((chosen - rejected).float().cpu())
    return torch.cat(margins)
