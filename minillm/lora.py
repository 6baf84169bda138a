"""LoRA, hand-written: low-rank adapters injected into nn.Linear modules chosen by name.

    params = apply_lora(model, rank=8, alpha=16)       # base frozen; only `params` train
    save_lora("out/lora_medical", model, {"train": cfg.to_dict()})
    load_lora(base_model, "out/lora_medical")          # applies the same adapters, loads them
    merge_lora(model)                                  # W += scaling * B @ A: plain Llama weights again
    with lora_disabled(model): ref_logits = model(x)   # the base model, no second copy (DPO reference)

A wrapped layer computes base(x) + scaling * B(A(dropout(x))), with PEFT's initialisation
(A kaiming-uniform with a=sqrt(5), B zeros, so a fresh adapter changes nothing) and scaling
alpha / r, or alpha / sqrt(r) with rsLoRA. The state_dict of a wrapped layer keeps the plain
name `<layer>.weight` for the base weight (not `<layer>.base.weight`), so checkpoints of a
merged model load anywhere a plain model's do.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from safetensors.torch import save_file

from minillm.checkpoint import atomic_folder, read_safetensors, resolve_checkpoint
from minillm.config import load_yaml
from minillm.errors import NotFound, UserError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.yaml"
LORA_PARAMS = ("lora_A", "lora_B")


class LoRALinear(nn.Module):
    """A frozen `base` nn.Linear plus a trainable low-rank update B @ A (rank r)."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
                 rslora: bool = False):
        super().__init__()
        if rank <= 0:
            raise UserError(f"LoRA rank (--lora_rank) must be positive, got {rank}")
        self.base = base
        self.base.requires_grad_(False)
        self.r, self.alpha, self.rslora = rank, alpha, rslora
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT (and nn.Linear's default)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        self.merged = False
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

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x):
        out = self.base(x)
        if self.enabled and not self.merged:
            out = out + (self.lora_dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling
        return out

    @torch.no_grad()
    def merge(self):
        """Fold the update into the base weight (W += scaling * B @ A); forward is then one matmul."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Take the update back out of the base weight (exact up to float rounding)."""
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}"


def _rename_on_save(module, state_dict, prefix, local_metadata):
    for name in ("weight", "bias"):
        if prefix + "base." + name in state_dict:
            state_dict[prefix + name] = state_dict.pop(prefix + "base." + name)
    for name in LORA_PARAMS:  # after the weight, and gone once merged (the weight holds them)
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
    missing[:] = [k for k in missing if not k.endswith(LORA_PARAMS)]


def _matches(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in _unwrap(model).named_modules() if isinstance(m, LoRALinear)}


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def lora_targets(model: nn.Module, targets=DEFAULT_TARGETS) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent module, attribute name, nn.Linear) for every linear layer whose name ends with one of
    `targets` (a tuple or a comma-separated string): the layers an adapter goes into."""
    model = _unwrap(model)
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters; merge_lora() or load a fresh base first")
    linear_names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
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
               targets=DEFAULT_TARGETS, rslora: bool = False) -> list[nn.Parameter]:
    """Freeze the model and wrap every targeted nn.Linear in a LoRALinear; -> the adapter
    parameters (what the optimizer gets). train_lora.py spells the same loop out."""
    layers = lora_targets(model, targets)
    _unwrap(model).requires_grad_(False)
    params = []
    for parent, name, linear in layers:
        wrapped = LoRALinear(linear, rank, alpha, dropout, rslora)
        setattr(parent, name, wrapped)
        params += [wrapped.lora_A, wrapped.lora_B]
    return params


def lora_settings(model: nn.Module) -> dict:
    """rank / alpha / dropout / rslora / targets of the adapters in `model` (what load_lora needs)."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA adapters (call apply_lora or load_lora first)")
    first = next(iter(modules.values()))
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    targets = sorted({name.rsplit(".", 1)[-1] for name in modules})
    return {"rank": first.r, "alpha": first.alpha, "dropout": dropout, "rslora": first.rslora, "targets": targets}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors: `<layer>.lora_A` [r, in] and `<layer>.lora_B` [out, r], on CPU."""
    state = {}
    for name, m in lora_modules(model).items():
        for p in LORA_PARAMS:
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


def load_lora(model: nn.Module, folder) -> nn.Module:
    """Apply the adapters described in folder/adapter_config.yaml to `model` (unless it already
    has them) and load their weights. Errors clearly when the adapter was trained on another base."""
    try:
        folder = resolve_checkpoint(folder, marker=ADAPTER_WEIGHTS)
    except FileNotFoundError:
        raise NotFound(f"no LoRA adapter at {folder} (expected {Path(folder) / ADAPTER_WEIGHTS}); "
                       f"train one with train_lora.py or pass the right --lora_name / folder") from None
    settings = read_lora_config(folder)["lora"]
    state = read_safetensors(folder / ADAPTER_WEIGHTS)
    inner = _unwrap(model)
    if not lora_modules(inner):
        apply_lora(inner, settings["rank"], settings["alpha"], settings.get("dropout", 0.0),
                   settings["targets"], settings.get("rslora", False))
    modules = lora_modules(inner)
    wanted = {f"{name}.{p}" for name in modules for p in LORA_PARAMS}
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
    for m in lora_modules(model).values():
        m.merge()
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
