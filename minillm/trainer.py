"""The shared training loop: the plumbing every stage needs and none of the stage's math.

A stage script builds the model, the dataset and a `loss_fn(model, batch) -> (loss, metrics)`,
then calls `Trainer(...).fit()`. The trainer owns: devices, DDP or FSDP2 (--fsdp 1), autocast,
activation checkpointing, gradient accumulation (DDP reduces gradients on the last micro-step only),
the warm-up + cosine schedule, clipping, AdamW, checkpoints and exact resume, and logging
(stdout and TensorBoard).
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist

from minillm import runs
from minillm.checkpoint import SHARDED, STATE, WEIGHTS, load_trainer_state, resolve_checkpoint, save_checkpoint
from minillm.config import COMPILE_MODES, ModelConfig, TrainConfig
from minillm.errors import Interrupted, TrainingDiverged, UserError

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
    from minillm.config import check_device
    want = check_device(device_flag)  # a UserError when this machine has no such device
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


def total_grad_norm(params) -> torch.Tensor:
    """The global L2 norm of the gradients, as clip_grad_norm_ computes it, without rescaling them."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def is_muon_param(name: str, param: torch.Tensor, adapters: bool = False) -> bool:
    """Muon's share of the model (nanochat / modded-nanogpt's split): the 2-D weights inside the decoder
    blocks (attention and MLP / expert projections). Embeddings, the output head, norms, biases and the
    MoE router stay on AdamW, and so do LoRA adapters unless `adapters`."""
    if param.dim() != 2 or ".layers." not in f".{name}" or name.endswith(".gate.weight"):
        return False
    return adapters or "lora_" not in name


