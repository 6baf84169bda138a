"""The decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU or mixture-of-experts, KV cache.

Parameter names follow Llama/Qwen (model.layers.N.self_attn.q_proj, ...), so weights map
one-to-one onto the transformers formats. Every op with a fused kernel goes through
`minillm.kernels.dispatch`, which picks Triton on CUDA and the torch reference elsewhere.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.config import ModelConfig
from minillm.kernels import dispatch


@contextlib.contextmanager
def eval_mode(model):
    """Eval mode inside the block, the previous mode after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, backend: str = "auto"):
        super().__init__()
        self.eps, self.backend = eps, backend
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return dispatch.rms_norm(x, self.weight, self.eps, backend=self.backend)


def rope_tables(head_dim: int, length: int, theta: float, device=None, cfg: ModelConfig | None = None):
    """cos/sin [length, head_dim] in fp32, rotate-half layout (frequencies repeated twice). With
    cfg.rope_scaling == "yarn", YaRN's frequencies and attention factor (`yarn_frequencies`)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    scale = 1.0
    if cfg is not None and cfg.rope_scaling == "yarn":
        inv_freq, scale = yarn_frequencies(inv_freq, head_dim, theta, cfg)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    if scale == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * scale, angles.sin() * scale


def yarn_frequencies(inv_freq, head_dim: int, theta: float, cfg: ModelConfig):
    """YaRN (Peng et al. 2023), as transformers' `_compute_yarn_parameters` computes it: dimension pairs that
    turn more than beta_fast times over the original context keep their frequency, those turning fewer than
    beta_slow times are divided by the factor s, a linear ramp between; cos/sin are scaled by the attention
    factor (0.1 ln s + 1 unless given). -> (inv_freq, attention factor)."""
    s, original = cfg.rope_factor, cfg.rope_original_max_position_embeddings

    def dim_of(rotations):  # the dimension index that turns `rotations` times over the original context
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(dim_of(cfg.rope_beta_fast)), 0)
    high = min(math.ceil(dim_of(cfg.rope_beta_slow)), head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, device=inv_freq.device, dtype=torch.float32) - low)
            / (high - low if high != low else 0.001)).clamp(0, 1)  # 0: keep, 1: interpolate
    inv_freq = inv_freq * (1 - ramp) + inv_freq / s * ramp
    factor = cfg.rope_attention_factor or (0.1 * math.log(s) + 1.0 if s > 1 else 1.0)
    return inv_freq, factor


class KVCache:
    """Preallocated keys/values for incremental decoding: one [B, Hkv, max_len, D] pair per layer.

    `length` is a python int (how many positions are filled), so decoding needs no GPU->CPU sync.
    `attention_mask` [B, max_len] (bool) marks real tokens; left padding is False.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.attention_mask = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.has_padding = False  # set by whoever fills attention_mask with left padding
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k, v):
        """Write this step's k/v [B, Hkv, T, D] and return the filled prefix including them."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot append up to {end}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.backend = cfg.kernel_backend
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, self.backend)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, self.backend)
        else:
            self.q_norm = self.k_norm = None
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, layer: int, cache: KVCache | None = None, mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        # per-row positions (left-padded generation) come as [B, 1, T, D] tables: torch path
        rope_backend = self.backend if cos.dim() == 2 else "torch"
        q, k = dispatch.apply_rope(q, k, cos, sin, backend=rope_backend)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if mask is None:
            out = dispatch.attention(q, k, v, causal=True, backend=self.backend)
        else:  # generation with padding: an explicit [B, 1, T, S] boolean mask
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv_heads)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.dropout(self.o_proj(out))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, backend: str = "auto", dropout: float = 0.0):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.backend = backend
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(dispatch.swiglu(self.gate_proj(x), self.up_proj(x), backend=self.backend)))


class MoE(nn.Module):
    """Top-k softmax router over routed experts, plus shared experts every token goes through.

    The (token, expert) pairs are sorted by expert so each expert runs once on exactly the
    tokens routed to it. Two ways to run the experts on those groups:
    - Triton path (CUDA by default): one grouped matmul for every expert's gate+up projection
      and one for the down projection (kernels/moe.py). The per-expert row counts never leave
      the device: no host sync, and torch.compile keeps the layer in one graph.
    - torch path (CPU, or kernel_backend="torch"): a loop over experts on their slices, which
      needs the counts on the host: one sync per MoE layer.
    Weights stay one MLP module per expert either way (MiniMind's / Qwen-MoE's names). Experts
    with LoRA-wrapped projections always take the loop path, which calls the modules.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k, self.norm_topk = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.backend = cfg.kernel_backend
        self.gate = nn.Linear(cfg.hidden_size, self.n_experts, bias=False)
        self.experts = nn.ModuleList(
            MLP(cfg.hidden_size, cfg.moe_intermediate_size, cfg.kernel_backend) for _ in range(self.n_experts))
        self.shared_experts = nn.ModuleList(
            MLP(cfg.hidden_size, cfg.moe_intermediate_size, cfg.kernel_backend) for _ in range(cfg.n_shared_experts))
        self.dropout = nn.Dropout(cfg.dropout)

    def route(self, x_flat):
        """-> (top-k expert ids [N, k], their gate weights [N, k], router probs [N, E])."""
        probs = F.softmax(self.gate(x_flat).float(), dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.norm_topk:  # at top-1 this makes every gate weight 1, as transformers' Qwen-MoE does
            weights = weights / weights.sum(-1, keepdim=True)
        return ids, weights, probs

    def aux_loss(self, ids, probs):
        """Switch-style balance loss E * sum_e f_e * P_e; its minimum, 1, is at balanced routing."""
        counts = torch.zeros(self.n_experts, device=probs.device, dtype=probs.dtype)
        counts.scatter_add_(0, ids.flatten(), torch.ones_like(ids.flatten(), dtype=probs.dtype))
        frac_tokens = counts / ids.numel()
        return self.n_experts * (frac_tokens * probs.mean(0)).sum()

    def experts_are_plain_linears(self) -> bool:
        """The grouped path reads the projection weights directly; wrapped projections (LoRA) run
        through their modules on the loop path instead."""
        return all(type(p) is nn.Linear for e in self.experts for p in (e.gate_proj, e.up_proj, e.down_proj))

    def grouped_experts(self, x_sorted, counts):
        """Every routed expert's SwiGLU MLP on its rows of x_sorted [M, H] in two grouped matmuls."""
        gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in self.experts])
        down = torch.stack([e.down_proj.weight for e in self.experts])  # [E, H, I]
        h = dispatch.grouped_mm(x_sorted, gate_up.transpose(1, 2), counts, backend="triton")  # [M, 2I]
        gate, up = h.chunk(2, dim=-1)
        h = dispatch.swiglu(gate, up, backend="triton")
        return dispatch.grouped_mm(h, down.transpose(1, 2), counts, backend="triton")

    def forward(self, x):
        B, T, H = x.shape
        x_flat = x.reshape(-1, H)
        ids, weights, probs = self.route(x_flat)
        # group the N*k (token, expert) pairs by expert
        flat_ids = ids.flatten()
        order = flat_ids.argsort(stable=True)
        token_of_pair = order // self.top_k
        # rows per expert; a scatter, not bincount, so the shape [E] is static under torch.compile
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, flat_ids, torch.ones_like(flat_ids))
        pair_weights = weights.flatten()[order].unsqueeze(-1).to(x.dtype)
        out = torch.zeros_like(x_flat)
        if dispatch.use_triton(self.backend, x) and self.experts_are_plain_linears():
            y = self.grouped_experts(x_flat[token_of_pair], counts)
            out.index_add_(0, token_of_pair, (y * pair_weights).to(out.dtype))
        else:
            start = 0
            for expert, n in zip(self.experts, counts.tolist()):  # the one host sync
                if n:
                    tokens = token_of_pair[start:start + n]
                    y = expert(x_flat[tokens]) * pair_weights[start:start + n]
                    out.index_add_(0, tokens, y.to(out.dtype))
                start += n
        for shared in self.shared_experts:
            out = out + shared(x_flat)
        aux = self.aux_loss(ids, probs) if self.training else x.new_zeros((), dtype=torch.float32)
        return self.dropout(out.view(B, T, H)), aux


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.kernel_backend)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.kernel_backend)
        self.mlp = MoE(cfg) if cfg.use_moe else MLP(cfg.hidden_size, cfg.intermediate_size,
                                                     cfg.kernel_backend, cfg.dropout)

    def forward(self, x, cos, sin, cache=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, self.layer, cache, mask)
        h = self.mlp(self.post_attention_layernorm(x))
        if isinstance(h, tuple):
            h, aux = h
        else:
            aux = None
        return x + h, aux


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.kernel_backend)


