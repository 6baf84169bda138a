"""Configuration: the model's shape (ModelConfig), a stage's recipe (TrainConfig), presets,
yaml round-trips and command-line overrides.

Resolution order for a stage script: dataclass defaults < the stage's own defaults <
`--preset NAME` < `--config FILE.yaml` < flags given on the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class ModelConfig:
    vocab_size: int = _help("vocabulary size (must match the tokenizer)", default=6400)
    hidden_size: int = _help("model width", default=512)
    num_hidden_layers: int = _help("number of decoder blocks", default=8)
    num_attention_heads: int = _help("query heads", default=8)
    num_key_value_heads: int = _help("key/value heads (grouped-query attention; divides num_attention_heads)",
                                     default=2)
    head_dim: int = _help("per-head dim; 0 = hidden_size // num_attention_heads", default=0)
    intermediate_size: int = _help("SwiGLU width; 0 = 8/3 * hidden rounded up to a multiple of 64", default=0)
    max_position_embeddings: int = _help("longest sequence the model is meant for", default=32768)
    rope_theta: float = _help("RoPE base", default=1e6)
    rms_norm_eps: float = _help("RMSNorm epsilon", default=1e-5)
    tie_word_embeddings: bool = _help("share the input embedding and the output head", default=True)
    qk_norm: bool = _help("RMSNorm on queries and keys per head (Qwen3 style)", default=False)
    dropout: float = _help("dropout on attention output and MLP output", default=0.0)
    initializer_range: float = _help("std of the normal init", default=0.02)
    # mixture of experts
    use_moe: bool = _help("replace every MLP by a mixture of experts", default=False)
    n_routed_experts: int = _help("routed experts per MoE layer", default=4)
    num_experts_per_tok: int = _help("experts each token is sent to (top-k)", default=2)
    n_shared_experts: int = _help("experts every token always goes through", default=1)
    moe_intermediate_size: int = _help("width of each expert; 0 = intermediate_size", default=0)
    norm_topk_prob: bool = _help("renormalise the top-k gate weights to sum to 1", default=True)
    aux_loss_coef: float = _help("weight of the load-balancing loss added to the training loss", default=0.01)
    # which kernels run: "auto" = Triton on CUDA, torch elsewhere
    kernel_backend: str = _help("kernels: auto | triton | torch", default="auto")

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size == 0:
            self.intermediate_size = 64 * math.ceil(self.hidden_size * 8 / 3 / 64)
        if self.moe_intermediate_size == 0:
            self.moe_intermediate_size = self.intermediate_size
        self.validate()

    def validate(self):
        problems = []
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for RoPE")
        if self.use_moe and not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            problems.append(f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                            f"1..n_routed_experts={self.n_routed_experts}")
        if self.kernel_backend not in ("auto", "triton", "torch"):
            problems.append(f"kernel_backend={self.kernel_backend!r} must be auto, triton or torch")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    # -- presets and serialisation -------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**_known_fields(cls, d, "model"))

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count computed from the shape (equals the module's, tied embeddings once)."""
        h, L, d = self.hidden_size, self.num_hidden_layers, self.head_dim
        attn = h * d * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        if self.qk_norm:
            attn += 2 * d
        if self.use_moe:
            mlp = (self.n_routed_experts + self.n_shared_experts) * 3 * h * self.moe_intermediate_size
            mlp += h * self.n_routed_experts  # router
        else:
            mlp = 3 * h * self.intermediate_size
        total = L * (attn + mlp + 2 * h) + h  # + final norm
        if not non_embedding:
            total += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return total


PRESETS: dict[str, dict[str, Any]] = {
    # tiny, for unit tests and integration runs
    "debug": dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024),
    # what train_pretrain.py trains with no arguments: learns the demo corpus on a laptop CPU in minutes
    "demo": dict(vocab_size=2048, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, max_position_embeddings=2048),
    "minimind2-small": dict(vocab_size=6400, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=2),
    "minimind2": dict(vocab_size=6400, hidden_size=768, num_hidden_layers=16, num_attention_heads=8,
                      num_key_value_heads=2),
    "minimind2-moe": dict(vocab_size=6400, hidden_size=640, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=2, use_moe=True, n_routed_experts=4, num_experts_per_tok=2,
                          n_shared_experts=1),
    "minimind-3": dict(vocab_size=6400, hidden_size=768, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=96, intermediate_size=2432, rope_theta=1e6),
    # the mini_qwen scale: ~1.0B parameters
    "1b": dict(vocab_size=6400, hidden_size=2048, num_hidden_layers=22, num_attention_heads=16,
               num_key_value_heads=4, intermediate_size=5632),
}


