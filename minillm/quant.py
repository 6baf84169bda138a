"""NF4 weights for QLoRA, hand-written (no bitsandbytes): a frozen base at ~4.5 bits per weight.

    report = quantize_model(model)                   # every nn.Linear in the decoder blocks -> NF4Linear
    params = apply_lora(model, rank=8)               # adapters (LoRA or DoRA) on top, in full precision
    print(report)                                    # base linear weights: 4.19 MB -> 0.59 MB (4.50 bits/weight)

NF4 (Dettmers et al. 2023, QLoRA): the flattened weight is cut into blocks of 64 values; each block
keeps its absolute maximum (fp32) and, per value, the index (4 bits) of the nearest of 16 "normal
float" levels in [-1, 1] (bitsandbytes' published table, below), two indices per byte, the first in
the high nibble. A value comes back as level[index] * absmax: the error is at most half the widest
gap between neighbouring levels times the block's absmax, and values that are levels come back exactly.

Double quantisation (the paper's second step, optional): the fp32 absmaxes minus their mean are
quantised again, to int8 in blocks of 256 with one fp32 scale per block, so the per-weight overhead
falls from 32/64 = 0.5 bits to 8/64 + 32/(64*256) ~= 0.127 bits. (bitsandbytes uses its non-linear
8-bit "dynamic" map there; this uses a linear int8 map: a different but bounded error.)

Forward dequantises the weight to the compute dtype (the autocast dtype under AMP) on the fly and
does one matmul; the backward dequantises again instead of keeping the full weight alive between
forward and backward (bitsandbytes' MatMul4Bit does the same), so only the 4-bit codes stay resident.
The weight is frozen: NF4Linear has no trainable weight, only its (full-precision) bias if any.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.errors import UserError

# bitsandbytes' NF4 levels (functional.py, get_4bit_type("nf4")): quantiles of N(0, 1) scaled to [-1, 1],
# with an exact 0 and 8 positive / 7 negative levels
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
BLOCK_SIZE, ABSMAX_BLOCK_SIZE = 64, 256
QUANT_TYPES = ("none", "nf4")


def nf4_levels(device=None) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def _blocks(flat: torch.Tensor, size: int) -> torch.Tensor:
    """[n] -> [ceil(n / size), size], zero-padded at the end."""
    pad = (-flat.numel()) % size
    return F.pad(flat, (0, pad)).view(-1, size)


def quantize_nf4(weight: torch.Tensor, block_size: int = BLOCK_SIZE, double_quant: bool = False) -> dict:
    """A float tensor -> {"codes": uint8 [ceil(n/block)*block/2] (two 4-bit level indices a byte),
    "absmax": fp32 [blocks]} or, with double_quant, the absmax as {"absmax_codes": int8 [blocks],
    "absmax_scale": fp32 [ceil(blocks/256)], "absmax_offset": fp32 []}."""
    if block_size <= 0 or block_size % 2:
        raise UserError(f"the NF4 block size must be a positive even number, got {block_size}")
    blocks = _blocks(weight.detach().reshape(-1).float(), block_size)
    absmax = blocks.abs().amax(dim=1)
    # an all-zero block has absmax 0: divide by 1 instead, every value is then level 0.0 (index 7)
    normalized = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)
    levels = nf4_levels(weight.device)
    # the nearest level: how many midpoints between neighbouring levels lie below the value
    idx = torch.bucketize(normalized, (levels[1:] + levels[:-1]) / 2).to(torch.uint8).view(-1)
    state = {"codes": (idx[0::2] << 4) | idx[1::2]}
    state.update(quantize_absmax(absmax) if double_quant else {"absmax": absmax})
    return state


def quantize_absmax(absmax: torch.Tensor, block_size: int = ABSMAX_BLOCK_SIZE) -> dict:
    """The second quantisation: (absmax - mean) to int8 per block of 256, scale = the block's absmax / 127."""
    offset = absmax.mean()
    blocks = _blocks(absmax - offset, block_size)
    scale = blocks.abs().amax(dim=1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
    codes = torch.round(blocks / safe * 127).clamp(-127, 127).to(torch.int8).view(-1)[:absmax.numel()]
    return {"absmax_codes": codes, "absmax_scale": scale, "absmax_offset": offset}


def dequantize_absmax(state: dict) -> torch.Tensor:
    if "absmax" in state:
        return state["absmax"]
    codes = state["absmax_codes"]
    blocks = _blocks(codes.float(), ABSMAX_BLOCK_SIZE) * (state["absmax_scale"].float() / 127).unsqueeze(1)
    return blocks.view(-1)[:codes.numel()] + state["absmax_offset"].float()


def dequantize_nf4(state: dict, shape, dtype=torch.float32, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """quantize_nf4's output -> the tensor of `shape` in `dtype` (level * absmax computed in fp32)."""
    return _dequantize(state["codes"], dequantize_absmax(state), shape, dtype, block_size)


def _byte_table(device) -> torch.Tensor:
    """[256, 2]: the two levels a byte holds (high nibble first), so one gather per byte decodes both."""
    levels, byte = nf4_levels(device), torch.arange(256, device=device)
    return torch.stack([levels[byte >> 4], levels[byte & 15]], dim=1)


def _dequantize(codes, absmax, shape, dtype, block_size: int) -> torch.Tensor:
    values = _byte_table(codes.device)[codes.long()].view(-1, block_size) * absmax.float().unsqueeze(1)
    n = math.prod(shape)
    return values.view(-1)[:n].view(shape).to(dtype)


def nf4_error_bound() -> float:
    """Half the widest gap between neighbouring NF4 levels (times a block's absmax: the round-trip bound)."""
    return max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:])) / 2


