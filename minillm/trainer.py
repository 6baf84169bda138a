"""The shared training loop: the plumbing every stage needs and none of the stage's math.

A stage script builds the model, the dataset and a `loss_fn(model, batch) -> (loss, metrics)`,
then calls `Trainer(...).fit()`. The trainer owns: devices and DDP, autocast, gradient
accumulation (all-reduce on the last micro-step only), the warm-up + cosine schedule,
clipping, AdamW, checkpoints and exact resume, and logging (stdout and TensorBoard).
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from minillm.checkpoint import STATE, WEIGHTS, load_trainer_state, resolve_checkpoint, save_checkpoint
from minillm.config import ModelConfig, TrainConfig

H100_BF16_FLOPS = 790e12  # the dense bf16 rate ANCHORS.md measures MFU against


# -- precision ----------------------------------------------------------------------------------
def cpu_has_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated
    and slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def training_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype `--dtype name` means on `device` (None = plain fp32).

    auto (the default): bfloat16 on CUDA, fp32 on CPU. bfloat16 / float16 on CUDA as asked.
    On CPU, bfloat16 runs only where the CPU has native bf16: 1.2-1.6x faster on the 2-core dev
    machine (BENCHMARKS.md), but the demo pipeline's held-out accuracy came out lower with it
    (facts 25% and 22% vs 45% and 30% in fp32, two seeds each), so it is opt-in there. float16 on
    CPU, or bfloat16 on a CPU without it, falls back to fp32."""
    dtypes = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}
    if name not in dtypes:
        raise ValueError(f"--dtype {name!r}: use auto, bfloat16, float16 or float32")
    dtype = dtypes[name]
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if device.type == "cpu" and (dtype is torch.float16 or (dtype is torch.bfloat16 and not cpu_has_bf16())):
        return None
    return dtype


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(name: str) -> str:
    """--compile_mode, checked even when compile is off, so a typo fails at start-up naming the flag."""
    if name not in COMPILE_MODES:
        raise ValueError(f"--compile_mode {name!r} is not a torch.compile mode; choose one of {', '.join(COMPILE_MODES)}")
    return name


