"""LoRA and DoRA, hand-written: low-rank adapters injected into nn.Linear modules chosen by name.

    params = apply_lora(model, rank=8, alpha=16)       # base frozen; only `params` train
    params = apply_lora(model, use_dora=True)          # DoRA: + a magnitude per output row
    save_lora("out/lora_medical", model, {"train": cfg.to_dict()})
    load_lora(base_model, "out/lora_medical")          # applies the same adapters, loads them
    merge_lora(model)                                  # W += scaling * B @ A: plain Llama weights again
    with lora_disabled(model): ref_logits = model(x)   # the base model, no second copy (DPO reference)

A wrapped layer computes base(x) + scaling * B(A(dropout(x))), with PEFT's initialisation
(A kaiming-uniform with a=sqrt(5), B zeros, so a fresh adapter changes nothing) and scaling
alpha / r, or alpha / sqrt(r) with rsLoRA. The state_dict of a wrapped layer keeps the plain
name `<layer>.weight` for the base weight (not `<layer>.base.weight`), so checkpoints of a
merged model load anywhere a plain model's do.

DoRA (Liu et al. 2024), as PEFT's DoraLinearLayer: W' = m * (W + s B A) / ||W + s B A||, the norm
taken per output row and detached from the graph (the paper's section 4.3), m (`lora_magnitude_vector`,
[out]) starting at ||W|| so a fresh DoRA adapter also changes nothing. The base may be an NF4Linear
(minillm.quant: QLoRA); merging into it dequantises, merges and keeps the merged weight in full precision.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from minillm.checkpoint import atomic_folder, read_safetensors, resolve_checkpoint
from minillm.config import load_yaml
from minillm.errors import NotFound, UserError
from minillm.quant import NF4Linear, dequantize_model, quant_settings, quantize_model

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.yaml"
LORA_PARAMS = ("lora_A", "lora_B")
DORA_PARAM = "lora_magnitude_vector"
ADAPTER_PARAMS = LORA_PARAMS + (DORA_PARAM,)


class LoRALinear(nn.Module):
    """A frozen `base` (nn.Linear, or NF4Linear for QLoRA) plus a trainable low-rank update B @ A
    (rank r); with `use_dora`, also a trainable magnitude per output row (DoRA)."""

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
                 rslora: bool = False, use_dora: bool = False):
        super().__init__()
        if rank <= 0:
            raise UserError(f"LoRA rank (--lora_rank) must be positive, got {rank}")
        self.base = base
        self.base.requires_grad_(False)
        self.r, self.alpha, self.rslora, self.use_dora = rank, alpha, rslora, use_dora
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        w = self.base_weight()
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT (and nn.Linear's default)
        if use_dora:  # PEFT: ||W + s B A|| per output row, = ||W|| while B is zero
            self.lora_magnitude_vector = nn.Parameter(self.weight_norm(w, self.delta_weight().detach()))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        self.merged = False
        self._merge_state = None  # what unmerge needs: DoRA's norm, the NF4 base (not module state)
        # state_dict names: `weight`/`bias` as a plain nn.Linear (see the module docstring)
        self.register_state_dict_post_hook(_rename_on_save)
        self.register_load_state_dict_pre_hook(_rename_on_load)
        self.register_load_state_dict_post_hook(_lora_keys_optional)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def quantized(self) -> bool:
        return isinstance(self.base, NF4Linear)

    def base_weight(self, dtype=None) -> torch.Tensor:
        """W [out, in]: the base's weight, dequantised when the base is NF4."""
        if self.quantized:
            return self.base.dequantize(dtype)
        return self.base.weight if dtype is None else self.base.weight.to(dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    @staticmethod
    def weight_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """||W + delta|| over each output row (PEFT's DoraLinearLayer.get_weight_norm, dim 1 of [out, in])."""
        return torch.linalg.norm(weight + delta, dim=1).to(weight.dtype)

    def _base_matmul(self, x):
        """W x without the bias."""
        return self.base(x, bias=False) if self.quantized else F.linear(x, self.base.weight)

    def forward(self, x):
        out = self.base(x)
        if not self.enabled or self.merged:
            return out
        if not self.use_dora:
            return out + (self.lora_dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling
        # DoRA, as PEFT computes it: out + (m/n - 1) * W x' + (m/n) * s * B A x', x' the adapter's
        # (dropped-out) input; without dropout W x' is the base output less its bias. n = ||W + s B A||
        # per row, detached: the gradient reaches m, A and B but not through the norm.
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_out = out if self.base.bias is None else out - self.base.bias
        else:
            x = self.lora_dropout(x)
            base_out = self._base_matmul(x)
        weight = self.base_weight(x.dtype)
        norm = self.weight_norm(weight, self.delta_weight().detach().to(x.dtype)).detach()
        scale = (self.lora_magnitude_vector / norm).view(1, -1)
        lora_out = x @ self.lora_A.t() @ self.lora_B.t()
        return out + (scale - 1) * base_out + scale * lora_out * self.scaling

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The weight the adapter's forward amounts to: W + s B A, or DoRA's m * (W + s B A) / ||W + s B A||."""
        weight = self.base_weight()
        delta = self.delta_weight().to(weight.dtype)
        if not self.use_dora:
            return weight + delta
        return (self.lora_magnitude_vector / self.weight_norm(weight, delta)).view(-1, 1) * (weight + delta)

    @torch.no_grad()
    def merge(self):
        """Fold the update into the base weight; forward is then one matmul. An NF4 base is dequantised
        and replaced by a full-precision nn.Linear holding the merged weight (merging into 4 bits would
        round the update away); unmerge brings the very same NF4 base back."""
        if self.merged:
            return
        if self.quantized:
            nf4 = self.base
            merged = nn.Linear(nf4.in_features, nf4.out_features, bias=nf4.bias is not None,
                               device=nf4.codes.device, dtype=nf4.dtype)
            merged.weight.copy_(self.merged_weight())
            if nf4.bias is not None:
                merged.bias.copy_(nf4.bias)
            merged.requires_grad_(False)
            self._merge_state = {"nf4": nf4}
            self.base = merged
        else:
            weight = self.base.weight
            delta = self.delta_weight().to(weight.dtype)
            if self.use_dora:  # PEFT: the norm of the unmerged weight is kept, for unmerge
                norm = self.weight_norm(weight, delta)
                self._merge_state = {"norm": norm}
                weight.copy_((self.lora_magnitude_vector / norm).view(-1, 1) * (weight + delta))
            else:
                weight += delta
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Take the update back out of the base weight (exact up to float rounding; exact for NF4)."""
        if not self.merged:
            return
        state, self._merge_state = self._merge_state or {}, None
        if "nf4" in state:
            self.base = state["nf4"].to(self.base.weight.device)
        elif self.use_dora:
            weight = self.base.weight
            factor = (self.lora_magnitude_vector / state["norm"]).view(-1, 1)
            weight.copy_(weight / factor - self.delta_weight().to(weight.dtype))
        else:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False

    def adapter_params(self) -> list[nn.Parameter]:
        return [getattr(self, name) for name in adapter_param_names(self)]

    def extra_repr(self) -> str:
        return (f"rank={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, dora={self.use_dora}, "
                f"merged={self.merged}")


def adapter_param_names(module: LoRALinear) -> tuple[str, ...]:
    return ADAPTER_PARAMS if module.use_dora else LORA_PARAMS


def _rename_on_save(module, state_dict, prefix, local_metadata):
    for name in ("weight", "bias"):
        if prefix + "base." + name in state_dict:
            state_dict[prefix + name] = state_dict.pop(prefix + "base." + name)
    for name in adapter_param_names(module):  # after the weight, and gone once merged (the weight holds them)
        tensor = state_dict.pop(prefix + name)
        if not module.merged:
            state_dict[prefix + name] = tensor


def _rename_on_load(module, state_dict, prefix, *args):
    for name in ("weight", "bias"):
        if prefix + name in state_dict:
            state_dict[prefix + "base." + name] = state_dict.pop(prefix + name)


def _lora_keys_optional(module, incompatible_keys):
    # a plain (or merged) checkpoint has no adapter: loading it into a LoRA model keeps the adapter
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not k.endswith(ADAPTER_PARAMS)]


def _matches(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in _unwrap(model).named_modules() if isinstance(m, LoRALinear)}


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def lora_targets(model: nn.Module, targets=DEFAULT_TARGETS) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent module, attribute name, nn.Linear) for every linear layer whose name ends with one of
    `targets` (a tuple or a comma-separated string): the layers an adapter goes into. NF4Linear layers
    (a quantised base, minillm.quant) count as linear layers."""
    model = _unwrap(model)
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters; merge_lora() or load a fresh base first")
    linear_names = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear))]
    chosen = [(name, model.get_submodule(name)) for name in linear_names if _matches(name, targets)]
    unmatched = [t for t in targets if not any(_matches(name, (t,)) for name in linear_names)]
    if unmatched or not chosen:
        linears = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
        what = f"the LoRA targets {list(targets)}" if not chosen else f"the LoRA target(s) {unmatched}"
        raise UserError(f"no nn.Linear module matches {what} (--lora_targets); this model's linear layers "
                        f"are named {linears}: pick from those, comma-separated")
    found = []
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        found.append((model.get_submodule(parent_name) if parent_name else model, child, linear))
    return found


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
               targets=DEFAULT_TARGETS, rslora: bool = False, use_dora: bool = False) -> list[nn.Parameter]:
    """Freeze the model and wrap every targeted nn.Linear in a LoRALinear; -> the adapter
    parameters (what the optimizer gets). train_lora.py spells the same loop out."""
    layers = lora_targets(model, targets)
    _unwrap(model).requires_grad_(False)
    params = []
    for parent, name, linear in layers:
        wrapped = LoRALinear(linear, rank, alpha, dropout, rslora, use_dora)
        setattr(parent, name, wrapped)
        params += wrapped.adapter_params()
    return params


def lora_settings(model: nn.Module) -> dict:
    """rank / alpha / dropout / rslora / use_dora / targets of the adapters in `model`, and the base's
    quantisation (None, or minillm.quant's settings): what load_lora needs."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA adapters (call apply_lora or load_lora first)")
    first = next(iter(modules.values()))
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    targets = sorted({name.rsplit(".", 1)[-1] for name in modules})
    return {"rank": first.r, "alpha": first.alpha, "dropout": dropout, "rslora": first.rslora,
            "use_dora": first.use_dora, "targets": targets, "quantize": quant_settings(_unwrap(model))}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors: `<layer>.lora_A` [r, in] and `<layer>.lora_B` [out, r] (and with DoRA
    `<layer>.lora_magnitude_vector` [out]), on CPU."""
    state = {}
    for name, m in lora_modules(model).items():
        for p in adapter_param_names(m):
            state[f"{name}.{p}"] = getattr(m, p).detach().contiguous().cpu()
    return state


def save_lora(folder, model: nn.Module, config: dict | None = None,
              trainer_state: dict | None = None) -> Path:
    """Write adapter.safetensors + adapter_config.yaml (the adapter's settings, the base model's
    shape, and `config`, e.g. the training recipe) atomically; `trainer_state` makes it resumable."""
    from minillm.checkpoint import STATE
    inner = _unwrap(model)
    if any(m.merged for m in lora_modules(inner).values()):
        raise ValueError("cannot save a merged adapter: unmerge_lora(model) first")
    doc = {"lora": lora_settings(inner)}
    if hasattr(inner, "config") and hasattr(inner.config, "to_dict"):
        doc["base_model"] = inner.config.to_dict()
    doc.update(config or {})
    with atomic_folder(folder) as tmp:
        save_file(lora_state_dict(inner), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / STATE)
    return Path(folder)


def read_lora_config(folder) -> dict:
    folder = resolve_checkpoint(folder, marker=ADAPTER_WEIGHTS)
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise NotFound(f"{path} does not exist: the adapter folder {folder} is incomplete; train it again")
    doc = load_yaml(path)
    if not isinstance(doc.get("lora"), dict):
        raise UserError(f"{path} has no 'lora' section; it was not written by save_lora")
    return doc


def load_lora(model: nn.Module, folder, quantize: bool = True) -> nn.Module:
    """Apply the adapters described in folder/adapter_config.yaml to `model` (unless it already
    has them) and load their weights. Errors clearly when the adapter was trained on another base.

    An adapter trained on an NF4 base (QLoRA) records it, and the base is quantised the same way
    first (the adapter learnt to correct that base); quantize=False keeps the full-precision base."""
    try:
        folder = resolve_checkpoint(folder, marker=ADAPTER_WEIGHTS)
    except FileNotFoundError:
        raise NotFound(f"no LoRA adapter at {folder} (expected {Path(folder) / ADAPTER_WEIGHTS}); "
                       f"train one with train_lora.py or pass the right --lora_name / folder") from None
    settings = read_lora_config(folder)["lora"]
    state = read_safetensors(folder / ADAPTER_WEIGHTS)
    inner = _unwrap(model)
    recorded = settings.get("quantize")
    if lora_modules(inner):  # adapters already in (a resumed run): they must be of the same kind, on the same base
        have = lora_settings(inner)
        if have["use_dora"] != settings.get("use_dora", False) or (quantize and have["quantize"] != recorded):
            raise UserError(f"{folder} holds an adapter with use_dora={settings.get('use_dora', False)} on a base "
                            f"quantised as {recorded}, but this model's adapters have use_dora={have['use_dora']} "
                            f"on a base quantised as {have['quantize']}; use the same --use_dora / --quantize / "
                            f"--double_quant as the run that wrote it")
    else:
        if quantize and recorded and quant_settings(inner) is None:
            quantize_model(inner, recorded["type"], recorded["block_size"], recorded["double_quant"])
        apply_lora(inner, settings["rank"], settings["alpha"], settings.get("dropout", 0.0),
                   settings["targets"], settings.get("rslora", False), settings.get("use_dora", False))
    modules = lora_modules(inner)
    wanted = {f"{name}.{p}" for name, m in modules.items() for p in adapter_param_names(m)}
    missing, unexpected = sorted(wanted - set(state)), sorted(set(state) - wanted)
    if missing or unexpected:
        raise UserError(f"{folder / ADAPTER_WEIGHTS} does not fit this model's layers: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]} (was it trained on another base model?)")
    with torch.no_grad():
        for key, tensor in state.items():
            name, p = key.rsplit(".", 1)
            param = getattr(modules[name], p)
            if param.shape != tensor.shape:
                m = modules[name]
                raise UserError(f"{folder}: adapter {key} has shape {list(tensor.shape)} but this base's "
                                f"{name} is [{m.out_features}, {m.in_features}] with rank {m.r}; the adapter "
                                f"was trained on a base of another shape")
            param.copy_(tensor)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer: a plain model again. On an NF4 base (QLoRA) the merged layers
    hold dequantised W + update in full precision, and the layers without an adapter are dequantised too,
    so the whole model is plain nn.Linear (4-bit rounding included: the base the adapter was trained on);
    unmerge_lora puts the adapted layers back on their NF4 blocks, the others stay dequantised."""
    for m in lora_modules(model).values():
        m.merge()
    dequantize_model(_unwrap(model))
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for m in lora_modules(model).values():
        m.unmerge()
    return model


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Every adapter off inside the block: the model computes its base (DPO's reference model)."""
    modules = list(lora_modules(model).values())
    if any(m.merged for m in modules):
        raise ValueError("lora_disabled needs unmerged adapters (the merged update is inside the weights)")
    before = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(modules, before):
            m.enabled = was


def add_lora_flags(parser):
    """The adapter flags every LoRA-capable stage script takes (train_lora.py, train_dpo.py), on a
    parser or an argument group."""
    parser.add_argument("--lora_rank", type=int, default=8, help="rank r of each adapter")
    parser.add_argument("--lora_alpha", type=float, default=16, help="scaling numerator: update = alpha/r * B @ A")
    parser.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the adapter's input")
    parser.add_argument("--lora_targets", default=",".join(DEFAULT_TARGETS),
                        help="comma-separated names of the nn.Linear modules to adapt (matched by name suffix)")
    parser.add_argument("--use_rslora", type=int, default=0, help="1 = rsLoRA scaling alpha/sqrt(r)")