class MuonAdamW:
    """torch.optim.Muon for the hidden matrices and AdamW for the rest, stepped as one optimizer (the
    trainer, GradScaler and checkpoints see one `param_groups` list and one state dict).

    The non-finite guard: Muon has no fused `found_inf` skip, so a flagged step is skipped here with
    one host read of the flag per step (AdamW alone skips on the device without one)."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer | None):
        self.parts = {"muon": muon, "adamw": adamw} if adamw is not None else {"muon": muon}
        self.muon, self.adamw = muon, adamw
        self.found_inf = None

    @property
    def param_groups(self):
        return [group for part in self.parts.values() for group in part.param_groups]

    @property
    def state(self):
        return {k: v for part in self.parts.values() for k, v in part.state.items()}

    def zero_grad(self, set_to_none: bool = True):
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        if self.found_inf is not None and bool(self.found_inf):
            return None
        for part in self.parts.values():
            part.step()
        return None

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict):
        if set(state) != set(self.parts):
            raise UserError(f"the checkpoint's optimizer state has parts {sorted(state)}, this run's has "
                            f"{sorted(self.parts)}: resume with the saved --optimizer and --muon_adapters")
        for name, part in self.parts.items():
            part.load_state_dict(state[name])


def build_optimizer(named_params, cfg: TrainConfig, device: torch.device):
    """`named_params`: (name, parameter) pairs to train. --optimizer adamw: AdamW, no weight decay on norms,
    biases and other 1-d tensors; the fused kernel (CUDA and CPU): fast, and it skips a step flagged through
    `optimizer.found_inf` on the device, without a host sync (the trainer's non-finite guard).
    --optimizer muon: Muon (--muon_lr, --muon_momentum, --weight_decay) for `is_muon_param`s, that AdamW
    (--learning_rate) for the rest. Every group carries its own `peak_lr` for the schedule."""
    named = [(n, p) for n, p in named_params if p.requires_grad]
    if not named:
        raise ValueError("nothing to train: no parameter requires a gradient")
    muon = [p for n, p in named if is_muon_param(n, p, bool(cfg.muon_adapters))] if cfg.optimizer == "muon" else []
    in_muon = {id(p) for p in muon}
    rest = [p for _, p in named if id(p) not in in_muon]
    decay = [p for p in rest if p.dim() >= 2]
    no_decay = [p for p in rest if p.dim() < 2]
    groups = [{"params": ps, "weight_decay": wd, "peak_lr": cfg.learning_rate}
              for ps, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)) if ps]
    adamw = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                              fused=device.type in ("cuda", "cpu")) if groups else None
    if cfg.optimizer != "muon":
        return adamw
    if not muon:
        raise UserError("--optimizer muon: no parameter here is a decoder block's 2-D weight (LoRA adapters "
                        "need --muon_adapters 1); use --optimizer adamw")
    # "original" (Keller Jordan's) scales each update by sqrt(max(1, rows / cols)): --muon_lr is Muon's own
    # learning rate (0.02 in modded-nanogpt and nanochat), not AdamW's
    return MuonAdamW(torch.optim.Muon([{"params": muon, "peak_lr": cfg.muon_lr}], lr=cfg.muon_lr,
                                      weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum, nesterov=True,
                                      adjust_lr_fn="original"), adamw)


def shard_model(model: torch.nn.Module, device: torch.device, param_dtype: torch.dtype | None):
    """FSDP2 (torch.distributed.fsdp.fully_shard) over all processes: one group per decoder block, so
    one block's all-gather overlaps the previous block's compute and only a block or two are whole at
    a time, then the root (embeddings, final norm, output head: tied weights share the root group).
    Parameters, gradients and the optimizer state built on them are sharded 1/world per rank; the
    sharded parameters stay fp32 (the master copy) and are gathered in `param_dtype` for compute
    (bf16 on CUDA), with gradients reduced in fp32. The module moves to `device` as it is sharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from minillm.model import Block
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for i, block in enumerate(blocks):
        # the backward pass needs the last block first: keeping it gathered after the forward saves
        # one all-gather per step (torchtitan does the same)
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def text_targets(batch: dict):
    """(inputs, shifted labels) of the text a batch trains a language model on: pretraining rows (every
    token), chat rows (the assistant's tokens), preference pairs (the chosen replies); None otherwise."""
    for side in ("", "chosen_"):
        ids = batch.get(f"{side}ids")
        if ids is not None:
            mask = batch.get(f"{side}loss_mask")
            labels = ids[:, 1:] if mask is None else ids[:, 1:].masked_fill(~mask[:, 1:], -100)
            return ids[:, :-1], labels
    return None


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N (matmuls, forward + backward) + 12·L·H·Q·T (attention),
    with N the non-embedding parameters plus the output head, as ANCHORS.md counts."""
    n = cfg.num_params(non_embedding=True) + cfg.vocab_size * cfg.hidden_size
    if cfg.use_moe:  # only the experts a token visits do work
        idle = cfg.n_routed_experts - cfg.num_experts_per_tok
        n -= cfg.num_hidden_layers * idle * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len


# -- the loop ---------------------------------------------------------------------------------
LossFn = Callable[[torch.nn.Module, dict, dict], "tuple[torch.Tensor, dict]"]
Rollout = Callable[[torch.nn.Module, list], Iterable]


class Trainer:
    """The plumbing around one stage's loss function.

        trainer = Trainer(stage, dataset, sampler, collate)              # every parameter trains
        trainer = Trainer(stage, dataset, sampler, collate, params=lora_params, save_adapter=True)
        trainer.fit(loss_fn, eval_set=held_out)

    `loss_fn(model, batch, totals) -> (loss, metrics)` is the stage's math. Exact normalisation
    across micro-batches and ranks (torchtitan's way): before an optimizer step the trainer takes
    all of that step's micro-batches, adds up every host-int count the collate put in them (keys
    `n_*`: n_targets, n_pairs, ...) over the micro-batches and all ranks, and passes the sums as
    `totals` (plus `totals["micro_batches"]`, their number over all ranks). The loss_fn returns
    its micro-batch's *share* of the step's loss (e.g. a local sum divided by `totals["n_targets"]`),
    so the shares of all micro-batches and ranks add up to the step's loss, whatever the split;
    metrics are shares the same way. `sampler` yields this rank's micro-batches, grouped per
    optimizer step (data.samplers), and has `set_epoch(epoch, start_batch)`.

    `collate` turns a list of items into a batch dict with host-int counts, `n_tokens` (real tokens,
    for tok/s) among them. `params` (default: all) are what the optimizer updates; `save_adapter=True` saves only the LoRA
    adapter (plus resume state) instead of the whole model. `checkpoint_model` (default: the model) is the
    part of the model a checkpoint's weights hold, e.g. the policy of PPO's policy + critic pair, so the
    checkpoint loads as a plain model; the model's other tensors (the critic) travel in the resume state.

    --fsdp 1 shards the model instead of replicating it (`shard_model`); `loss_fn` then must reach the
    model through its forward (`model(...)`), as it must for DDP and torch.compile too.
    """

    def __init__(self, stage: "Stage", dataset, sampler, collate, params=None, save_adapter: bool = False,
                 checkpoint_model: torch.nn.Module | None = None):
        self.stage, self.cfg, self.dist = stage, stage.cfg, stage.dist
        self.device = stage.dist.device
        self.model = stage.model
        self.dataset, self.sampler, self.collate = dataset, sampler, collate
        self.save_adapter = save_adapter
        self.checkpoint_model = checkpoint_model if checkpoint_model is not None else self.model
        cfg = self.cfg
        self.run_dir = Path(cfg.save_dir) / cfg.save_weight
        self.log_dir = Path(cfg.save_dir) / "logs" / cfg.save_weight

        cuda = self.device.type == "cuda"
        self.amp_dtype = training_dtype(cfg.dtype, self.device)
        self.autocast = autocast_context(self.amp_dtype, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda and self.amp_dtype == torch.float16)

        # --fsdp 1: sharded across processes (in one process the model stays whole, but checkpoints take
        # the same sharded form, so a run can move between 1 and N processes)
        self.sharded = bool(cfg.fsdp) and self.dist.enabled
        if cfg.fsdp:
            self.check_fsdp_fits(checkpoint_model)
        if cfg.grad_checkpointing:
            self.enable_grad_checkpointing(cfg.grad_checkpointing)
        params = list(params) if params is not None else list(self.model.parameters())
        self.params = [p for p in params if p.requires_grad]
        if self.sharded:  # fully_shard replaces the parameters: find the trained ones again by name
            names = {id(p): n for n, p in self.model.named_parameters()}
            if any(id(p) not in names for p in self.params):
                raise ValueError("--fsdp 1: every parameter to train must belong to the model")
            trained = [names[id(p)] for p in self.params]
            shard_model(self.model, self.device, self.amp_dtype if cuda else None)
            by_name = dict(self.model.named_parameters())
            self.params = [by_name[n] for n in trained]
        else:  # (fully_shard has moved the shards and buffers to the device)
            self.model = self.model.to(self.device)
        wanted = {id(p) for p in self.params}
        self.optimizer = build_optimizer([(n, p) for n, p in self.model.named_parameters() if id(p) in wanted],
                                         cfg, self.device)
        # this run's flags, kept apart: a resumed optimizer state brings back the saved groups' values
        self.peak_lrs = [group["peak_lr"] for group in self.optimizer.param_groups]

        wrapped = self.model
        if self.dist.enabled and not self.sharded:
            from torch.nn.parallel import DistributedDataParallel as DDP
            wrapped = DDP(self.model, device_ids=[self.device.index] if cuda else None)
        mode = cfg.compile_mode  # checked when the TrainConfig was built
        compile_on = cfg.use_compile == 1 or (cfg.use_compile == -1 and cuda)
        self.step_model = torch.compile(wrapped, mode=mode) if compile_on else wrapped
        self.ddp_model = wrapped

        sampler.set_epoch(0, 0)
        steps_per_epoch = len(sampler) // cfg.accumulation_steps
        if steps_per_epoch == 0:
            raise UserError(f"{cfg.data_path}: too few rows for one optimizer step of --batch_size "
                            f"{cfg.batch_size} x --accumulation_steps {cfg.accumulation_steps} x "
                            f"{self.dist.world_size} processes; use more data or smaller values")
        self.steps_per_epoch = steps_per_epoch
        total = steps_per_epoch * cfg.epochs
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps > 0 else total
        if cfg.benchmark:
            self.total_steps = min(total, cfg.benchmark_warmup + cfg.benchmark)
            if self.total_steps <= cfg.benchmark_warmup:
                raise UserError(f"--benchmark: {cfg.data_path} gives {total} optimizer steps, not more than "
                                f"--benchmark_warmup {cfg.benchmark_warmup}; use more data or more --epochs")
        self.benchmark_result: dict | None = None
        self.warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else max(1, self.total_steps // 100)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.history: list[float] = []  # loss per logged step, for tests and reports
        self.eval_history: list[tuple[int, float]] = []  # (step, held-out loss)
        self.eval_metrics: list[tuple[int, dict]] = []  # (step, held-out metrics: bits_per_byte, the stage's)
        self.byte_lengths = None  # UTF-8 bytes per token id, for bits per byte: made at the first evaluation
        self.writer = None

    # -- sharding and activation checkpointing ---------------------------------------------------
    def check_fsdp_fits(self, checkpoint_model):
        """--fsdp 1 shards one whole model trained by gradient steps; refuse by name what it does not cover."""
        cfg = self.cfg
        if self.save_adapter:
            raise UserError("--fsdp 1 shards whole-model training; a LoRA adapter is small enough to train "
                            "with --fsdp 0 (DDP replicates only the frozen base and the adapter)")
        if checkpoint_model is not None and checkpoint_model is not self.model:
            raise UserError("--fsdp 1 shards one model; this stage trains a model pair (e.g. PPO's policy and "
                            "critic): use --fsdp 0")
        if cfg.optimizer == "muon" and self.dist.enabled:
            raise UserError("--optimizer muon with --fsdp 1: Muon orthogonalises whole matrices but FSDP2 gives "
                            "each process a slice of rows; use --optimizer adamw with --fsdp 1, or --fsdp 0")
        if self.amp_dtype == torch.float16:
            raise UserError("--dtype float16 with --fsdp 1: fp16 needs a loss scaler that sharded gradients do "
                            "not get here; use --dtype bfloat16")

    def enable_grad_checkpointing(self, every: int):
        """Every `every`-th decoder block recomputes its activations in the backward pass (the model's
        forward reads `grad_checkpointing`, a training switch, not part of the saved ModelConfig)."""
        decoders = [m for m in self.model.modules() if hasattr(m, "forward_hidden")]
        if not decoders:
            raise UserError(f"--grad_checkpointing {every}: this stage's model has no decoder blocks to "
                            f"checkpoint; use --grad_checkpointing 0")
        for module in decoders:
            module.grad_checkpointing = every

    def optimizers(self) -> list:
        return list(self.optimizer.parts.values()) if isinstance(self.optimizer, MuonAdamW) else [self.optimizer]

    def sharded_state(self) -> dict:
        """The model's and optimizer's state as torch.distributed.checkpoint sees it: each rank's shards
        under fully-qualified names (whole tensors in one process), which DCP reshards on load."""
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_state, optimizer_state = get_state_dict(self.model, self.optimizers())
        return {"model": model_state, "optimizer": optimizer_state}

    # -- checkpoints --------------------------------------------------------------------------
    def state(self) -> dict:
        rngs = [rng_state()]
        if self.dist.enabled:
            rngs = [None] * self.dist.world_size
            dist.all_gather_object(rngs, rng_state())
        state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "scaler": self.scaler.state_dict(), "rng": rngs, "world_size": self.dist.world_size,
                 "total_steps": self.total_steps, "fsdp": self.cfg.fsdp}
        if not self.cfg.fsdp:  # --fsdp 1: the optimizer state lives in the sharded dcp/ folder
            state["optimizer"] = self.optimizer.state_dict()
        if self.checkpoint_model is not self.model:
            state["other_tensors"] = self.other_tensors()
        return state

    def other_tensors(self) -> dict:
        """The model's weights and buffers that the checkpoint's weights leave out (told apart by identity,
        so tied or shared tensors are not doubled), as CPU copies."""
        in_checkpoint = {id(t) for t in self.checkpoint_model.state_dict(keep_vars=True).values()}
        return {name: t.detach().cpu().clone() for name, t in self.model.state_dict(keep_vars=True).items()
                if id(t) not in in_checkpoint}

    def save(self):
        self.check_finite_weights()  # on every rank (DDP keeps them equal), so all stop together
        state = self.state()  # a collective under DDP: every rank takes part
        if self.cfg.fsdp:
            return self.save_sharded(state)
        if self.dist.is_main:
            stage_doc = {"stage": self.stage.stage_args} if self.stage.stage_args else {}
            if self.save_adapter:
                from minillm.lora import save_lora
                save_lora(self.run_dir, self.checkpoint_model, {"train": self.cfg.to_dict(), **stage_doc,
                                                     "base": self.cfg.init_from}, trainer_state=state)
            else:
                save_checkpoint(self.run_dir, self.checkpoint_model, self.stage.tokenizer, self.cfg, trainer_state=state,
                                extra=stage_doc or None)
            runs.record_history(self.run_dir, self.step, self.cfg.keep_last)
        if self.dist.enabled:
            dist.barrier()

    def save_sharded(self, state: dict):
        """--fsdp 1: every rank writes its shards of the model and optimizer (torch.distributed.checkpoint,
        resumable on any number of processes) into dcp/ of rank 0's temp folder; rank 0 adds the usual
        single-file weights (gathered to its CPU, for eval and the next stage), config, tokenizer and
        resume state; then the folder replaces the last one as a whole. The run folder must be on storage
        every rank sees (one machine, or a shared file system across machines)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        shards = self.sharded_state()

        def write_shards(tmp: Path | None):
            box = [str(tmp) if tmp is not None else None]
            if self.dist.enabled:
                dist.broadcast_object_list(box, src=0)
            with _quiet_in_one_process():
                dcp.save(shards, checkpoint_id=Path(box[0]) / SHARDED)

        if self.dist.is_main:
            stage_doc = {"stage": self.stage.stage_args} if self.stage.stage_args else {}
            save_checkpoint(self.run_dir, self.model, self.stage.tokenizer, self.cfg, trainer_state=state,
                            extra=stage_doc or None, weights=full, write_more=write_shards)
            runs.record_history(self.run_dir, self.step, self.cfg.keep_last)
        else:
            write_shards(None)
        if self.dist.enabled:
            dist.barrier()

    def load_sharded(self, folder: Path):
        """Model and optimizer state from folder/dcp, resharded to this run's processes (any number)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict
        if not (folder / SHARDED).is_dir():
            raise UserError(f"{folder} has no {SHARDED}/ folder (the sharded state --fsdp 1 resumes from)")
        state = self.sharded_state()
        with _quiet_in_one_process():
            dcp.load(state, checkpoint_id=folder / SHARDED)
        set_state_dict(self.model, self.optimizers(), model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])

    def check_finite_weights(self):
        """Never save non-finite weights: the run stops and the previous checkpoint stays."""
        from torch.distributed.tensor import DTensor
        local = [p.detach().to_local() if isinstance(p, DTensor) else p.detach() for p in self.model.parameters()]
        finite = torch.stack([t.isfinite().all() for t in local]).all()
        if self.sharded:  # each rank sees its shards: all must be finite
            finite = finite.to(torch.int32)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            raise TrainingDiverged(f"step {self.step}: the weights hold NaN or inf values; nothing was saved, the "
                                   f"last checkpoint in {self.run_dir} is kept. Lower --learning_rate or check "
                                   f"the data, then --from_resume 1")

    def _load_for_resume(self, folder: Path) -> dict:
        """Restore weights (or the adapter) from `folder`; -> its trainer state. Raises on any damage."""
        state = load_trainer_state(folder)
        if state is None:
            raise UserError(f"{folder} has no trainer_state.pt, so it cannot be resumed; "
                            f"start without --from_resume or pick another --save_weight")
        self.resume_warning = self.check_resume_fits(folder, state)
        if self.cfg.fsdp:
            self.load_sharded(folder)
        elif self.save_adapter:
            from minillm.lora import load_lora
            load_lora(self.checkpoint_model, folder)
        else:
            from minillm.checkpoint import load_weights
            load_weights(self.checkpoint_model, folder)
        if self.checkpoint_model is not self.model:
            expected = self.other_tensors().keys()
            others = state.get("other_tensors", {})
            if set(others) != set(expected):
                raise UserError(f"{folder}: the resume state holds {sorted(others)[:3]}... but this run's model "
                                f"needs {sorted(expected)[:3]}...; it was written by another kind of run")
            self.model.load_state_dict(others, strict=False)
        return state

    def check_resume_fits(self, folder: Path, state: dict) -> str | None:
        """Refuse to resume where the saved position or weights would mean something else in this run;
        settings that are safe to change (learning rate, schedule, length) only get a warning (returned)."""
        saved_fsdp = int(state.get("fsdp", 0))
        if saved_fsdp != self.cfg.fsdp:
            raise UserError(f"cannot resume {folder}: it was written with --fsdp {saved_fsdp}, this run has "
                            f"--fsdp {self.cfg.fsdp}; resume with --fsdp {saved_fsdp}")
        # a sharded checkpoint reshards to any number of processes; DDP's resume state is per rank
        resharded = state["world_size"] != self.dist.world_size
        if resharded and not self.cfg.fsdp:
            raise UserError(f"{folder} was written by {state['world_size']} processes, this run has "
                            f"{self.dist.world_size}; resume with the same --nproc_per_node (checkpoints of "
                            f"--fsdp 1 runs resume on any number)")
        from minillm.config import load_yaml
        doc = load_yaml(folder / ("adapter_config.yaml" if self.save_adapter else "config.yaml"))
        saved_model = doc.get("base_model" if self.save_adapter else "model", {})
        mine = getattr(self.checkpoint_model, "config", None)
        if mine is not None:
            changed = {k: (v, getattr(mine, k)) for k, v in saved_model.items()
                       if k != "kernel_backend" and hasattr(mine, k) and getattr(mine, k) != v}
            if changed:
                raise UserError(f"cannot resume {folder}: the model changed since it was saved ("
                                + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
                                + "); resume with the original shape or start a new run")
        saved = doc.get("train", {})
        now = self.cfg.to_dict()
        saved_batch = saved.get("batch_size", now["batch_size"])
        if resharded and saved_batch * state["world_size"] != now["batch_size"] * self.dist.world_size:
            raise UserError(f"cannot resume {folder}: it was written by {state['world_size']} processes x --batch_size "
                            f"{saved_batch}, this run has {self.dist.world_size} x {now['batch_size']}; keep "
                            f"processes x --batch_size the same ({state['world_size'] * saved_batch} rows per "
                            f"micro-batch) so the saved data position means the same rows")
        unsafe = [k for k in ("data_path", "batch_size", "accumulation_steps", "max_seq_len", "seed", "init_from",
                              "optimizer")
                  if k in saved and saved[k] != now[k] and not (k == "batch_size" and resharded)]
        if unsafe:
            raise UserError(f"cannot resume {folder}: " + ", ".join(f"--{k} {saved[k]!r} -> {now[k]!r}" for k in unsafe)
                            + " changed, so the saved data position would point elsewhere; resume with the "
                              "saved values or start a new run (--overwrite 1 or another --save_weight)")
        safe = [k for k in ("learning_rate", "min_lr_ratio", "warmup_steps", "weight_decay", "epochs", "max_steps",
                            "grad_clip", "beta1", "beta2", "dtype", "muon_lr", "muon_momentum")
                if k in saved and saved[k] != now[k]]
        return ("warning: resuming with changed " + ", ".join(f"--{k} {saved[k]} -> {now[k]}" for k in safe)
                if safe else None)

    def try_resume(self) -> bool:
        """--from_resume 1: continue from the latest checkpoint; if it does not load (truncated or corrupt
        files), fall back to the newest kept one that does (--keep_last), naming both."""
        if not self.cfg.from_resume:
            return False
        marker = STATE if self.save_adapter else WEIGHTS  # an adapter folder holds no model.safetensors
        candidates = []
        try:
            candidates.append(resolve_checkpoint(self.run_dir, marker=marker))
        except (FileNotFoundError, UserError):
            pass
        candidates += [p for p in runs.history_checkpoints(self.run_dir) if (p / marker).is_file()]
        if not candidates:
            self.log(f"--from_resume 1: no checkpoint at {self.run_dir} yet, starting fresh")
            return False
        failures = []
        for folder in candidates:
            try:
                state = self._load_for_resume(folder)
            except UserError as e:
                if "cannot resume" in str(e) or "processes, this run has" in str(e):
                    raise  # a mismatch with this run, not damage: every older checkpoint shares it
                failures.append(f"{folder}: {e}")
                continue
            except Exception as e:  # noqa: BLE001 - a damaged file: truncated torch.load, bad yaml, ...
                failures.append(f"{folder}: {type(e).__name__}: {e}")
                continue
            for failure in failures:
                self.log(f"warning: could not resume from {failure}; falling back to {folder}")
            if self.resume_warning:
                self.log(self.resume_warning)
            break
        else:
            raise UserError("--from_resume 1: no checkpoint of this run loads: " + "; ".join(failures))
        if not self.cfg.fsdp:  # (--fsdp 1: loaded with the model, from dcp/)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][self.dist.rank % len(state["rng"])])  # resharded: another rank's stream
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.log(f"resumed from {folder} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")
        return True

    def claim_run_dir(self):
        """Before anything is written: hold the run's lock, refuse to replace a finished run unless
        --overwrite 1 (or --from_resume 1) says so, and remove temp folders of killed runs. Decided on
        rank 0 (the only writer); every rank raises the same error."""
        error = None
        if self.dist.is_main:
            try:
                self.lock = runs.RunLock(self.run_dir).acquire()
                if runs.has_checkpoint(self.run_dir) and not self.cfg.from_resume:
                    if not self.cfg.overwrite:
                        runs.refuse_to_replace(self.run_dir)
                    runs.clear_previous_run(self.run_dir, self.log_dir)
                    self.log(f"--overwrite 1: {self.run_dir} will be replaced at the first save")
                for stale in runs.remove_stale_temp_folders(self.run_dir):
                    self.log(f"removed {stale}, the unfinished save of an earlier run that was killed")
            except UserError as e:
                error = str(e)
        if self.dist.enabled:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise UserError(error)

    # -- logging ------------------------------------------------------------------------------
    def log(self, msg: str):
        if self.dist.is_main:
            print(msg, flush=True)

    def scalar(self, name: str, value: float, step: int):
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    # -- data -----------------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def step_batches(self):
        """The micro-batches of each optimizer step from the current position on, on the device.
        An epoch's micro-batches that do not fill a whole step are left out."""
        accum = self.cfg.accumulation_steps
        while self.epoch < self.cfg.epochs:
            self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
            left = (len(self.sampler) // accum) * accum
            # its own generator: a DataLoader without one draws its workers' base seed from the global RNG,
            # so every (re)start would shift the stream that dropout and sampling draw from afterwards
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=self.sampler, collate_fn=self.collate,
                num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda",
                prefetch_factor=4 if self.cfg.num_workers > 0 else None,
                generator=torch.Generator().manual_seed(self.cfg.seed * 100_003 + self.epoch))
            micro = []
            for i, batch in enumerate(loader):
                if i >= left:
                    break
                micro.append(self._to_device(batch))
                if len(micro) == accum:
                    self.batch_in_epoch += accum
                    yield micro
                    micro = []
            self.epoch += 1
            self.batch_in_epoch = 0

    def totals(self, micro_batches: list[dict]):
        """Every `n_*` count summed over the step's micro-batches and all ranks, plus the number of
        micro-batches: plain numbers in one process, device tensors (one all-reduce) under DDP."""
        keys = sorted(k for k, v in micro_batches[0].items() if k.startswith("n_") and isinstance(v, int))
        local = [float(sum(b[k] for b in micro_batches)) for k in keys] + [float(len(micro_batches))]
        if not self.dist.enabled:
            return dict(zip(keys + ["micro_batches"], local))
        packed = torch.tensor(local, dtype=torch.float64, device=self.device)
        dist.all_reduce(packed)  # a device collective: no host sync
        packed = packed.float()
        return {k: packed[i] for i, k in enumerate(keys + ["micro_batches"])}

    # -- held-out evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, loss_fn: LossFn, eval_set) -> tuple[float, dict[str, float]]:
        """The stage's loss and metrics over the whole held-out set, normalised over all of it
        (its batches are one "step"). Rank 0 only, on the unwrapped model: no collectives (sharded:
        every rank runs it alike, as each forward gathers the weights)."""
        from minillm.model import eval_mode
        order = np.argsort(-np.asarray(eval_set.lengths)) if getattr(eval_set, "lengths", None) is not None \
            else np.arange(len(eval_set))
        b = self.cfg.batch_size
        batches = [self.collate([eval_set[int(i)] for i in order[s: s + b]]) for s in range(0, len(order), b)]
        keys = [k for k, v in batches[0].items() if k.startswith("n_") and isinstance(v, int)]
        totals = {k: float(sum(batch[k] for batch in batches)) for k in keys}
        totals["micro_batches"] = float(len(batches))
        loss, metrics = torch.zeros((), device=self.device), {}
        from minillm.evaluation import bits_per_byte, nats_and_bytes, token_byte_lengths
        from minillm.model import MiniLLM
        if isinstance(self.model, MiniLLM) and self.byte_lengths is None:
            self.byte_lengths = token_byte_lengths(self.stage.tokenizer)  # once: a pass over the vocabulary
        byte_lengths = self.byte_lengths if isinstance(self.model, MiniLLM) else None
        nats, n_bytes = torch.zeros((), device=self.device), torch.zeros((), dtype=torch.long, device=self.device)
        with eval_mode(self.model):
            for batch in batches:
                batch = self._to_device(batch)
                with self.autocast:
                    part, part_metrics = loss_fn(self.model, batch, totals)
                    text = text_targets(batch) if byte_lengths is not None else None
                    if text is not None:  # bits per byte of the text the stage trains on
                        batch_nats, batch_bytes = nats_and_bytes(self.model, *text, byte_lengths)
                        nats, n_bytes = nats + batch_nats, n_bytes + batch_bytes
                loss += part.detach().float()
                for k, v in part_metrics.items():
                    metrics[k] = metrics.get(k, 0.0) + v.detach().float()
        out = {k: v.item() for k, v in metrics.items()}
        if int(n_bytes):
            out["bits_per_byte"] = bits_per_byte(nats, n_bytes)
        return loss.item(), out

    def _run_eval(self, loss_fn, eval_set):
        if self.dist.is_main or self.sharded:
            loss, metrics = self.evaluate(loss_fn, eval_set)
            self.eval_history.append((self.step, loss))
            self.eval_metrics.append((self.step, metrics))
            self.log(f"eval step {self.step}: loss {loss:.4f}" + "".join(f" {k} {v:.4f}" for k, v in metrics.items()))
            self.scalar("eval/loss", loss, self.step)
            for k, v in metrics.items():
                self.scalar(f"eval/{k}", v, self.step)
        if self.dist.enabled:
            dist.barrier()

    # -- the loop -------------------------------------------------------------------------------
    # -- the non-finite guard ----------------------------------------------------------------------
    def _flag_nonfinite(self, grad_norm, step_loss):
        """Device-side, no sync: flag a step whose gradient norm (global: every rank agrees) or, in one
        process, loss is not finite, so the fused AdamW skips it; count runs of such steps."""
        bad = ~torch.isfinite(grad_norm)
        if not self.dist.enabled:
            bad |= ~torch.isfinite(step_loss)
        self.bad_run.add_(1).mul_(bad)  # +1 on a bad step, back to 0 on a good one
        torch.maximum(self.bad_run_max, self.bad_run, out=self.bad_run_max)
        self.bad_total.add_(bad)
        self.last_bad_step.masked_fill_(bad, self.step + 1)
        return bad

    def check_health(self):
        """Read the guard's counters (one small sync, at log and save time only) and apply --nan_policy."""
        longest, total, last = (int(x) for x in torch.stack([self.bad_run_max, self.bad_total,
                                                             self.last_bad_step]).tolist())
        self.bad_run_max.zero_()
        if total > self.bad_reported:
            self.log(f"warning: {total - self.bad_reported} step(s) with a non-finite loss or gradient norm were "
                     f"skipped (last at step {last}; {total} in this run)")
            self.bad_reported = total
        if self.cfg.nan_policy == "stop" and longest >= self.cfg.max_bad_steps:
            raise TrainingDiverged(
                f"step {last}: the loss or gradient norm was not finite for {longest} steps in a row "
                f"(--max_bad_steps {self.cfg.max_bad_steps}); none of them was applied and nothing was saved, "
                f"the last checkpoint in {self.run_dir} is kept. Lower --learning_rate or check the data, then "
                f"--from_resume 1 (or --nan_policy skip to keep skipping such steps)")

    # -- interrupts ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _interrupts(self):
        """SIGINT / SIGTERM set `self.stop_signal`: the loop finishes its optimizer step, saves and stops.
        A second signal exits at once (the last complete checkpoint is intact: saves are atomic)."""
        import signal
        import threading
        self.stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handle(signum, frame):
            if self.stop_signal is not None:
                print(f"\nsignal {signum} again: exiting now without saving", file=sys.stderr, flush=True)
                os._exit(128 + signum)
            self.stop_signal = signum
            print(f"\nsignal {signum}: finishing this step, then saving and stopping "
                  f"(send it again to exit at once)", file=sys.stderr, flush=True)
        previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _stop_requested(self) -> int:
        """The signal any rank received (0 if none): every rank must stop at the same step. A tiny CPU
        all-reduce on a gloo group each step: no device sync."""
        mine = self.stop_signal or 0
        if not self.dist.enabled:
            return mine
        flag = torch.tensor([mine], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.ctrl_group)
        return int(flag.item())

    # -- the loop -------------------------------------------------------------------------------
    def _update(self, loss_fn: LossFn, micro_batches: list[dict], totals: dict, step_loss, step_metrics: dict,
                found_inf) -> torch.Tensor:
        """One optimizer update over `micro_batches` (gradients accumulated, all-reduced on the last):
        adds their loss shares to `step_loss` and metric shares to `step_metrics`; -> the grad norm."""
        cfg, world = self.cfg, self.dist.world_size
        update_loss = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            # DDP: gradients are all-reduced only on the last micro-batch of the update
            with self._gradient_sync(i == len(micro_batches) - 1):
                with self.autocast:
                    loss, metrics = loss_fn(self.step_model, batch, totals)
                # DDP and FSDP average gradients over ranks; the shares already sum over ranks, so scale them
                # back up
                self.scaler.scale(loss * world if world > 1 else loss).backward()
            update_loss += loss.detach().float()
            for k, v in metrics.items():
                step_metrics[k] = step_metrics.get(k, 0) + v.detach().float()
        self.scaler.unscale_(self.optimizer)
        if self.sharded:
            grad_norm = self._clip_sharded()
        else:
            grad_norm = (torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip) if cfg.grad_clip > 0
                         else total_grad_norm(self.params))  # the guard needs the norm even without clipping
        bad = self._flag_nonfinite(grad_norm, update_loss)
        if not self.scaler.is_enabled():  # (fp16's GradScaler flags inf/NaN steps itself)
            self.optimizer.found_inf = found_inf.copy_(bad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        step_loss += update_loss
        return grad_norm

    def _gradient_sync(self, last: bool):
        """DDP all-reduces gradients on an update's last micro-batch only (no_sync() before it). FSDP2
        reduce-scatters after every micro-batch instead, as ZeRO-2 does: skipping it would keep a whole
        unsharded fp32 gradient per rank between micro-batches (4 bytes per parameter, 4 GiB at the 1b
        preset), the memory sharding is there to save; the extra traffic is per micro-batch."""
        if self.dist.enabled and not last and not self.sharded:
            return self.ddp_model.no_sync()
        return contextlib.nullcontext()

    def _clip_sharded(self) -> torch.Tensor:
        """The global gradient norm of sharded gradients (each rank's shard norms, combined by one device
        all-reduce) and clipping by it, as clip_grad_norm_ does for whole tensors."""
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.cfg.grad_clip, norm)
        return norm

    def _gather_for_use(self):
        """After a sharded run: every rank gathers the whole model once and keeps it (no resharding after a
        forward), so what a stage script then does with the model on rank 0 alone (held-out reports,
        samples) needs no other rank. Collective: every rank calls it at the end of fit()."""
        from torch.distributed.fsdp import FSDPModule
        groups = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
        for module in groups:
            module.set_reshard_after_forward(False)
        for module in groups:
            module.unshard()

    def fit(self, loss_fn: LossFn, eval_set=None, rollout: Rollout | None = None) -> list[float]:
        """Train to the end (resuming first with --from_resume 1), evaluating `eval_set` with the same
        loss_fn every --eval_interval steps and at the end; returns the logged training losses.

        `rollout(model, micro_batches) -> iterable of updates` (RL stages) turns each step's batches
        of prompts into experience before any loss is taken: it is called with the plain model (no
        DDP wrapper, train mode: it switches to eval itself to sample) and yields one or more lists of
        experience micro-batches, each list one optimizer update (PPO: epochs x mini-batches; GRPO:
        one). Every rank must yield the same number of updates. A step is one call, so the schedule,
        logging, checkpoints and resume count rollouts; the logged loss and metrics are means over a
        step's updates."""
        if rollout is not None and self.sharded:
            raise UserError("--fsdp 1 does not shard RL stages (ranks sample rollouts of different lengths, "
                            "which sharded forwards cannot follow); use --fsdp 0")
        if not self.cfg.benchmark:  # a benchmark writes nothing: no run folder to claim
            self.claim_run_dir()
        try:
            with self._interrupts():
                history = self._fit(loss_fn, eval_set, rollout)
            if self.sharded:
                self._gather_for_use()
            return history
        finally:
            if self.writer is not None:
                self.writer.close()
            if getattr(self, "lock", None) is not None:
                self.lock.release()

    def _fit(self, loss_fn: LossFn, eval_set=None, rollout=None) -> list[float]:
        cfg = self.cfg
        self.ctrl_group = None
        if self.dist.enabled:  # the interrupt flag travels on CPU, never through the GPU's stream
            self.ctrl_group = dist.new_group(backend="gloo") if self.device.type == "cuda" else None
        if not cfg.benchmark:
            self.try_resume()
        if self.dist.is_main and cfg.use_tensorboard and not cfg.benchmark:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.log_dir))
        n_params = sum(p.numel() for p in self.params)
        precision = f"{str(self.amp_dtype).removeprefix('torch.')} autocast" if self.amp_dtype else "float32"
        optimizer = (f"Muon lr {cfg.muon_lr:g} + AdamW lr {cfg.learning_rate:g}" if cfg.optimizer == "muon"
                     else f"AdamW lr {cfg.learning_rate:g}")
        precision += ", FSDP2 sharded" if self.sharded else ""
        precision += f", grad checkpointing every {cfg.grad_checkpointing} block(s)" if cfg.grad_checkpointing else ""
        self.log(f"training {n_params / 1e6:.2f}M parameters on {self.dist.world_size} x {self.device} "
                 f"({precision}), {self.total_steps} steps of {cfg.batch_size} x {cfg.accumulation_steps} x "
                 f"{self.dist.world_size} rows, {optimizer}; checkpoints -> {self.run_dir}, TensorBoard -> {self.log_dir}")
        model_cfg = getattr(self.model, "config", None)
        flops_tok = flops_per_token(model_cfg, cfg.max_seq_len) if model_cfg is not None else 0.0
        eval_every = cfg.eval_interval if cfg.eval_interval > 0 else cfg.save_interval
        world = self.dist.world_size
        zero = torch.zeros((), dtype=torch.long, device=self.device)
        self.bad_run, self.bad_run_max, self.bad_total = zero.clone(), zero.clone(), zero.clone()
        self.last_bad_step, self.bad_reported = zero.clone(), 0
        found_inf = torch.zeros((), device=self.device)  # the fused AdamW's skip flag, refilled each step
        step_loss = torch.zeros((), device=self.device)

        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        metric_sums: dict[str, torch.Tensor] = {}
        tokens_since_log, t_log, t_start, steps_since_log = 0, time.perf_counter(), time.perf_counter(), 0
        step_at_start = self.step
        stopped_by = 0
        tokens_total, bench_start = 0, None  # --benchmark: (time, tokens) when its clock starts
        for micro_batches in self.step_batches() if self.step < self.total_steps else ():
            lr = lr_at(self.step, self.total_steps, cfg.learning_rate, self.warmup, cfg.min_lr_ratio)
            for group, peak in zip(self.optimizer.param_groups, self.peak_lrs):  # Muon's peak differs
                group["lr"] = lr_at(self.step, self.total_steps, peak, self.warmup, cfg.min_lr_ratio)
            # RL: the step's prompts become experience (rollouts, rewards), which may feed several
            # optimizer updates (PPO epochs x mini-batches); otherwise the batches are one update
            updates = [micro_batches] if rollout is None else rollout(self.model, micro_batches)
            step_loss.zero_()
            step_metrics: dict[str, torch.Tensor] = {}
            n_updates = 0
            for update in updates:
                n_updates += 1
                totals = self.totals(update)
                grad_norm = self._update(loss_fn, update, totals, step_loss, step_metrics, found_inf)
                update_tokens = sum(batch["n_tokens"] for batch in update) * world  # host ints from the collate
                tokens_since_log += update_tokens
                tokens_total += update_tokens
            if n_updates == 0:
                raise RuntimeError("the rollout function gave no update for this step")
            if n_updates > 1:  # a step's loss and metrics are means over its updates
                step_loss /= n_updates
            for k, v in step_metrics.items():
                metric_sums[k] = metric_sums.get(k, 0) + (v / n_updates if n_updates > 1 else v)
            loss_sum += step_loss
            self.step += 1
            steps_since_log += 1

            stopped_by = self._stop_requested()
            done = self.step >= self.total_steps or bool(stopped_by)
            if cfg.benchmark and (self.step == step_at_start + cfg.benchmark_warmup or done):
                self._sync()
                if bench_start is None:
                    bench_start = (time.perf_counter(), tokens_total, self.step)
                else:
                    self._report_benchmark(bench_start, tokens_total)
            if self.step % cfg.log_interval == 0 or done or self.step == step_at_start + 1:
                # the only host syncs of the loop: once per log interval
                if self.dist.enabled:  # each rank holds its shares: their sum is the step's value
                    packed = torch.stack([loss_sum] + [metric_sums[k] for k in sorted(metric_sums)])
                    dist.all_reduce(packed)
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
                    mfu = tok_s / world * flops_tok / H100_BF16_FLOPS
                    line += f" mem {mem:.2f}GiB mfu {100 * mfu:.1f}%"
                    self.scalar("perf/gpu_mem_gib", mem, self.step)
                    self.scalar("perf/mfu", mfu, self.step)
                self.log(line)
                self.check_health()
                loss_sum = torch.zeros((), device=self.device)
                metric_sums = {}
                tokens_since_log, t_log, steps_since_log = 0, time.perf_counter(), 0
            if cfg.benchmark:
                if done:
                    break
                continue
            if eval_set is not None and not stopped_by and (done or (eval_every > 0 and self.step % eval_every == 0)):
                self._run_eval(loss_fn, eval_set)
            if done or (cfg.save_interval > 0 and self.step % cfg.save_interval == 0):
                self.check_health()
                self.save()
            if done:
                break
        if stopped_by:
            raise Interrupted(f"interrupted by signal {stopped_by} after step {self.step}: saved to {self.run_dir}; "
                              f"continue with the same command plus --from_resume 1", stopped_by)
        return self.history


    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _report_benchmark(self, start: tuple, tokens_total: int):
        t0, tokens0, step0 = start
        seconds, steps = time.perf_counter() - t0, self.step - step0
        tok_s = (tokens_total - tokens0) / seconds
        self.benchmark_result = {"tokens_per_s": tok_s, "steps": steps, "seconds": seconds,
                                 "warmup_steps": step0, "world_size": self.dist.world_size}
        line = (f"benchmark: {tok_s:,.0f} tokens/s over {steps} steps ({seconds:.1f} s) after {step0} warm-up "
                f"steps; {self.dist.world_size} x {self.device}, batch {self.cfg.batch_size} x "
                f"{self.cfg.accumulation_steps} x {self.cfg.max_seq_len}")
        if self.device.type == "cuda":
            line += f", peak memory {torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GiB"
        self.log(line)