def autocast_context(dtype: torch.dtype | None, device: torch.device):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# -- processes and devices ----------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_flag: str = "") -> DistInfo:
    """Single process, or one of `torchrun --nproc_per_node N` (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want = device_flag or ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {want} was asked for but CUDA is not available; use --device cpu")
    if want.startswith("cuda"):
        device = torch.device("cuda", local if world > 1 else torch.device(want).index or 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device(want)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, device)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- schedule, optimizer, FLOPs -----------------------------------------------------------------
def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to `peak * min_ratio` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_optimizer(params, cfg: TrainConfig, device: torch.device):
    """AdamW; no weight decay on norms, biases and other 1-d tensors. Fused kernel on CUDA."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires a gradient")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N (matmuls, forward + backward) + 12·L·H·Q·T (attention),
    with N the non-embedding parameters plus the output head, as ANCHORS.md counts."""
    n = cfg.num_params(non_embedding=True) + cfg.vocab_size * cfg.hidden_size
    if cfg.use_moe:  # only the experts a token visits do work
        idle = cfg.n_routed_experts - cfg.num_experts_per_tok
        n -= cfg.num_hidden_layers * idle * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len


# -- the loop ---------------------------------------------------------------------------------
LossFn = Callable[[torch.nn.Module, dict], "tuple[torch.Tensor, dict]"]


class Trainer:
    """Runs `loss_fn` over `batch_sampler`'s batches of `dataset` with all the plumbing.

    `batch_sampler` yields lists of dataset indices for this rank and supports
    `set_epoch(epoch, start_batch)` (resume mid-epoch) and, after `set_epoch(e, 0)`, `len()`
    is the number of batches in an epoch (data.ShardedBatchSampler, data.LengthGroupedBatchSampler).
    `trainable` (default: all parameters) picks what the optimizer updates (LoRA).
    `save_fn(folder, model, trainer_state)` overrides what a checkpoint holds (LoRA saves only the
    adapter); `load_fn(folder, model)` then restores it on resume.
    """

    def __init__(self, train_cfg: TrainConfig, model: torch.nn.Module, tokenizer, dataset, batch_sampler,
                 collate_fn, loss_fn: LossFn, dist_info: DistInfo, trainable=None,
                 save_fn: Callable | None = None, tokens_in_batch: Callable[[dict], int] | None = None,
                 on_save: Callable | None = None, load_fn: Callable | None = None,
                 stage_args: dict | None = None):
        self.cfg, self.dist, self.tokenizer = train_cfg, dist_info, tokenizer
        self.device = dist_info.device
        self.model = model.to(self.device)
        self.dataset, self.batch_sampler, self.collate_fn = dataset, batch_sampler, collate_fn
        self.loss_fn, self.save_fn, self.on_save, self.load_fn = loss_fn, save_fn, on_save, load_fn
        self.tokens_in_batch = tokens_in_batch or (lambda b: b["input_ids"].numel())
        self.stage_args = dict(stage_args or {})  # written into config.yaml under `stage:`
        self.run_dir = Path(train_cfg.save_dir) / train_cfg.save_weight
        self.log_dir = Path(train_cfg.save_dir) / "logs" / train_cfg.save_weight

        params = list(trainable) if trainable is not None else list(self.model.parameters())
        self.params = [p for p in params if p.requires_grad]
        self.optimizer = build_optimizer(self.params, train_cfg, self.device)

        cuda = self.device.type == "cuda"
        self.amp_dtype = training_dtype(train_cfg.dtype, self.device)
        self.autocast = autocast_context(self.amp_dtype, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda and self.amp_dtype == torch.float16)

        wrapped = self.model
        if dist_info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            wrapped = DDP(self.model, device_ids=[self.device.index] if cuda else None)
        mode = compile_mode(train_cfg.compile_mode)
        compile_on = train_cfg.use_compile == 1 or (train_cfg.use_compile == -1 and cuda)
        self.step_model = torch.compile(wrapped, mode=mode) if compile_on else wrapped
        self.ddp_model = wrapped

        batch_sampler.set_epoch(0, 0)
        steps_per_epoch = len(batch_sampler) // train_cfg.accumulation_steps
        if steps_per_epoch == 0:
            raise ValueError(f"{train_cfg.data_path}: {len(batch_sampler)} batches per process is fewer than "
                             f"--accumulation_steps {train_cfg.accumulation_steps}; use more data or a smaller "
                             f"--batch_size / --accumulation_steps")
        self.steps_per_epoch = steps_per_epoch
        total = steps_per_epoch * train_cfg.epochs
        self.total_steps = min(total, train_cfg.max_steps) if train_cfg.max_steps > 0 else total
        self.warmup = (train_cfg.warmup_steps if train_cfg.warmup_steps >= 0
                       else max(1, self.total_steps // 100))
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.history: list[float] = []  # loss per optimizer step (read at log time), for tests and reports
        self.writer = None

    # -- checkpoints --------------------------------------------------------------------------
    def state(self) -> dict:
        rngs = [rng_state()]
        if self.dist.enabled:
            rngs = [None] * self.dist.world_size
            dist.all_gather_object(rngs, rng_state())
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rngs, "world_size": self.dist.world_size, "total_steps": self.total_steps}

    def save(self):
        state = self.state()  # a collective under DDP: every rank takes part
        if self.dist.is_main:
            if self.save_fn is not None:
                self.save_fn(self.run_dir, self.model, state)
            else:
                save_checkpoint(self.run_dir, self.model, self.tokenizer, self.cfg, trainer_state=state,
                                extra={"stage": self.stage_args} if self.stage_args else None)
            if self.on_save is not None:
                self.on_save(self.run_dir)
        if self.dist.enabled:
            dist.barrier()

    def try_resume(self) -> bool:
        if not self.cfg.from_resume:
            return False
        try:
            # a save_fn folder may hold no model.safetensors; every resumable one holds the state
            folder = resolve_checkpoint(self.run_dir, marker=STATE if self.save_fn is not None else WEIGHTS)
        except FileNotFoundError:
            self.log(f"--from_resume 1: no checkpoint at {self.run_dir} yet, starting fresh")
            return False
        state = load_trainer_state(folder)
        if state is None:
            raise ValueError(f"{folder} has no trainer_state.pt, so it cannot be resumed; "
                             f"start without --from_resume or pick another --save_weight")
        if state["world_size"] != self.dist.world_size:
            raise ValueError(f"{folder} was written by {state['world_size']} processes, this run has "
                             f"{self.dist.world_size}; resume with the same --nproc_per_node")
        if self.save_fn is None:  # full checkpoints: restore the weights here
            from minillm.checkpoint import load_weights
            load_weights(self.model, folder)
        elif self.load_fn is not None:
            self.load_fn(folder, self.model)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][self.dist.rank])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.log(f"resumed from {folder} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")
        return True

    # -- logging ------------------------------------------------------------------------------
    def log(self, msg: str):
        if self.dist.is_main:
            print(msg, flush=True)

    def scalar(self, name: str, value: float, step: int):
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    # -- the loop -------------------------------------------------------------------------------
    def batches(self):
        """(epoch, batch) pairs from the current position on, moved to the device."""
        pin = self.device.type == "cuda"
        while self.epoch < self.cfg.epochs:
            self.batch_sampler.set_epoch(self.epoch, self.batch_in_epoch)
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=self.batch_sampler, collate_fn=self.collate_fn,
                num_workers=self.cfg.num_workers, pin_memory=pin,
                persistent_workers=False, prefetch_factor=4 if self.cfg.num_workers > 0 else None)
            for batch in loader:
                yield {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                       for k, v in batch.items()}
            self.epoch += 1
            self.batch_in_epoch = 0

    def fit(self) -> list[float]:
        cfg = self.cfg
        self.try_resume()
        if self.dist.is_main and cfg.use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.log_dir))
        n_params = sum(p.numel() for p in self.params)
        precision = f"{str(self.amp_dtype).removeprefix('torch.')} autocast" if self.amp_dtype else "float32"
        self.log(f"training {n_params / 1e6:.2f}M parameters on {self.dist.world_size} x {self.device} "
                 f"({precision}), "
                 f"{self.total_steps} steps of {cfg.batch_size} x {cfg.accumulation_steps} x "
                 f"{self.dist.world_size} rows; checkpoints -> {self.run_dir}, TensorBoard -> {self.log_dir}")
        model_cfg = getattr(self.model, "config", None)
        flops_tok = flops_per_token(model_cfg, cfg.max_seq_len) if model_cfg is not None else 0.0

        self.model.train()
        accum = cfg.accumulation_steps
        micro = 0
        loss_sum = torch.zeros((), device=self.device)
        metric_sums: dict[str, torch.Tensor] = {}
        tokens_since_log, t_log, t_start, steps_since_log = 0, time.perf_counter(), time.perf_counter(), 0
        step_at_start = self.step
        for batch in self.batches() if self.step < self.total_steps else ():
            last_micro = micro == accum - 1
            # gradients are all-reduced only on the last micro-step of an accumulation
            sync = self.ddp_model.no_sync() if (self.dist.enabled and not last_micro) else contextlib.nullcontext()
            with sync:
                with self.autocast:
                    loss, metrics = self.loss_fn(self.step_model, batch)
                self.scaler.scale(loss / accum).backward()
            loss_sum += loss.detach().float() / accum
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0) + v.detach().float() / accum
            tokens_since_log += self.tokens_in_batch(batch) * self.dist.world_size
            self.batch_in_epoch += 1
            micro += 1
            if not last_micro:
                continue
            micro = 0

            lr = lr_at(self.step, self.total_steps, cfg.learning_rate, self.warmup, cfg.min_lr_ratio)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.scaler.unscale_(self.optimizer)
            grad_norm = (torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip) if cfg.grad_clip > 0
                         else torch.zeros((), device=self.device))
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            steps_since_log += 1

            done = self.step >= self.total_steps
            if self.step % cfg.log_interval == 0 or done or self.step == step_at_start + 1:
                # the only host syncs of the loop: once per log interval
                if self.dist.enabled:
                    packed = torch.stack([loss_sum] + [metric_sums[k] for k in sorted(metric_sums)])
                    dist.all_reduce(packed, op=dist.ReduceOp.AVG if self.device.type == "cuda" else dist.ReduceOp.SUM)
                    if self.device.type != "cuda":
                        packed /= self.dist.world_size
                    loss_sum = packed[0]
                    metric_sums = {k: packed[i + 1] for i, k in enumerate(sorted(metric_sums))}
                loss_val = loss_sum.item() / steps_since_log
                self.history.append(loss_val)
                now = time.perf_counter()
                tok_s = tokens_since_log / (now - t_log)
                eta = (now - t_start) / (self.step - step_at_start) * (self.total_steps - self.step)
                extras = {k: v.item() / steps_since_log for k, v in metric_sums.items()}
                line = (f"step {self.step}/{self.total_steps} epoch {self.epoch + 1}/{cfg.epochs} "
                        f"loss {loss_val:.4f} lr {lr:.2e} grad_norm {grad_norm.item():.3f} "
                        f"tok/s {tok_s:,.0f} ETA {_fmt_time(eta)}")
                line += "".join(f" {k} {v:.4f}" for k, v in extras.items())
                self.scalar("train/loss", loss_val, self.step)
                self.scalar("train/lr", lr, self.step)
                self.scalar("train/grad_norm", grad_norm.item(), self.step)
                self.scalar("perf/tokens_per_s", tok_s, self.step)
                for k, v in extras.items():
                    self.scalar(f"train/{k}", v, self.step)
                if self.device.type == "cuda":
                    mem = torch.cuda.max_memory_allocated(self.device) / 2**30
                    mfu = tok_s / self.dist.world_size * flops_tok / H100_BF16_FLOPS
                    line += f" mem {mem:.2f}GiB mfu {100 * mfu:.1f}%"
                    self.scalar("perf/gpu_mem_gib", mem, self.step)
                    self.scalar("perf/mfu", mfu, self.step)
                self.log(line)
                loss_sum = torch.zeros((), device=self.device)
                metric_sums = {}
                tokens_since_log, t_log, steps_since_log = 0, time.perf_counter(), 0
            if done or (cfg.save_interval > 0 and self.step % cfg.save_interval == 0):
                self.save()
            if done:
                break
        if self.writer is not None:
            self.writer.close()
        return self.history


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def main_guard(fn):
    """Run a stage's main(); turn errors a user can fix into one clear line, and tear down DDP."""
    from minillm.data import DataError
    try:
        fn()
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class Stage:
    """What every stage script starts from: resolved configs, processes, tokenizer, model."""
    model_cfg: ModelConfig
    cfg: TrainConfig
    dist: DistInfo
    tokenizer: object
    model: torch.nn.Module
    stage_args: dict = field(default_factory=dict)  # the stage's own flags (--beta, --tag_weight, ...)


