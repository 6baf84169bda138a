"""PPO's value model (the critic) and the module PPO trains: the policy and its critic side by side.

    critic = ValueModel.from_policy(policy)            # the policy's trunk, a fresh scalar head
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

import torch
from torch import nn

from minillm.config import ModelConfig
from minillm.model import MiniLLM


class ValueModel(MiniLLM):
    """A decoder trunk with a scalar head in place of the LM head (MiniMind's CriticModel):
    forward(ids [N, T]) -> values [N, T] in fp32."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        del self.lm_head  # a tied head is the embedding, which stays; an untied one would never train
        self.value_head = nn.Linear(cfg.hidden_size, 1)
        # zero head: every value starts at 0, a neutral baseline, and the first updates cannot move the
        # trunk (its gradient goes through the head's weights)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_policy(cls, policy: MiniLLM) -> "ValueModel":
        """A critic whose trunk starts as `policy`'s (MiniMind and TRL start the critic from a trained
        model: here the SFT policy), on its device and dtype."""
        critic = cls(policy.config)
        trunk = {k: v for k, v in policy.state_dict().items() if not k.startswith("lm_head.")}
        missing, unexpected = critic.load_state_dict(trunk, strict=False)
        if unexpected or any(not k.startswith("value_head.") for k in missing):
            raise ValueError(f"the policy's trunk does not fit the critic: missing {missing}, unexpected {unexpected}")
        p = next(policy.parameters())
        return critic.to(device=p.device, dtype=p.dtype)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.model.embed_tokens.weight.numel() if non_embedding else n

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