@contextlib.contextmanager
def _quiet_in_one_process():
    """torch.distributed.checkpoint warns at every save and load in one process (--fsdp 1 without torchrun),
    which is what is meant here."""
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _is_peer_failure(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, dist.DistError) or any(
        marker in text for marker in ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                                      "NCCL communicator was aborted", "Socket Timeout", "connection refused"))


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]


def main_guard(fn):
    """Run a stage's main(); a UserError (a fault the user can fix) becomes one line on stderr and exit
    status 2, anything else keeps its traceback (a bug); tears down DDP either way."""
    from minillm.errors import RunStopped
    try:
        fn()
    except RunStopped as e:  # divergence (nothing saved) or an interrupt (saved): said, not a traceback
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except UserError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the message holds
        sys.exit(2)
    except (RuntimeError, dist.DistError) as e:
        if not (dist.is_initialized() and dist.get_world_size() > 1 and _is_peer_failure(e)):
            raise
        # another process of the job died (killed, out of memory, a crash): this one cannot go on alone
        print(f"error: rank {dist.get_rank()}: another process of this run stopped ({_first_line(e)}); the last "
              f"saved checkpoint is intact: fix the cause and rerun with --from_resume 1", file=sys.stderr)
        sys.exit(1)
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
    on_demo_data: bool = False  # --data_path is the stage's demo file: demo-only extras may apply
    # TrainConfig fields set by a flag or a --config file's train section (not the stage's defaults)
    explicit: frozenset = frozenset()


