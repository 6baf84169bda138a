"""Checkpoint folders: model.safetensors + config.yaml + tokenizer.model (+ trainer_state.pt).

Every save goes to a temporary folder that is renamed into place, so a crash mid-save
never leaves a broken checkpoint: at worst the previous one survives as `<name>.old`,
which `resolve_checkpoint` picks up.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minillm.config import ModelConfig, TrainConfig, load_yaml, save_yaml

WEIGHTS, CONFIG, TOKENIZER, STATE = "model.safetensors", "config.yaml", "tokenizer.model", "trainer_state.pt"


def model_state_dict(model, dtype: torch.dtype | None = None) -> dict:
    """Contiguous CPU tensors, the tied output head left out (it is the embedding)."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    state = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        state[name] = t.contiguous().cpu()
    return state


def save_checkpoint(folder, model, tokenizer=None, train_cfg: TrainConfig | None = None,
                    trainer_state: dict | None = None, extra: dict | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write a checkpoint folder atomically (temp folder, then rename)."""
    inner = getattr(getattr(model, "module", model), "_orig_mod", getattr(model, "module", model))
    with atomic_folder(folder) as tmp:
        save_file(model_state_dict(model, dtype), str(tmp / WEIGHTS), metadata={"format": "pt"})
        save_yaml(tmp / CONFIG, inner.config, train_cfg, extra)
        if tokenizer is not None:
            tokenizer.save(tmp)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / STATE)
    return Path(folder)


@contextlib.contextmanager
def atomic_folder(folder):
    """Yields an empty temporary folder to write into; on success it replaces `folder`.

    The old folder is first renamed to `<name>.old`, so a crash between the two renames leaves
    the previous checkpoint where `resolve_checkpoint` finds it. On an error the temp folder is
    removed and `folder` is left untouched.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(folder: Path):
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def resolve_checkpoint(folder, marker: str = WEIGHTS) -> Path:
    """The folder itself, or its `.old` twin left by a crash between the two renames.

    `marker` is the file a complete folder holds (model.safetensors; a LoRA adapter folder
    has adapter.safetensors, a resumable one trainer_state.pt)."""
    folder = Path(folder)
    if (folder / marker).is_file():
        return folder
    old = folder.with_name(folder.name + ".old")
    if (old / marker).is_file():
        return old
    raise FileNotFoundError(f"no checkpoint at {folder} (expected {folder / marker}); "
                            f"train one first or pass the right folder")


def load_config(folder) -> tuple[ModelConfig, dict]:
    folder = resolve_checkpoint(folder)
    doc = load_yaml(folder / CONFIG)
    if "model" not in doc:
        raise ValueError(f"{folder / CONFIG} has no 'model' section")
    return ModelConfig.from_dict(doc["model"], where=f"{folder / CONFIG} [model]"), doc


def load_weights(model, folder, strict: bool = True):
    folder = resolve_checkpoint(folder)
    state = load_file(str(folder / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and model.config.tie_word_embeddings)]
    if strict and (missing or unexpected):
        raise ValueError(f"{folder / WEIGHTS} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model


def load_checkpoint(folder, device="cpu", kernel_backend: str | None = None, with_tokenizer: bool = True):
    """-> (model, tokenizer): any checkpoint folder a stage script wrote."""
    from minillm.model import MiniLLM
    from minillm.tokenizer import Tokenizer

    folder = resolve_checkpoint(folder)
    cfg, _ = load_config(folder)
    if kernel_backend is not None:
        cfg.kernel_backend = kernel_backend
    model = load_weights(MiniLLM(cfg), folder).to(device)
    tok = None
    if with_tokenizer:
        tok = Tokenizer.load(folder / TOKENIZER if (folder / TOKENIZER).is_file() else None)
        if tok.vocab_size > cfg.vocab_size:
            raise ValueError(f"{folder}: tokenizer has {tok.vocab_size} ids but the model only {cfg.vocab_size}")
    return model, tok


def load_trainer_state(folder) -> dict | None:
    try:
        folder = resolve_checkpoint(folder, marker=STATE)
    except FileNotFoundError:
        resolve_checkpoint(folder)  # a checkpoint without resume state: None; no checkpoint: the error
        return None
    path = folder / STATE
    return torch.load(path, map_location="cpu", weights_only=False)