class _NF4Matmul(torch.autograd.Function):
    """x @ dequant(W).T without saving the dequantised W for backward: it is rebuilt there from the codes
    (which stay resident anyway). W is frozen, so only x gets a gradient."""

    @staticmethod
    def forward(ctx, x, codes, absmax, out_features: int, block_size: int):
        ctx.save_for_backward(codes, absmax)
        ctx.shape, ctx.block_size = (out_features, x.shape[-1]), block_size
        return F.linear(x, _dequantize(codes, absmax, ctx.shape, x.dtype, block_size))

    @staticmethod
    def backward(ctx, grad_out):
        codes, absmax = ctx.saved_tensors
        return grad_out @ _dequantize(codes, absmax, ctx.shape, grad_out.dtype, ctx.block_size), None, None, None, None


# ---- the Triton dequant-matmul (opt-in: NF4Linear.kernel = "triton", train_lora.py --quant_kernel triton) ----
_TRITON_KERNEL = None


def _triton_kernel():
    """Built on first use, so importing this module never imports Triton (and TRITON_INTERPRET=1, set
    before the first call, gives the interpreted kernel the CPU tests run)."""
    global _TRITON_KERNEL
    if _TRITON_KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def nf4_matmul(a_ptr, codes_ptr, absmax_ptr, levels_ptr, c_ptr, M, N, K,
                       stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                       QBLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PRECISION: tl.constexpr):
            # C = A @ B with B[k, n] the NF4 weight's value at flat index k * stride_bk + n * stride_bn:
            # the forward passes B = W^T (stride_bk 1, stride_bn in), the backward B = W (in, 1).
            # Each [BLOCK_K, BLOCK_N] tile of B is dequantised in registers and never written out.
            rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
            rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                            mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
                idx = rk[:, None].to(tl.int64) * stride_bk + rn[None, :].to(tl.int64) * stride_bn
                inside = (rk[:, None] < K) & (rn[None, :] < N)
                byte = tl.load(codes_ptr + idx // 2, mask=inside, other=0).to(tl.int32)
                level = tl.load(levels_ptr + tl.where(idx % 2 == 0, byte >> 4, byte & 15))
                scale = tl.load(absmax_ptr + idx // QBLOCK, mask=inside, other=0.0)
                b = (level * scale).to(a_ptr.dtype.element_ty)  # as the torch path: the fp32 product, then cast
                acc += tl.dot(a, b, input_precision=PRECISION)
            tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
                     mask=(rm[:, None] < M) & (rn[None, :] < N))

        _TRITON_KERNEL = nf4_matmul
    return _TRITON_KERNEL


def triton_nf4_matmul(a: torch.Tensor, codes, absmax, in_features: int, out_features: int, block_size: int,
                      transpose: bool) -> torch.Tensor:
    """a [M, in] @ W.T (transpose, the forward) or a [M, out] @ W (the backward's input gradient)."""
    kernel = _triton_kernel()
    a = a.contiguous()
    M, K = a.shape
    N = out_features if transpose else in_features
    strides = (1, in_features) if transpose else (in_features, 1)
    c = torch.empty(M, N, dtype=a.dtype, device=a.device)
    BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32
    grid = ((M + BLOCK_M - 1) // BLOCK_M, (N + BLOCK_N - 1) // BLOCK_N)
    kernel[grid](a, codes, absmax.float().contiguous(), nf4_levels(a.device), c, M, N, K,
                 a.stride(0), a.stride(1), *strides, c.stride(0), c.stride(1), QBLOCK=block_size,
                 BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                 PRECISION="ieee" if a.dtype == torch.float32 else "tf32")
    return c


class _NF4TritonMatmul(torch.autograd.Function):
    """_NF4Matmul with both products in the Triton kernel (x is [M, in], 2-D and contiguous)."""

    @staticmethod
    def forward(ctx, x, codes, absmax, out_features: int, block_size: int):
        ctx.save_for_backward(codes, absmax)
        ctx.in_features, ctx.out_features, ctx.block_size = x.shape[-1], out_features, block_size
        return triton_nf4_matmul(x, codes, absmax, x.shape[-1], out_features, block_size, transpose=True)

    @staticmethod
    def backward(ctx, grad_out):
        codes, absmax = ctx.saved_tensors
        grad_x = triton_nf4_matmul(grad_out, codes, absmax, ctx.in_features, ctx.out_features, ctx.block_size,
                                   transpose=False)
        return grad_x, None, None, None, None


class NF4Linear(nn.Module):
    """A frozen nn.Linear whose weight is stored as NF4 blocks (buffers `codes`, `absmax` or the double-
    quantised `absmax_codes` / `absmax_scale` / `absmax_offset`); the bias, if any, stays as it was."""

    def __init__(self, linear: nn.Linear, block_size: int = BLOCK_SIZE, double_quant: bool = False,
                 device=None):
        super().__init__()
        w = linear.weight if device is None else linear.weight.to(device)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.block_size, self.double_quant = block_size, double_quant
        self.kernel = "torch"  # or "triton": the fused dequant-matmul on CUDA (see triton_nf4_matmul)
        self.dtype = w.dtype  # what dequantize() returns by default: the weight's original dtype
        for name, tensor in quantize_nf4(w, block_size, double_quant).items():
            self.register_buffer(name, tensor)
        self.bias = linear.bias if linear.bias is None or device is None else nn.Parameter(linear.bias.to(device))
        if self.bias is not None:
            self.bias.requires_grad_(False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = BLOCK_SIZE, double_quant: bool = False):
        return cls(linear, block_size, double_quant)

    def quant_state(self) -> dict:
        names = ("absmax_codes", "absmax_scale", "absmax_offset") if self.double_quant else ("absmax",)
        return {name: getattr(self, name) for name in ("codes",) + names}

    def dequantize(self, dtype=None) -> torch.Tensor:
        return dequantize_nf4(self.quant_state(), (self.out_features, self.in_features), dtype or self.dtype,
                              self.block_size)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (a new tensor each time: writing into it changes nothing)."""
        return self.dequantize()

    def forward(self, x, bias: bool = True):
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x = x.to(dtype)
        absmax = dequantize_absmax(self.quant_state())
        with torch.autocast(x.device.type, enabled=False):  # x and the weight are already in the compute dtype
            if self.kernel == "triton" and (x.is_cuda or _interpreting()):
                flat = x.reshape(-1, self.in_features).contiguous()
                out = _NF4TritonMatmul.apply(flat, self.codes, absmax, self.out_features, self.block_size)
                out = out.view(*x.shape[:-1], self.out_features)
            else:
                out = _NF4Matmul.apply(x, self.codes, absmax, self.out_features, self.block_size)
        if bias and self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def _apply(self, fn, recurse=True):
        """model.to(dtype) / .half() keep the scales in fp32 (a bf16 absmax would move every value by up to
        0.4%) and only change the dtype the weight is dequantised to; device moves apply to everything."""
        scales = {name: t for name, t in self._buffers.items() if t is not None and t.is_floating_point()}
        super()._apply(fn, recurse)
        for name, before in scales.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:
                self.dtype = after.dtype
                self._buffers[name] = before.to(after.device)
        return self

    def nbytes(self) -> int:
        """Bytes the quantised weight takes (codes and scales; the bias is not counted)."""
        return sum(t.numel() * t.element_size() for t in self.quant_state().values())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4 block={self.block_size}, "
                f"double_quant={self.double_quant}, dtype={self.dtype}")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def set_kernel(model: nn.Module, kernel: str) -> None:
    """"torch" (dequantise, then one matmul: every device) or "triton" (the fused kernel, CUDA tensors;
    elsewhere the torch path runs) for every NF4Linear in `model`."""
    if kernel not in ("torch", "triton"):
        raise UserError(f"unknown NF4 kernel {kernel!r}; choose torch or triton")
    for m in model.modules():
        if isinstance(m, NF4Linear):
            m.kernel = kernel


def quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear modules inside the decoder blocks (attention and MLP / expert projections); the
    embedding, the output head and the MoE router (`mlp.gate`, which picks experts) stay as they are."""
    return [(name, m) for name, m in model.named_modules()
            if type(m) is nn.Linear and ".layers." in f".{name}" and not name.endswith(".gate")]


def quantize_model(model: nn.Module, quant_type: str = "nf4", block_size: int = BLOCK_SIZE,
                   double_quant: bool = False, device=None) -> dict:
    """Replace the decoder blocks' nn.Linear layers by NF4Linear in place (before adapters go in), quantising
    on `device` if given (a GPU does it much faster; the NF4 layers then live there);
    -> {"n_layers", "n_weights", "bytes_before", "bytes_after", "bits_per_weight"} of those weights."""
    if quant_type not in QUANT_TYPES:
        raise UserError(f"unknown --quantize {quant_type!r}; choose one of {list(QUANT_TYPES)}")
    inner = getattr(getattr(model, "module", model), "_orig_mod", getattr(model, "module", model))
    if any(type(m).__name__ == "LoRALinear" for m in inner.modules()):
        raise UserError("quantize the base model before adding LoRA adapters (the adapters wrap the NF4 layers)")
    report = {"n_layers": 0, "n_weights": 0, "bytes_before": 0, "bytes_after": 0, "bits_per_weight": 0.0}
    if quant_type == "none":
        return report
    layers = quantizable_linears(inner)
    if not layers:
        raise UserError("--quantize nf4: the model has no nn.Linear layers inside decoder blocks to quantise")
    for name, linear in layers:
        parent_name, _, child = name.rpartition(".")
        q = NF4Linear(linear, block_size, double_quant, device)
        setattr(inner.get_submodule(parent_name) if parent_name else inner, child, q)
        report["n_layers"] += 1
        report["n_weights"] += linear.weight.numel()
        report["bytes_before"] += linear.weight.numel() * linear.weight.element_size()
        report["bytes_after"] += q.nbytes()
    report["bits_per_weight"] = 8 * report["bytes_after"] / report["n_weights"]
    return report


def dequantize_model(model: nn.Module) -> nn.Module:
    """Every NF4Linear -> an nn.Linear holding its dequantised weight (the same function, full precision,
    4-bit rounding included): what a quantised model's merged export holds."""
    for name, q in [(n, m) for n, m in model.named_modules() if isinstance(m, NF4Linear)]:
        linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=q.codes.device,
                           dtype=q.dtype)
        with torch.no_grad():
            linear.weight.copy_(q.dequantize())
            if q.bias is not None:
                linear.bias.copy_(q.bias)
        linear.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return model


def quant_settings(model: nn.Module) -> dict | None:
    """{"type": "nf4", "block_size", "double_quant"} of the model's NF4 layers, or None (not quantised)."""
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    if not layers:
        return None
    return {"type": "nf4", "block_size": layers[0].block_size, "double_quant": layers[0].double_quant}


def describe(report: dict) -> str:
    return (f"NF4 base: {report['n_layers']} linear layers, {report['n_weights'] / 1e6:.2f}M weights: "
            f"{report['bytes_before'] / 2**20:.2f} MiB -> {report['bytes_after'] / 2**20:.2f} MiB "
            f"({report['bits_per_weight']:.3f} bits/weight)")