def prepare_stage(description: str, defaults: dict, argv=None, extra_args: Callable | None = None,
                  default_preset: str = "demo"):
    """Parse flags, set up processes and seeds, load the tokenizer and build (or load) the model.

    With `--init_from DIR` (or a stage default) the model and its shape come from that
    checkpoint and its tokenizer is used unless --tokenizer_path says otherwise. A new model takes
    its vocabulary size from the tokenizer unless --vocab_size (or a config file) sets it, and its shape
    from `default_preset` unless --preset (or model flags) say otherwise.
    `extra_args(parser)` adds the stage's own flags; returns (Stage, args).
    """
    from minillm.checkpoint import load_checkpoint, load_config
    from minillm.config import apply_minimind_flags, build_parser, load_yaml, resolve
    from minillm.model import MiniLLM
    from minillm.tokenizer import Tokenizer

    parser = build_parser(description, defaults, default_preset=default_preset)
    common = {a.dest for a in parser._actions}
    if extra_args is not None:
        extra_args(parser)
    args = parser.parse_args(argv)
    stage_args = {a.dest: getattr(args, a.dest) for a in parser._actions if a.dest not in common}
    notes = apply_minimind_flags(args, defaults)  # --from_weight NAME -> args.init_from; --use_wandb's note
    # where the model comes from decides how the model config resolves: the flag, else a --config file's
    # train section, else the stage's default (the same order resolve() applies to the rest)
    config_train = (load_yaml(args.config).get("train") or {}) if getattr(args, "config", "") else {}
    config_train = config_train if isinstance(config_train, dict) else {}  # resolve() names a bad section
    explicit = frozenset(f.name for f in fields(TrainConfig) if f.name in vars(args) or f.name in config_train)
    if not hasattr(args, "init_from") and "init_from" in config_train:
        args.init_from = str(config_train["init_from"] or "")
    init_from = getattr(args, "init_from", defaults.get("init_from", ""))
    if init_from and not hasattr(args, "init_from") and hasattr(args, "save_dir"):  # flags absent unless given
        # the stage default names the previous stage's folder under the default save dir: follow
        # --save_dir, so `--save_dir runs/a` on every stage chains runs/a/pretrain -> runs/a/full_sft
        init_from = args.init_from = str(Path(args.save_dir) / Path(init_from).name)
    if init_from:
        try:
            base_cfg, _ = load_config(init_from)
        except FileNotFoundError as e:
            from minillm.errors import NotFound
            raise NotFound(f"{e} (this stage starts from --init_from {init_from})") from None
        model_cfg, cfg = resolve(args, defaults, base_model=base_cfg)
    else:
        model_cfg, cfg = resolve(args, defaults, default_preset=default_preset)
    dist_info = setup_distributed(cfg.device)
    for note in notes if dist_info.is_main else ():
        print(note, flush=True)
    seed_everything(cfg.seed)
    if cfg.init_from:
        model, ckpt_tok = load_checkpoint(cfg.init_from, kernel_backend=model_cfg.kernel_backend)
        tokenizer = Tokenizer.load(cfg.tokenizer_path) if cfg.tokenizer_path else ckpt_tok
    else:
        tokenizer = Tokenizer.load(cfg.tokenizer_path or None)
        from_config = load_yaml(args.config).get("model", {}) if getattr(args, "config", "") else {}
        if not hasattr(args, "vocab_size") and "vocab_size" not in from_config:
            model_cfg.vocab_size = tokenizer.vocab_size  # the tokenizer decides; --vocab_size may pad it
        model = MiniLLM(model_cfg)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        where = f"the checkpoint {cfg.init_from}" if cfg.init_from else f"--vocab_size {model_cfg.vocab_size}"
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but {where} gives the model only "
                        f"{model_cfg.vocab_size}; use a matching tokenizer or a larger vocabulary")
    if cfg.max_seq_len > model.config.max_position_embeddings:
        raise UserError(f"--max_seq_len {cfg.max_seq_len} is longer than the model's context "
                        f"(max_position_embeddings {model.config.max_position_embeddings}"
                        + (f", from {cfg.init_from}" if cfg.init_from else "")
                        + "); use a shorter --max_seq_len"
                        + ("" if cfg.init_from else " or --set max_position_embeddings=N"))
    on_demo = bool(defaults.get("data_path")) and cfg.data_path == defaults["data_path"]
    return Stage(model_cfg, cfg, dist_info, tokenizer, model, stage_args, on_demo, explicit), args