@dataclass
class TrainConfig:
    """A stage's recipe. Field names follow MiniMind's flags so its commands carry over."""
    data_path: str = _help("training data (jsonl)", default="dataset/demo/pretrain.jsonl")
    save_dir: str = _help("where checkpoints are written", default="out")
    save_weight: str = _help("checkpoint name: the run is saved under save_dir/save_weight", default="pretrain")
    init_from: str = _help("checkpoint folder to start from ('' = random init)", default="")
    tokenizer_path: str = _help("tokenizer.model or a folder holding it ('' = the shipped default)", default="")
    epochs: int = _help("passes over the data", default=1)
    max_steps: int = _help("stop after this many optimizer steps (0 = run all epochs)", default=0)
    batch_size: int = _help("rows per micro-batch per process", default=16)
    accumulation_steps: int = _help("micro-batches per optimizer step", default=1)
    max_seq_len: int = _help("tokens per row", default=256)
    learning_rate: float = _help("peak learning rate", default=1e-3)
    min_lr_ratio: float = _help("final learning rate as a fraction of the peak (cosine decay)", default=0.1)
    warmup_steps: int = _help("linear warm-up steps (-1 = 1%% of the run, at least 1)", default=-1)
    weight_decay: float = _help("AdamW weight decay (not applied to norms and biases)", default=0.1)
    beta1: float = _help("AdamW beta1", default=0.9)
    beta2: float = _help("AdamW beta2", default=0.95)
    grad_clip: float = _help("clip the global gradient norm to this (0 = off)", default=1.0)
    dtype: str = _help("autocast dtype: auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float16 | "
                             "float32; on CPU bfloat16 needs native bf16, else float32", default="auto")
    device: str = _help("cuda | cpu | cuda:N ('' = cuda if available)", default="")
    use_compile: int = _help("torch.compile the model (1/0; -1 = on for CUDA)", default=-1)
    compile_mode: str = _help("torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune | "
                              "max-autotune-no-cudagraphs", default="default")
    num_workers: int = _help("data loader workers", default=1)
    log_interval: int = _help("log every N optimizer steps", default=10)
    save_interval: int = _help("save a resumable checkpoint every N optimizer steps (0 = only at the end)",
                               default=200)
    from_resume: int = _help("1 = continue from save_dir/save_weight/latest if it exists", default=0)
    seed: int = _help("random seed", default=42)
    skip_bad_lines: int = _help("1 = skip malformed jsonl lines (reported at the end) instead of stopping",
                                default=0)
    use_tensorboard: int = _help("1 = write TensorBoard scalars under the run folder", default=1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(**_known_fields(cls, d, "train"))


def _known_fields(cls, d: dict, section: str) -> dict:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {section} config field(s) {unknown}; known: {sorted(names)}")
    return dict(d)


def save_yaml(path, model_cfg: ModelConfig, train_cfg: TrainConfig | None = None, extra: dict | None = None):
    doc = {"model": model_cfg.to_dict()}
    if train_cfg is not None:
        doc["train"] = train_cfg.to_dict()
    if extra:
        doc.update(extra)
    Path(path).write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))


def load_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid yaml: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a mapping with 'model' and/or 'train' sections")
    return doc


# -- command line -------------------------------------------------------------------------------
# Model fields that a stage script exposes as flags (MiniMind's names where it has them).
MODEL_FLAGS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "use_moe", "kernel_backend", "rope_theta")


def _add_dataclass_flags(parser, cls, defaults: dict, only=None):
    for f in fields(cls):
        if only is not None and f.name not in only:
            continue
        default = defaults.get(f.name, f.default)
        kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str,
                                                          "bool": bool}[str(f.type)]
        if kind is bool:
            kind = _parse_bool
        parser.add_argument(f"--{f.name}", type=kind, default=argparse.SUPPRESS,
                            help=f"{f.metadata.get('help', '')} (default: {default})")


def _parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 1/0 or true/false, got {text!r}")


def build_parser(description: str, train_defaults: dict | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="", help="yaml file with 'model' and/or 'train' sections")
    parser.add_argument("--preset", default=argparse.SUPPRESS,
                        help=f"model preset: {', '.join(PRESETS)} (default: demo, or the init checkpoint's)")
    _add_dataclass_flags(parser, TrainConfig, train_defaults or {})
    _add_dataclass_flags(parser, ModelConfig, {}, only=MODEL_FLAGS)
    return parser


def resolve(args: argparse.Namespace, train_defaults: dict | None = None,
            base_model: ModelConfig | None = None, default_preset: str = "demo"):
    """Merge defaults, preset, yaml and explicit flags into (ModelConfig, TrainConfig).

    `base_model` (the config of a checkpoint being fine-tuned) replaces the preset as the base:
    a fine-tuned model must keep its shape, so shape flags that disagree with it are an error.
    """
    given = vars(args)
    doc = load_yaml(given["config"]) if given.get("config") else {}
    train_fields = {f.name for f in fields(TrainConfig)}
    train = {**(train_defaults or {}), **doc.get("train", {}),
             **{k: v for k, v in given.items() if k in train_fields}}
    train_cfg = TrainConfig.from_dict(train)

    model_over = {**doc.get("model", {}), **{k: v for k, v in given.items() if k in MODEL_FLAGS}}
    if base_model is not None:
        base = base_model.to_dict()
        shape_changes = {k: v for k, v in model_over.items()
                         if k != "kernel_backend" and base.get(k) != v}
        if shape_changes or "preset" in given:
            raise ValueError(f"cannot change the shape of the checkpoint being fine-tuned "
                             f"({shape_changes or given.get('preset')}); drop those flags")
        model_cfg = ModelConfig.from_dict({**base, **model_over})
    else:
        preset = given.get("preset") or doc.get("preset") or default_preset
        model_cfg = ModelConfig.from_dict({**PRESETS[_check_preset(preset)], **model_over})
    return model_cfg, train_cfg


def _check_preset(name: str) -> str:
    if name.lower() not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return name.lower()
