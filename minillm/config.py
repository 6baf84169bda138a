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

from minillm.errors import NotFound, UserError


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class ModelConfig:
    vocab_size: int = _help("vocabulary size; a new model takes the tokenizer's unless this is given "
                                   "(it may be larger, e.g. padded to a multiple of 64)", default=6400)
    hidden_size: int = _help("model width", default=512)
    num_hidden_layers: int = _help("number of decoder blocks", default=8)
    num_attention_heads: int = _help("query heads", default=8)
    num_key_value_heads: int = _help("key/value heads (grouped-query attention; divides num_attention_heads)",
                                     default=2)
    head_dim: int = _help("per-head dim; 0 = hidden_size // num_attention_heads", default=0)
    intermediate_size: int = _help("SwiGLU width; 0 = 8/3 * hidden rounded up to a multiple of 64", default=0)
    max_position_embeddings: int = _help("longest sequence the model is meant for", default=32768)
    rope_theta: float = _help("RoPE base", default=1e6)
    rope_scaling: str = _help("none | yarn: YaRN frequency interpolation for contexts beyond "
                              "rope_original_max_position_embeddings", default="none")
    rope_factor: float = _help("YaRN: context extension factor s (positions are interpolated by up to s)",
                               default=1.0)
    rope_original_max_position_embeddings: int = _help("YaRN: the context length the model was trained at",
                                                       default=2048)
    rope_beta_fast: float = _help("YaRN: dimensions rotating more than this many times over the original context "
                                  "are left as they are (extrapolated)", default=32.0)
    rope_beta_slow: float = _help("YaRN: dimensions rotating fewer times than this are fully interpolated",
                                  default=1.0)
    rope_attention_factor: float = _help("YaRN: scale of cos/sin (the attention temperature); 0 = the paper's "
                                         "0.1 * ln(rope_factor) + 1", default=0.0)
    rms_norm_eps: float = _help("RMSNorm epsilon", default=1e-5)
    tie_word_embeddings: bool = _help("share the input embedding and the output head", default=True)
    qk_norm: bool = _help("RMSNorm on queries and keys per head (Qwen3 style)", default=False)
    attention_bias: bool = _help("biases on the q/k/v projections (Qwen2 style; o_proj has none)", default=False)
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
        derived = []  # problems only a derived value has
        if self.head_dim == 0:
            h, n = self.hidden_size, self.num_attention_heads
            if n > 0 and h % n:
                derived.append(f"hidden_size={h} is not a multiple of num_attention_heads={n}, so "
                               f"head_dim = hidden_size / num_attention_heads = {h / n:g} is not whole: choose "
                               f"a hidden_size divisible by {n} (e.g. {max(2 * n, 2 * n * round(h / (2 * n)))}) "
                               f"or give head_dim (--set head_dim=N)")
            self.head_dim = h // n if n > 0 else 0
        if self.intermediate_size == 0:
            self.intermediate_size = 64 * math.ceil(self.hidden_size * 8 / 3 / 64)
        if self.moe_intermediate_size == 0:
            self.moe_intermediate_size = self.intermediate_size
        self.validate(derived)

    def validate(self, problems=()):
        """UserError listing every field combination that cannot make a model (and `problems`)."""
        problems, derived = list(problems), bool(problems)
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if self.head_dim < 0:
            problems.append(f"head_dim={self.head_dim} must be positive (0 = hidden_size // num_attention_heads)")
        elif self.head_dim % 2 and not derived:
            problems.append(f"head_dim={self.head_dim} must be even for RoPE: change hidden_size or "
                            f"num_attention_heads, or set an even head_dim")
        if self.num_key_value_heads > 0 and self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads={self.num_key_value_heads}: use a num_key_value_heads that "
                            f"divides it")
        if self.rope_theta <= 0:
            problems.append(f"rope_theta={self.rope_theta} must be positive")
        if self.rope_scaling not in ("none", "yarn"):
            problems.append(f"rope_scaling={self.rope_scaling!r} must be none or yarn")
        elif self.rope_scaling == "yarn":
            if self.rope_factor < 1:
                problems.append(f"rope_factor={self.rope_factor} must be >= 1 (how many times longer the context gets)")
            if self.rope_original_max_position_embeddings <= 0:
                problems.append(f"rope_original_max_position_embeddings={self.rope_original_max_position_embeddings} "
                                f"must be positive")
            if not self.rope_beta_fast > self.rope_beta_slow > 0:
                problems.append(f"rope_beta_fast={self.rope_beta_fast} must be > rope_beta_slow="
                                f"{self.rope_beta_slow} > 0")
            if self.rope_attention_factor < 0:
                problems.append(f"rope_attention_factor={self.rope_attention_factor} must be >= 0 (0 = YaRN's)")
        if self.rms_norm_eps <= 0:
            problems.append(f"rms_norm_eps={self.rms_norm_eps} must be positive")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout={self.dropout} must be in [0, 1)")
        if self.initializer_range < 0:
            problems.append(f"initializer_range={self.initializer_range} must be >= 0")
        if self.use_moe:
            if self.n_routed_experts <= 0:
                problems.append(f"n_routed_experts={self.n_routed_experts} must be positive")
            elif not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                problems.append(f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                                f"1..n_routed_experts={self.n_routed_experts}")
            if self.n_shared_experts < 0:
                problems.append(f"n_shared_experts={self.n_shared_experts} must be >= 0")
            if self.moe_intermediate_size <= 0:
                problems.append(f"moe_intermediate_size={self.moe_intermediate_size} must be positive")
            if self.aux_loss_coef < 0:
                problems.append(f"aux_loss_coef={self.aux_loss_coef} must be >= 0")
        if self.kernel_backend not in ("auto", "triton", "torch"):
            problems.append(f"kernel_backend={self.kernel_backend!r} must be auto, triton or torch")
        if problems:
            raise UserError("invalid model config: " + "; ".join(problems))

    # -- presets and serialisation -------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        key = name.lower()
        if key not in PRESETS:
            raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "model config") -> "ModelConfig":
        """Build from a mapping (a yaml section, a checkpoint's config.yaml): values are converted to
        the fields' types (coerce), and `where` names the source in any error."""
        values = _known_fields(cls, d, "model", where)
        try:
            return cls(**values)
        except UserError as e:
            if where == "model config":
                raise
            raise UserError(f"{where}: {e}") from None

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count computed from the shape (equals the module's, tied embeddings once)."""
        h, L, d = self.hidden_size, self.num_hidden_layers, self.head_dim
        attn = h * d * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        if self.qk_norm:
            attn += 2 * d
        if self.attention_bias:
            attn += d * (self.num_attention_heads + 2 * self.num_key_value_heads)
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
    # train_distillation.py's default student: a new model a fifth of the demo model's size (0.64M)
    "demo-student": dict(vocab_size=2048, hidden_size=128, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=2, max_position_embeddings=2048),
    "minimind2-small": dict(vocab_size=6400, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=2),
    "minimind2": dict(vocab_size=6400, hidden_size=768, num_hidden_layers=16, num_attention_heads=8,
                      num_key_value_heads=2),
    "minimind2-moe": dict(vocab_size=6400, hidden_size=640, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=2, use_moe=True, n_routed_experts=4, num_experts_per_tok=2,
                          n_shared_experts=1),
    # MiniMind-3 (model/model_minimind.py's MiniMindConfig defaults): Qwen3-style per-head q/k norm,
    # eps 1e-6, intermediate ceil(768 * pi / 64) * 64 = 2432; published as 64M
    "minimind-3": dict(vocab_size=6400, hidden_size=768, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=96, intermediate_size=2432, rope_theta=1e6,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, qk_norm=True, tie_word_embeddings=True),
    # MiniMind-3-MoE (use_moe=True there): 4 experts of width 2432, top-1, no shared expert,
    # norm_topk_prob, router_aux_loss_coef 5e-4; published as 198M-A64M
    "minimind-3-moe": dict(vocab_size=6400, hidden_size=768, num_hidden_layers=8, num_attention_heads=8,
                           num_key_value_heads=4, head_dim=96, intermediate_size=2432, rope_theta=1e6,
                           max_position_embeddings=32768, rms_norm_eps=1e-6, qk_norm=True,
                           tie_word_embeddings=True, use_moe=True, n_routed_experts=4, num_experts_per_tok=1,
                           n_shared_experts=0, moe_intermediate_size=2432, norm_topk_prob=True,
                           aux_loss_coef=5e-4),
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
    learning_rate: float = _help("peak learning rate (with --optimizer muon: of the AdamW part)", default=1e-3)
    optimizer: str = _help("adamw | muon (Muon for the decoder blocks' 2-D weights, AdamW at --learning_rate "
                           "for embeddings, output head, norms, biases and the MoE router)", default="adamw")
    muon_lr: float = _help("peak learning rate of the Muon part (--optimizer muon)", default=0.02)
    muon_momentum: float = _help("Muon's momentum (Nesterov)", default=0.95)
    muon_adapters: int = _help("1 = LoRA adapter matrices train with Muon too (default: they stay on AdamW)",
                               default=0)
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
    eval_data_path: str = _help("held-out data in --data_path's format: its loss (and the stage's metrics) at "
                                "every evaluation, in the log and TensorBoard ('' = none)", default="")
    eval_split: float = _help("hold out this seeded fraction of --data_path's rows instead (0 = none)", default=0.0)
    eval_interval: int = _help("evaluate every N optimizer steps and at the end (0 = at every save)", default=0)
    overwrite: int = _help("1 = a new run may replace the finished run in save_dir/save_weight (its checkpoint "
                           "history and TensorBoard logs); without it such a run is refused", default=0)
    keep_last: int = _help("checkpoints kept in save_dir/save_weight.history (hard links, so little extra "
                           "space); --from_resume falls back to the newest one that loads", default=2)
    nan_policy: str = _help("a step whose loss or gradient norm is not finite is never applied; stop = end the "
                            "run (non-zero exit, nothing saved) after --max_bad_steps such steps in a row, "
                            "skip = keep skipping them", default="stop")
    max_bad_steps: int = _help("consecutive non-finite steps --nan_policy stop tolerates", default=3)
    benchmark: int = _help("time N optimizer steps after --benchmark_warmup steps on the real data path (loader, "
                           "logging and all) and print steady-state tokens/s; nothing is saved or evaluated "
                           "(0 = off: train)", default=0)
    benchmark_warmup: int = _help("steps --benchmark runs before its clock starts (compilation, allocator, "
                                  "loader warm-up)", default=5)
    fsdp: int = _help("1 = shard parameters, gradients and optimizer state over the processes (FSDP2: per decoder "
                      "block and at the root; bf16 compute with fp32 master weights and reductions on CUDA); "
                      "checkpoints add a dcp/ folder that resumes on any number of processes", default=0)
    grad_checkpointing: int = _help("activation checkpointing: recompute decoder blocks in the backward pass "
                                    "instead of keeping their activations (0 = off, 1 = every block, N = every "
                                    "N-th block: less recompute, less memory saved)", default=0)

    def __post_init__(self):
        self.validate()

    def validate(self):
        """UserError listing every value no run can use, by its flag (the yaml field has the same name)."""
        rules = [  # (field, fine?, what it must be)
            ("epochs", self.epochs >= 1, "must be at least 1 (--max_steps N stops a run earlier)"),
            ("max_steps", self.max_steps >= 0, "must be >= 0 (0 = run all epochs)"),
            ("batch_size", self.batch_size >= 1, "must be at least 1"),
            ("accumulation_steps", self.accumulation_steps >= 1, "must be at least 1"),
            ("max_seq_len", self.max_seq_len >= 1, "must be at least 1"),
            ("learning_rate", self.learning_rate >= 0, "must be >= 0"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "must be in [0, 1]"),
            ("warmup_steps", self.warmup_steps >= -1, "must be >= 0, or -1 for 1% of the run"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("beta1", 0 <= self.beta1 < 1, "must be in [0, 1)"),
            ("beta2", 0 <= self.beta2 < 1, "must be in [0, 1)"),
            ("grad_clip", self.grad_clip >= 0, "must be >= 0 (0 = no clipping)"),
            ("dtype", self.dtype in DTYPES, f"is not a dtype; use {', '.join(DTYPES)}"),
            ("use_compile", self.use_compile in (-1, 0, 1), "must be 1, 0 or -1 (on for CUDA)"),
            ("compile_mode", self.compile_mode in COMPILE_MODES,
             f"is not a torch.compile mode; choose one of {', '.join(COMPILE_MODES)}"),
            ("num_workers", self.num_workers >= 0, "must be >= 0"),
            ("log_interval", self.log_interval >= 1, "must be at least 1"),
            ("save_interval", self.save_interval >= 0, "must be >= 0 (0 = save only at the end)"),
            ("from_resume", self.from_resume in (0, 1), "must be 1 or 0"),
            ("skip_bad_lines", self.skip_bad_lines in (0, 1), "must be 1 or 0"),
            ("use_tensorboard", self.use_tensorboard in (0, 1), "must be 1 or 0"),
            ("eval_split", 0 <= self.eval_split < 1, "must be a fraction in [0, 1), e.g. 0.05 (0 = none)"),
            ("eval_interval", self.eval_interval >= 0, "must be >= 0 (0 = at every save)"),
            ("overwrite", self.overwrite in (0, 1), "must be 1 or 0"),
            ("keep_last", self.keep_last >= 0, "must be >= 0 (0 = keep no history)"),
            ("nan_policy", self.nan_policy in ("stop", "skip"), "must be stop or skip"),
            ("optimizer", self.optimizer in OPTIMIZERS, f"must be one of {', '.join(OPTIMIZERS)}"),
            ("muon_lr", self.muon_lr >= 0, "must be >= 0"),
            ("muon_momentum", 0 <= self.muon_momentum < 1, "must be in [0, 1)"),
            ("muon_adapters", self.muon_adapters in (0, 1), "must be 1 or 0"),
            ("benchmark", self.benchmark >= 0, "must be >= 0 (0 = off)"),
            ("benchmark_warmup", self.benchmark_warmup >= 1, "must be at least 1"),
            ("max_bad_steps", self.max_bad_steps >= 1, "must be at least 1"),
            ("fsdp", self.fsdp in (0, 1), "must be 1 or 0"),
            ("grad_checkpointing", self.grad_checkpointing >= 0, "must be >= 0 (0 = off, 1 = every block)"),
        ]
        problems = [f"--{name} {getattr(self, name)!r} {rule}" for name, fine, rule in rules if not fine]
        if problems:
            raise UserError("; ".join(problems))

    def check_paths(self):
        """UserError for a path flag that names an existing thing of the wrong kind (a folder where a
        file is expected or the reverse); missing ones are reported where they are opened."""
        for flag, path in (("--data_path", self.data_path), ("--eval_data_path", self.eval_data_path)):
            if path and Path(path).is_dir():
                raise UserError(f"{flag} {path} is a folder, not a file; pass a jsonl file")
        if self.tokenizer_path:
            tok = Path(self.tokenizer_path)
            if tok.is_dir() and not any((tok / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
                raise UserError(f"--tokenizer_path {tok} is a folder without tokenizer.model or tokenizer.json in "
                                f"it; pass the file or its folder (e.g. MiniMind's model/), or make one with "
                                f"`python train_tokenizer.py --out {tok / 'tokenizer.model'}`")
        for path in (Path(self.save_dir), Path(self.save_dir) / self.save_weight):
            if path.exists() and not path.is_dir():
                raise UserError(f"--save_dir {self.save_dir}: {path} is a file, not a folder; pass a folder "
                                f"(it is created if missing) or move that file")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "train config") -> "TrainConfig":
        values = _known_fields(cls, d, "train", where)
        try:
            return cls(**values)
        except UserError as e:
            if where == "train config":
                raise
            raise UserError(f"{where}: {e}") from None


DTYPES = ("auto", "bfloat16", "float16", "float32")
OPTIMIZERS = ("adamw", "muon")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# -- typed values ---------------------------------------------------------------------------------
# Every value that reaches a config (a yaml file, a checkpoint's config.yaml, a flag, `--set`, a
# stage's defaults) goes through coerce(): yaml 1.1 reads `1e-6` as a string and the command line
# gives only strings, so without it a bad type fails deep inside the model, far from its source.
_TYPES = {"int": int, "float": float, "bool": bool, "str": str}
_EXPECTED = {int: "an integer", float: "a number", bool: "a boolean (1/0, true/false, yes/no)", str: "a string"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _field_type(cls, name: str):
    for f in fields(cls):
        if f.name == name:
            return f.type if isinstance(f.type, type) else _TYPES.get(str(f.type))
    raise UserError(_unknown_field_text(cls, name))


def _other_config(cls):
    return {ModelConfig: (TrainConfig, "train"), TrainConfig: (ModelConfig, "model")}.get(cls, (None, ""))


def _unknown_field_text(cls, name, section: str | None = None) -> str:
    import difflib
    names = [f.name for f in fields(cls)]
    text = f"unknown {section or cls.__name__} field {name!r}"
    other, other_section = _other_config(cls)
    other_names = [f.name for f in fields(other)] if other is not None else []
    if name in other_names:
        return f"{text} (it is a {other_section} field)"
    close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.6)
    if close:
        return f"{text} (did you mean {close[0]!r}?)"
    close = difflib.get_close_matches(str(name), other_names, n=1, cutoff=0.6)
    if close:
        return f"{text} (did you mean the {other_section} field {close[0]!r}?)"
    return f"{text}; known: {', '.join(names)}"


def _convert(kind, value):
    """`value` as `kind`, or ValueError/TypeError. Strings are parsed; 2.0 is an int, 2.5 is not."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError
    if kind is int:
        if isinstance(value, (bool, int)):  # a bool is 1/0, as the 1/0 switches (from_resume, ...) want
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                value = float(value.strip())  # "2.0", "1e3"
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError
    if kind is float:
        if isinstance(value, bool):
            raise ValueError
        if not isinstance(value, (str, int, float)):
            raise ValueError
        number = float(value.strip() if isinstance(value, str) else value)
        if not math.isfinite(number):
            raise ValueError
        return number
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError
    return value  # a field type this converter does not know: as given


def coerce(cls, field_name: str, value, where: str):
    """`value` converted to the type of `cls`'s field `field_name` (int, float, bool or str).

    Accepts strings ("1e-6", "true", "no", "4"), ints for floats, integral floats for ints (2.0)
    and 1/0 for bools; anything else raises ValueError naming `where` the value came from (a yaml
    file and section, `--set`, a flag), the field, the value and the type expected.
    """
    kind = _field_type(cls, field_name)
    try:
        return _convert(kind, value)
    except (TypeError, ValueError, OverflowError):
        hint = ""
        if isinstance(value, bool) and kind is str:
            hint = " (yaml reads yes/no/on/off as booleans: quote it)"
        elif value is None:
            hint = " (an empty value in yaml is null: write '' or leave the field out)"
        raise UserError(f"{where}: {field_name} expects {_EXPECTED.get(kind, kind)}, got {value!r}{hint}") from None


def _known_fields(cls, d, section: str, where: str | None = None) -> dict:
    """`d` checked against `cls`'s fields (an unknown name suggests the closest) and coerced."""
    where = where or f"{section} config"
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a mapping of {section} fields, got {type(d).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = [k for k in d if k not in names]
    if unknown:
        raise UserError(f"{where}: " + "; ".join(_unknown_field_text(cls, k, f"{section} config") for k in unknown))
    return {k: coerce(cls, k, v, where) for k, v in d.items()}


def save_yaml(path, model_cfg: ModelConfig, train_cfg: TrainConfig | None = None, extra: dict | None = None):
    doc = {"model": model_cfg.to_dict()}
    if train_cfg is not None:
        doc["train"] = train_cfg.to_dict()
    if extra:
        doc.update(extra)
    Path(path).write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))


def load_yaml(path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config file {path} is a folder, not a yaml file")
    if not path.is_file():
        raise NotFound(f"config file {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid yaml: {' '.join(str(e).split())}") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: expected a mapping with 'model' and/or 'train' sections")
    return doc


# -- command line -------------------------------------------------------------------------------
# Model fields that a stage script exposes as flags (MiniMind's names where it has them); every
# other ModelConfig field is reachable with `--set FIELD=VALUE`.
MODEL_FLAGS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "use_moe", "kernel_backend", "rope_theta")
# Model fields a fine-tuning stage may set differently from its checkpoint; any other is refused.
FINE_TUNE_SETTABLE = ("kernel_backend",)

# --help's groups, in order; the model group (preset, MODEL_FLAGS, --set) comes second, a stage's
# own flags (stage_group) come last.
TRAIN_GROUPS: dict[str, tuple[str, ...]] = {
    "data": ("data_path", "tokenizer_path", "max_seq_len", "num_workers", "skip_bad_lines"),
    "optimisation": ("epochs", "max_steps", "batch_size", "accumulation_steps", "learning_rate", "min_lr_ratio",
                     "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "seed", "nan_policy",
                     "max_bad_steps", "optimizer", "muon_lr", "muon_momentum", "muon_adapters"),
    "hardware": ("device", "dtype", "use_compile", "compile_mode", "benchmark", "benchmark_warmup", "fsdp",
                 "grad_checkpointing"),
    "checkpointing": ("save_dir", "save_weight", "init_from", "save_interval", "from_resume", "overwrite",
                      "keep_last"),
    "logging": ("log_interval", "use_tensorboard"),
    "evaluation": ("eval_data_path", "eval_split", "eval_interval"),
}
_METAVARS = {int: "INT", float: "FLOAT", bool: "BOOL", str: "TEXT"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks (stage scripts pass their docstring) and ends each
    option's help with its default, unless the help already says it (build_parser's flags do)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and action.default not in (argparse.SUPPRESS, None)
                and "(default:" not in text and "%(default)" not in text):
            text += " (default: %(default)s)"
        return text


def _show(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value == "":
        return "''"
    return str(value).replace("%", "%%")


def _flag_type(cls, name: str):
    kind = _field_type(cls, name)

    def parse(text):
        try:
            return _convert(kind, text)
        except (TypeError, ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {_EXPECTED.get(kind, kind)}, got {text!r}") from None
    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def _add_field_flag(group, cls, name: str, default_text: str):
    f = next(f for f in fields(cls) if f.name == name)
    group.add_argument(f"--{name}", type=_flag_type(cls, name), default=argparse.SUPPRESS,
                       metavar=_METAVARS.get(_field_type(cls, name), "VALUE"),
                       help=f"{f.metadata.get('help', '')} (default: {default_text})")


def parse_set_item(item, where: str = "--set") -> tuple[str, Any]:
    """"FIELD=VALUE" -> (FIELD, VALUE typed as ModelConfig's field); ValueError if malformed."""
    key, sep, value = str(item).partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"{where} {item}: expected FIELD=VALUE with FIELD a model config field, "
                        f"e.g. --set rms_norm_eps=1e-6")
    if key not in {f.name for f in fields(ModelConfig)}:
        if key in {f.name for f in fields(TrainConfig)}:
            raise UserError(f"{where} {item}: {key} is a train setting, not a model config field: "
                            f"use --{key} {value}")
        raise UserError(f"{where} {item}: {_unknown_field_text(ModelConfig, key, 'model config')}")
    return key, coerce(ModelConfig, key, value, f"{where} {item}")


def parse_set(items, where: str = "--set") -> dict:
    """["rms_norm_eps=1e-6", "qk_norm=true"] -> {"rms_norm_eps": 1e-06, "qk_norm": True}; the last
    of repeated fields wins. Raises ValueError naming the item on a malformed one."""
    return dict(parse_set_item(item, where) for item in items or ())


def _set_arg(text: str) -> str:
    try:
        parse_set_item(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--set {text}: ")) from None
    return text  # the namespace keeps the text; resolve() parses it


def add_set_flag(group, default_text: str = "the preset's", flags: tuple[str, ...] = ()):
    """`--set FIELD=VALUE`, repeatable, on a parser or group (build_parser's, train_throughput's);
    the namespace holds the raw items (no attribute unless given), parse_set() types them.
    `flags`: model fields the parser also has as named flags (left out of the help's list)."""
    names = ", ".join(f.name for f in fields(ModelConfig) if f.name not in flags)
    group.add_argument("--set", action="append", type=_set_arg, default=argparse.SUPPRESS, metavar="FIELD=VALUE",
                       help=f"set any model config field, repeatable: --set rms_norm_eps=1e-6 --set qk_norm=true; "
                            f"{'beyond the flags above' if flags else 'fields'}: {names} (default: {default_text})")


def stage_group(parser: argparse.ArgumentParser, title: str = "stage", description: str | None = None):
    """The argument group for a stage script's own flags, shown after the common groups in --help:
    `g = stage_group(parser, "DPO"); g.add_argument("--beta", ...)`. Their help ends with their
    default automatically."""
    return parser.add_argument_group(title, description)


def build_parser(description: str, train_defaults: dict | None = None, *,
                 default_preset: str = "demo") -> argparse.ArgumentParser:
    """The common flags of a stage script, grouped (data, model, optimisation, hardware,
    checkpointing, logging); each help line ends with the default that applies for this stage:
    `train_defaults` (the stage's), and for the model the `default_preset`'s values, or the
    checkpoint's when the stage starts from one (a non-empty init_from default). No flag has a
    namespace default (argparse.SUPPRESS), so resolve() can tell given from not."""
    train_defaults = _known_fields(TrainConfig, dict(train_defaults or {}), "train", "the stage's defaults")
    train_values = {**TrainConfig().to_dict(), **train_defaults}
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.add_argument("--config", default="", metavar="FILE.yaml",
                        help="yaml file with 'preset', 'model' and/or 'train' sections; it overrides the stage's "
                             "defaults and --preset, flags and --set override it (default: none)")
    from_checkpoint = bool(train_defaults.get("init_from"))
    model_about = ("from the --init_from checkpoint; only kernel_backend may differ from it" if from_checkpoint
                   else "--preset, then --config's 'model' section, then these flags and --set")
    groups = {"data": parser.add_argument_group("data"), "model": parser.add_argument_group("model", model_about)}
    groups.update({title: parser.add_argument_group(title) for title in TRAIN_GROUPS if title not in groups})
    placed = {name for names in TRAIN_GROUPS.values() for name in names}
    other = tuple(f.name for f in fields(TrainConfig) if f.name not in placed)
    if other:  # a new TrainConfig field not yet given a group
        groups["other"] = parser.add_argument_group("other")
    for title, names in (*TRAIN_GROUPS.items(), ("other", other)):
        for name in names:
            _add_field_flag(groups[title], TrainConfig, name, _show(train_values[name]))

    model = groups["model"]
    if from_checkpoint:
        preset_text = set_text = "from the --init_from checkpoint"
        model_texts = dict.fromkeys(MODEL_FLAGS, preset_text)
    else:
        preset_text, set_text = _check_preset(default_preset), f"the {_check_preset(default_preset)} preset's"
        preset_values = ModelConfig.preset(default_preset).to_dict()
        model_texts = {name: _show(preset_values[name]) for name in MODEL_FLAGS}
    model.add_argument("--preset", default=argparse.SUPPRESS, metavar="NAME",
                       help=f"model preset: {', '.join(PRESETS)}; refused when fine-tuning a checkpoint "
                            f"(default: {preset_text})")
    for name in MODEL_FLAGS:
        _add_field_flag(model, ModelConfig, name, model_texts[name])
    add_set_flag(model, set_text, MODEL_FLAGS)
    _add_minimind_flags(groups)
    return parser


# -- MiniMind's own flags (trainer/train_*.py) that have no TrainConfig field of that name ----------
def _add_minimind_flags(groups) -> None:
    groups["checkpointing"].add_argument(
        "--from_weight", default=argparse.SUPPRESS, metavar="NAME",
        help="MiniMind's flag: start from the checkpoint folder <save_dir>/NAME (pretrain, full_sft, dpo, reason, "
             "...), i.e. --init_from <save_dir>/NAME; none = from scratch (default: the stage's --init_from)")
    groups["logging"].add_argument(
        "--use_wandb", action="store_true", default=argparse.SUPPRESS,
        help="MiniMind's flag, accepted: minillm logs to TensorBoard (<save_dir>/logs/<save_weight>), not wandb "
             "(default: off)")
    groups["logging"].add_argument(
        "--wandb_project", default=argparse.SUPPRESS, metavar="TEXT",
        help="MiniMind's flag, accepted and unused (logs go to TensorBoard) (default: none)")


def weight_path(save_dir, name: str, flag: str, hidden_size=None, use_moe=None) -> Path:
    """What MiniMind's weight name NAME means under save_dir: our checkpoint folder save_dir/NAME, else
    MiniMind's own file save_dir/NAME_<hidden_size>[_moe].pth (picked by hidden_size / use_moe when
    several are there; load_checkpoint imports it), else save_dir/NAME.pth; NotFound naming `flag`."""
    import re
    root = Path(save_dir)
    if (root / name).is_dir() or (root / name).is_file() and name.endswith(".pth"):
        return root / name
    pattern = re.compile(re.escape(name) + r"_(\d+)(_moe)?\.pth")
    files = sorted(p for p in root.glob(f"{name}_*.pth") if pattern.fullmatch(p.name))
    if hidden_size is not None:
        files = [p for p in files if int(pattern.fullmatch(p.name).group(1)) == int(hidden_size)]
    if use_moe is not None:
        files = [p for p in files if bool(pattern.fullmatch(p.name).group(2)) == bool(int(use_moe))]
    if len(files) > 1:
        raise UserError(f"{flag} {name}: several MiniMind weight files under {root} ({', '.join(p.name for p in files)}); "
                        f"pick one with --hidden_size N and --use_moe 0/1")
    if files:
        return files[0]
    if (root / f"{name}.pth").is_file():
        return root / f"{name}.pth"
    raise NotFound(f"{flag} {name}: no checkpoint folder {root / name} and no MiniMind file {root / name}_<hidden_size>"
                   f"[_moe].pth (the name of a stage's folder under --save_dir {save_dir}, e.g. pretrain or full_sft"
                   f"{'; none = from scratch' if flag == '--from_weight' else ''})")


def apply_minimind_flags(args: argparse.Namespace, train_defaults: dict | None = None) -> list[str]:
    """Turns MiniMind's flags into ours before resolve(): `--from_weight NAME` sets args.init_from to
    <save_dir>/NAME ('' for none); returns the notes a stage prints (one for --use_wandb)."""
    notes = []
    given = vars(args)
    if "from_weight" in given:
        name = str(given.pop("from_weight")).strip()
        if "init_from" in given:
            raise UserError(f"--from_weight {name} and --init_from {given['init_from']} both say where to start: "
                            f"give one")
        if name.lower() in ("none", ""):
            args.init_from = ""
        else:
            doc = load_yaml(given["config"]) if given.get("config") else {}
            save_dir = (given.get("save_dir") or _section(doc, "train", given.get("config")).get("save_dir")
                        or (train_defaults or {}).get("save_dir") or TrainConfig.save_dir)
            args.init_from = str(weight_path(save_dir, name, "--from_weight", given.get("hidden_size"),
                                             given.get("use_moe")))
    if given.get("use_wandb"):
        project = given.get("wandb_project")
        notes.append(f"--use_wandb: minillm logs to TensorBoard, not wandb{f' (project {project} unused)' if project else ''}"
                     f"; view with `tensorboard --logdir {Path(given.get('save_dir') or TrainConfig.save_dir) / 'logs'}`")
    return notes


def _section(doc: dict, name: str, path) -> dict:
    section = doc.get(name)
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise UserError(f"{path}: '{name}' must be a mapping of field: value, got {type(section).__name__}")
    return section


def resolve(args: argparse.Namespace, train_defaults: dict | None = None,
            base_model: ModelConfig | None = None, default_preset: str = "demo"):
    """Merge defaults, preset, yaml and explicit flags into (ModelConfig, TrainConfig).

    Order: the stage's defaults < `--preset` (or the yaml's `preset`) < `--config` sections <
    flags and `--set FIELD=VALUE` items (args.set: a list of those strings). Every value is coerced
    to its field's type, errors name their source.
    `base_model` (the config of a checkpoint being fine-tuned) replaces the preset as the base:
    a fine-tuned model must keep its shape, so model flags, --set items or a yaml 'model' section
    that disagree with it are an error (except FINE_TUNE_SETTABLE fields), and so is --preset.
    """
    given = vars(args)
    path = given.get("config") or ""
    doc = load_yaml(path) if path else {}
    train = {**_known_fields(TrainConfig, dict(train_defaults or {}), "train", "the stage's defaults"),
             **_known_fields(TrainConfig, _section(doc, "train", path), "train", f"{path} [train]")}
    train_names = {f.name for f in fields(TrainConfig)}
    train.update({k: coerce(TrainConfig, k, v, f"--{k}") for k, v in given.items() if k in train_names})
    train_cfg = TrainConfig(**train)
    train_cfg.check_paths()

    model_over, source = {}, {}
    for k, v in _known_fields(ModelConfig, _section(doc, "model", path), "model", f"{path} [model]").items():
        model_over[k], source[k] = v, f"{path} [model]"
    flags = {k: coerce(ModelConfig, k, given[k], f"--{k}") for k in MODEL_FLAGS if k in given}
    sets = parse_set(given.get("set") or ())
    clash = [k for k in flags.keys() & sets.keys() if flags[k] != sets[k]]
    if clash:
        raise UserError("; ".join(f"--{k} {flags[k]!r} and --set {k}={sets[k]!r} disagree" for k in clash)
                        + ": give one")
    for k, v in {**flags, **sets}.items():
        model_over[k], source[k] = v, (f"--{k}" if k in flags else f"--set {k}")

    if base_model is not None:
        base = base_model.to_dict()
        changes = [f"{k} {base.get(k)!r} -> {v!r} ({source[k]})" for k, v in model_over.items()
                   if k not in FINE_TUNE_SETTABLE and base.get(k) != v]
        if "preset" in given:
            changes.append(f"--preset {given['preset']}")
        if changes:
            raise UserError(f"cannot change the shape of the checkpoint being fine-tuned "
                            f"({'; '.join(changes)}); drop those flags")
        model_cfg = ModelConfig.from_dict({**base, **model_over},
                                          where=_model_sources(source, model_over, "the checkpoint"))
    else:
        preset = _check_preset(given.get("preset") or doc.get("preset") or default_preset)
        model_cfg = ModelConfig.from_dict({**PRESETS[preset], **model_over},
                                          where=_model_sources(source, model_over, f"preset {preset}"))
    return model_cfg, train_cfg


def _model_sources(source: dict, values: dict, base: str) -> str:
    """'preset debug with --hidden_size 100, c.yaml [model] head_dim=12': where a model config's
    values came from, for its errors."""
    given = [f"--set {k}={values[k]}" if s.startswith("--set") else f"{s} {values[k]}" if s.startswith("--")
             else f"{s} {k}={values[k]}" for k, s in source.items()]
    return base + (f" with {', '.join(given)}" if given else "")


def check_device(name: str, flag: str = "--device") -> str:
    """The device `name` means ('' = cuda if available, else cpu), or a UserError when this machine
    has no such device."""
    import torch
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"{flag} {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {name} was asked for but CUDA is not available on this machine; "
                            f"use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"numbered from 0")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{flag} {name} was asked for but MPS is not available on this machine; use --device cpu")
    return name


def _check_preset(name) -> str:
    if str(name).lower() not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return str(name).lower()