def build_on_main_first(dist_info: DistInfo, build: Callable):
    """Build a dataset on rank 0 first (it writes the caches), then on the others (they reuse them)."""
    result = None
    for main_turn in (True, False):
        if main_turn == dist_info.is_main:
            result = build()
        if dist_info.enabled:
            dist.barrier()
    return result


def load_datasets(stage: Stage, build: Callable, build_eval: Callable | None = None):
    """(training set, held-out set or None): `build(path)` on --data_path, and `build_eval(path)`
    (default: `build`; a stage passes one without training-only augmentation) on --eval_data_path,
    or a seeded --eval_split of the training rows. Rank 0 builds first, the others reuse its caches."""
    from minillm.data import holdout_split
    cfg = stage.cfg
    if cfg.eval_data_path and cfg.eval_split:
        raise UserError("give --eval_data_path or --eval_split, not both")
    from minillm.errors import require_file
    for flag, path in (("--data_path", cfg.data_path), ("--eval_data_path", cfg.eval_data_path)):
        if path:  # a UserError naming the flag, before any rank builds anything
            require_file(path, flag, "pass a jsonl file")
    dataset = build_on_main_first(stage.dist, lambda: build(cfg.data_path))
    if cfg.eval_data_path:
        return dataset, build_on_main_first(stage.dist, lambda: (build_eval or build)(cfg.eval_data_path))
    if cfg.eval_split:
        return holdout_split(dataset, cfg.eval_split, cfg.seed)
    return dataset, None