class LossOutput(NamedTuple):
    loss: torch.Tensor          # reduction "mean": ce_loss + balance_loss, what to backpropagate
    ce_loss: torch.Tensor       # cross-entropy, reduced as asked: mean, sum, or per position [B, T] ("none")
    aux_loss: torch.Tensor      # MoE load-balancing loss of this forward (0 without MoE or in eval mode)
    balance_loss: torch.Tensor  # aux_loss_coef * aux_loss: the term a stage adds once per forward

    def aux_metrics(self, totals: dict) -> dict:
        """{"aux_loss": this forward's share of the step's mean} while an MoE model trains (for the
        log, beside the loss), else {}."""
        return {"aux_loss": self.aux_loss / totals["micro_batches"]} if self.aux_loss.requires_grad else {}


class Trunk(nn.Module):
    """What every model on the decoder shares: `config`, the `Decoder` (as `.model`), the RoPE tables and
    `forward_hidden` -> final-norm hidden states. MiniLLM adds the LM head; the reward model and the PPO
    critic (minillm.reward, minillm.value) add a scalar head. `trunk` reuses an existing Decoder."""

    def __init__(self, cfg: ModelConfig, trunk: "Decoder | None" = None):
        super().__init__()
        self.config = cfg
        self.model = trunk if trunk is not None else Decoder(cfg)
        device = self.model.embed_tokens.weight.device
        cos, sin = rope_tables(cfg.head_dim, min(cfg.max_position_embeddings, 4096), cfg.rope_theta, device, cfg=cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if non_embedding:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def reset_rope(self):
        """Recompute the RoPE tables from the config (after its rope fields changed, e.g. YaRN switched on)."""
        cos, sin = rope_tables(self.config.head_dim, self.rope_cos.shape[0], self.config.rope_theta,
                               self.rope_cos.device, cfg=self.config)
        self.rope_cos, self.rope_sin = cos, sin

    def _rope(self, length: int, position_ids=None):
        if length > self.rope_cos.shape[0]:  # grow the tables (a shape check, no sync)
            cos, sin = rope_tables(self.config.head_dim, max(length, 2 * self.rope_cos.shape[0]),
                                   self.config.rope_theta, self.rope_cos.device, cfg=self.config)
            self.rope_cos, self.rope_sin = cos, sin
        if position_ids is None:
            return self.rope_cos[:length], self.rope_sin[:length]
        # [B, T] -> [B, 1, T, D], broadcast over heads
        return self.rope_cos[position_ids].unsqueeze(1), self.rope_sin[position_ids].unsqueeze(1)

    def forward_hidden(self, input_ids, cache: KVCache | None = None):
        """Final-norm hidden states [B, T, H] and the summed MoE aux loss (0 without MoE)."""
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        mask = position_ids = None
        if cache is None:
            cos, sin = self._rope(T)
        else:
            start = cache.length
            cos, sin, position_ids, mask = self._cached_positions(cache, start, T)
        aux_total = x.new_zeros((), dtype=torch.float32)
        # activation checkpointing (the trainer's --grad_checkpointing N, a training switch kept out of the
        # saved config): every N-th block keeps only its input and recomputes the rest in the backward pass
        every = getattr(self, "grad_checkpointing", 0) if self.training and torch.is_grad_enabled() else 0
        for i, block in enumerate(self.model.layers):
            if every and cache is None and i % every == 0:
                x, aux = torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x, aux = block(x, cos, sin, cache, mask)
            if aux is not None:
                aux_total = aux_total + aux
        if cache is not None:
            cache.length += T
        return self.model.norm(x), aux_total

    def _cached_positions(self, cache: KVCache, start: int, T: int):
        """RoPE tables and attention mask for T new tokens at cache offset `start`.

        Positions count real tokens only, so a left-padded row's first token sits at 0,
        exactly as it would unpadded. Without padding the plain causal kernel path is used.
        """
        valid = cache.attention_mask[:, :start + T]
        if cache.has_padding:
            position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
            cos, sin = self._rope(start + T, position_ids)
            causal = torch.ones(T, start + T, dtype=torch.bool, device=valid.device).tril(diagonal=start)
            mask = (causal.unsqueeze(0) & valid.unsqueeze(1)).unsqueeze(1)
            # a padded query row would attend to nothing: let it see itself to stay finite
            own = torch.arange(T, device=valid.device)
            mask[:, :, own, start + own] = True
            return cos, sin, position_ids, mask
        cos, sin = self._rope(start + T)
        return cos[start:], sin[start:], None, None


class MiniLLM(Trunk):
    """Causal LM. `model(input_ids)` -> logits [B, T, V]; `model.loss(input_ids, labels)` for training."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)
        # residual projections scaled down with depth (GPT-2), so the stream's variance stays put
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=cfg.initializer_range / math.sqrt(2 * cfg.num_hidden_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, input_ids, labels=None, reduction: str = "mean", cache: KVCache | None = None,
                return_aux: bool = False):
        """labels None -> logits [B, T, V] (with return_aux: (logits, MoE aux loss), for losses
        built on logits such as DPO's); labels given -> LossOutput (see `loss`).

        The loss lives behind forward so DDP and torch.compile wrappers see the whole step.
        """
        if labels is not None:
            return self.loss(input_ids, labels, reduction)
        h, aux = self.forward_hidden(input_ids, cache)
        return (self.lm_head(h), aux) if return_aux else self.lm_head(h)

    def loss(self, input_ids, labels, reduction: str = "mean") -> LossOutput:
        """Next-token cross-entropy at the positions whose label is not -100.

        `labels` are already shifted (labels[:, t] is the target after input_ids[:, t]).
        reduction "mean" (over counted positions), "sum", or "none" ([B, T] per position, 0 where
        the label is -100: for per-token weights, as the reasoning stage applies). The training
        stages take "sum" and divide by the target count of the whole optimizer step themselves.
        """
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction {reduction!r}: use mean, sum or none")
        h, aux = self.forward_hidden(input_ids)
        if reduction == "none":
            logits = self.lm_head(h).float()
            ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                 reduction="none").view_as(labels)
        else:
            # fused linear + cross-entropy: no [B*T, V] logits kept on the fused path
            ce = dispatch.linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, labels.flatten(),
                                               ignore_index=-100, backend=self.config.kernel_backend)
            if reduction == "sum":  # the kernel's mean times its own count (a device tensor: no sync)
                ce = ce * (labels != -100).sum()
        balance = self.config.aux_loss_coef * aux if self.config.use_moe else torch.zeros_like(aux)
        total = ce + balance if reduction == "mean" else ce
        return LossOutput(total, ce, aux, balance)

    def token_logprobs(self, input_ids, labels):
        """log p(label) at every position [B, T] in fp32; 0 where the label is -100."""
        logits = self(input_ids).float()
        mask = labels != -100
        picked = torch.gather(logits.log_softmax(-1), -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return picked * mask
