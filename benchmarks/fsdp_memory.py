"""Memory per GPU for DDP vs FSDP2 (+ activation checkpointing): parameters, gradients and optimizer state
counted from the presets; activations per token per block measured on CPU with saved-tensor hooks."""
import torch
from minillm.config import ModelConfig, PRESETS
from minillm.model import Block, MiniLLM

GiB = 2**30

def saved_bytes(block, x, cos, sin, autocast=True):
    kept = {}
    def pack(t):
        kept[(t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, _ = block(x, cos, sin)
    # the block's own input is saved by the first op (it is the previous block's output): counted once per block
    return sum(kept.values())

def per_token_block(cfg, bf16_params):
    torch.manual_seed(0)
    block = Block(cfg, 0).train()
    if bf16_params:
        block = block.to(torch.bfloat16)
    from minillm.model import rope_tables
    res = {}
    for T in (256, 512):
        cos, sin = rope_tables(cfg.head_dim, T, cfg.rope_theta)
        x = torch.randn(1, T, cfg.hidden_size, dtype=torch.bfloat16 if bf16_params else torch.float32,
                        requires_grad=True)
        res[T] = saved_bytes(block, x, cos, sin)
    slope = (res[512] - res[256]) / 256
    quad = res[256] - slope * 256
    return slope, quad, res

def block_params(cfg):
    return sum(p.numel() for p in Block(cfg, 0).parameters())

cfg = ModelConfig.preset("1b", kernel_backend="torch")
P = MiniLLM(cfg).num_params()
Pb = block_params(cfg)
root = P - cfg.num_hidden_layers * Pb
print(f"1b: {P/1e9:.3f}B params, block {Pb/1e6:.1f}M, root (tied embedding/head, final norm) {root/1e6:.1f}M")
for bf16 in (False, True):
    slope, quad, res = per_token_block(cfg, bf16)
    print(f"{'bf16 params (FSDP2 mp)' if bf16 else 'fp32 params + bf16 autocast (DDP)'}: saved per token per block "
          f"{slope/1024:.1f} KiB (constant part {quad/2**20:.2f} MiB), raw {res}")

# -- the table: per GPU, GiB, 1b preset, micro-batch of TOKENS tokens per GPU ------------------------------
TOKENS = 8 * 1024
L = cfg.num_hidden_layers
act_ddp, _, _ = per_token_block(cfg, False)
act_fsdp, _, _ = per_token_block(cfg, True)
head = TOKENS * (4 + 2) * cfg.hidden_size  # final norm input (fp32) + its bf16 output for the fused loss

def ddp(n, ckpt):
    params = 4 * P + 2 * P * (not ckpt)        # fp32 weights; autocast's bf16 copies stay saved for backward
    grads = 4 * P * (2 if n > 1 else 1)       # .grad + DDP's bucket copy (gradient_as_bucket_view off)
    optim = 8 * P
    if ckpt:  # block inputs (fp32 residual) + one block recomputed at a time (with its bf16 weight copy)
        acts = L * TOKENS * 4 * cfg.hidden_size + TOKENS * act_ddp + 2 * Pb + head
    else:
        acts = L * TOKENS * act_ddp + head
    return params, grads, optim, acts

def fsdp(n, ckpt):
    if n == 1:
        return ddp(1, ckpt)
    params = 4 * P / n + 2 * (3 * Pb + root)   # fp32 shards + bf16 gathered: 2 blocks in flight + the kept last one + root
    grads = 4 * P / n + (2 + 4) * Pb          # fp32 shards + one block's unsharded bf16 grads and their fp32 reduce copy
    optim = 8 * P / n
    if ckpt:
        acts = L * TOKENS * 2 * cfg.hidden_size + TOKENS * act_fsdp + head
    else:
        acts = L * TOKENS * act_fsdp + head
    return params, grads, optim, acts

print(f"\nper GPU, GiB, micro-batch {TOKENS} tokens per GPU")
print("| setup | GPUs | parameters | gradients | optimizer | activations | total |")
print("|---|---|---|---|---|---|---|")
for name, fn, ck in (("DDP", ddp, False), ("DDP + checkpointing", ddp, True), ("FSDP2", fsdp, False),
                     ("FSDP2 + checkpointing", fsdp, True)):
    for n in (1, 2, 8):
        parts = fn(n, ck)
        print(f"| {name} | {n} | " + " | ".join(f"{x / GiB:.2f}" for x in parts) + f" | **{sum(parts) / GiB:.1f}** |")

print("\nevery preset, total GiB per GPU (same micro-batch, 8 GPUs)")
for key in PRESETS:
    c = ModelConfig.preset(key, kernel_backend="torch")
    p = MiniLLM(c).num_params()
    print(key, f"{p/1e6:.1f}M", f"model states DDP {20*p/GiB:.2f} GiB, FSDP2@8 {16*p/8/GiB:.2f} GiB")