def prepare_stage(description: str, defaults: dict, argv=None, extra_args: Callable | None = None):
    """Parse flags, set up processes and seeds, load the tokenizer and build (or load) the model.

    With `--init_from DIR` (or a stage default) the model and its shape come from that
    checkpoint and its tokenizer is used unless --tokenizer_path says otherwise.
    `extra_args(parser)` lets a stage add its own flags; returns (Stage, args).
    """
    from minillm.checkpoint import load_checkpoint, load_config
    from minillm.config import build_parser, resolve
    from minillm.model import MiniLLM
    from minillm.tokenizer import Tokenizer

    parser = build_parser(description, defaults)
    common = {a.dest for a in parser._actions}
    if extra_args is not None:
        extra_args(parser)
    args = parser.parse_args(argv)
    stage_args = {a.dest: getattr(args, a.dest) for a in parser._actions if a.dest not in common}
    init_from = getattr(args, "init_from", defaults.get("init_from", ""))
    if init_from and not hasattr(args, "init_from") and hasattr(args, "save_dir"):  # flags absent unless given
        # the stage default names the previous stage's folder under the default save dir: follow
        # --save_dir, so `--save_dir runs/a` on every stage chains runs/a/pretrain -> runs/a/full_sft
        init_from = args.init_from = str(Path(args.save_dir) / Path(init_from).name)
    if init_from:
        try:
            base_cfg, _ = load_config(init_from)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e} (this stage starts from --init_from {init_from})") from None
        model_cfg, cfg = resolve(args, defaults, base_model=base_cfg)
    else:
        model_cfg, cfg = resolve(args, defaults)
    dist_info = setup_distributed(cfg.device)
    seed_everything(cfg.seed)
    if cfg.init_from:
        model, ckpt_tok = load_checkpoint(cfg.init_from, kernel_backend=model_cfg.kernel_backend)
        tokenizer = Tokenizer.load(cfg.tokenizer_path) if cfg.tokenizer_path else ckpt_tok
    else:
        model, tokenizer = MiniLLM(model_cfg), Tokenizer.load(cfg.tokenizer_path or None)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{model_cfg.vocab_size}; pass --vocab_size {tokenizer.vocab_size} or another tokenizer")
    return Stage(model_cfg, cfg, dist_info, tokenizer, model, stage_args), args


def build_on_main_first(dist_info: DistInfo, build: Callable):
    """Build a dataset on rank 0 first (it writes the caches), then on the others (they reuse them)."""
    result = None
    for main_turn in (True, False):
        if main_turn == dist_info.is_main:
            result = build()
        if dist_info.enabled:
            dist.barrier()
    return result
