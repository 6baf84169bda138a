"""PPO's value model (the critic) and the module PPO trains: the policy and its critic side by side.

    critic = ValueModel.from_policy(policy)            # a copy of the policy's trunk, a zero scalar head
    critic = ValueModel.from_reward_model(rm)           # or a copy of a reward model (TRL's default)
    values = critic(ids)                                # [N, T]: V(s_t), the value after reading ids[:, :t+1]
    pair = PolicyAndValue(policy, critic)               # forward(ids) -> (logits, values, MoE aux loss)

Why a separate critic rather than a value head on the policy's trunk: TRL and MiniMind both keep them
apart, because the value loss's gradients through a shared trunk pull the policy's features towards
predicting returns and disturb the policy (the value loss is large and noisy early on), and with a
separate critic the policy checkpoint stays exactly a causal LM. The cost is a second trunk's weights
and optimizer state, small at the sizes this library trains.

Why one module for both: the trainer owns one model, one optimizer, one DDP wrapper and one gradient
clip (TRL's PolicyAndValueWrapper does the same). Its `policy` is what a checkpoint holds (the trainer's
`checkpoint_model`); the critic and the PPO state below travel in the resume state.

PPO's own state lives in a buffer here, so it is saved and restored with the weights and a resumed run
continues exactly: `kl_coef`, the adaptive KL controller's coefficient.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from minillm.config import ModelConfig
from minillm.model import Decoder, MiniLLM, Trunk


class ValueModel(Trunk):
    """The critic: a decoder trunk and a scalar head read at every position (MiniMind's CriticModel,
    TRL's value model): forward(ids [N, T]) -> values [N, T] in fp32.

    Built as minillm.reward.RewardModel is (a `Trunk`: the decoder and its forward), and not a MiniLLM:
    code that takes a language model must not take a critic for one."""

    def __init__(self, cfg: ModelConfig, trunk: Decoder | None = None):
        super().__init__(cfg, trunk if trunk is not None else MiniLLM(cfg).model)
        self.value_head = nn.Linear(cfg.hidden_size, 1)

    @classmethod
    def from_policy(cls, policy: MiniLLM) -> "ValueModel":
        """A critic on a copy of `policy`'s trunk (MiniMind: the SFT weights) with a zero head: every value
        starts at 0, a neutral baseline, and the trunk moves once the head has (its gradient goes through
        the head's weights)."""
        critic = cls(policy.config, trunk=copy.deepcopy(policy.model))
        nn.init.zeros_(critic.value_head.weight)
        nn.init.zeros_(critic.value_head.bias)
        return critic

    @classmethod
    def from_reward_model(cls, reward_model) -> "ValueModel":
        """A critic on a copy of a reward model's trunk and score head (TRL's default: the value model
        starts as the reward model), trainable."""
        critic = cls(reward_model.config, trunk=copy.deepcopy(reward_model.model))
        with torch.no_grad():
            critic.value_head.weight.copy_(reward_model.score_head.weight)
            critic.value_head.bias.zero_()
        return critic.requires_grad_(True)

    def forward(self, input_ids):
        h, _ = self.forward_hidden(input_ids)
        return self.value_head(h).squeeze(-1).float()


class PolicyAndValue(nn.Module):
    """The policy and the critic as one trained module: forward(ids) -> (logits [N, T, V], values [N, T],
    the policy's MoE aux loss). `config` is the policy's, so the trainer's shape checks see the policy."""

    def __init__(self, policy: MiniLLM, value_model: ValueModel, kl_coef: float = 0.0):
        super().__init__()
        self.policy, self.value_model = policy, value_model
        self.register_buffer("kl_coef", torch.tensor(float(kl_coef), dtype=torch.float64))

    @property
    def config(self) -> ModelConfig:
        return self.policy.config

    def forward(self, input_ids):
        logits, aux = self.policy(input_ids, return_aux=True)
        return logits, self.value_model(input_ids), aux
