"""Checkpoint folders: model.safetensors + config.yaml + tokenizer.model (+ trainer_state.pt, + dcp/).

Every save goes to a temporary folder that is renamed into place, so a crash mid-save
never leaves a broken checkpoint: at worst the previous one survives as `<name>.old`,
which `resolve_checkpoint` picks up.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from minillm.config import ModelConfig, TrainConfig, load_yaml, save_yaml
from minillm.errors import NotFound, UserError

WEIGHTS, CONFIG, TOKENIZER, STATE = "model.safetensors", "config.yaml", "tokenizer.model", "trainer_state.pt"
SHARDED = "dcp"  # --fsdp 1: the sharded model and optimizer state (torch.distributed.checkpoint), any world size


def model_state_dict(model, dtype: torch.dtype | None = None, weights: dict | None = None) -> dict:
    """Contiguous CPU tensors, the tied output head left out (it is the embedding). `weights`: the
    model's full state dict gathered elsewhere (a sharded model's, see Trainer.save) instead of its own."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    state = {}
    for name, t in (weights if weights is not None else model.state_dict()).items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        state[name] = t.contiguous().cpu()
    return state


def save_checkpoint(folder, model, tokenizer=None, train_cfg: TrainConfig | None = None,
                    trainer_state: dict | None = None, extra: dict | None = None,
                    dtype: torch.dtype | None = None, weights: dict | None = None,
                    write_more: Callable[[Path], None] | None = None) -> Path:
    """Write a checkpoint folder atomically (temp folder, then rename). `weights`: the full state dict
    to write instead of `model.state_dict()`; `write_more(tmp)` adds files (a sharded checkpoint) to the
    temp folder before it is renamed into place."""
    inner = getattr(getattr(model, "module", model), "_orig_mod", getattr(model, "module", model))
    with atomic_folder(folder) as tmp:
        if write_more is not None:
            write_more(tmp)
        save_file(model_state_dict(model, dtype, weights), str(tmp / WEIGHTS), metadata={"format": "pt"})
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
        if f.is_dir():  # a sharded checkpoint's dcp/ folder
            _fsync_dir(f)
            continue
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
    if folder.is_file():
        raise NotFound(f"{folder} is a file, not a checkpoint folder; pass the folder that holds {marker}")
    raise NotFound(f"no checkpoint at {folder} (expected {folder / marker}); "
                   f"train one first or pass the right folder")


def load_config(folder) -> tuple[ModelConfig, dict]:
    """(ModelConfig, the config.yaml doc) of a checkpoint; a transformers folder or a MiniMind .pth
    is read by minillm.hf (its config.json mapped, unsupported features refused by name)."""
    from minillm import hf
    if hf.import_source(folder) is not None:
        return hf.load_config(folder)
    folder = resolve_checkpoint(folder)
    doc = load_yaml(folder / CONFIG)
    if "model" not in doc:
        raise UserError(f"{folder / CONFIG} has no 'model' section; it was not written by minillm, or was edited")
    return ModelConfig.from_dict(doc["model"], where=f"{folder / CONFIG} [model]"), doc


def read_safetensors(path) -> dict:
    """The tensors of a .safetensors file; a UserError naming the file when it is truncated or corrupt."""
    from safetensors import SafetensorError
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} cannot be read as safetensors ({' '.join(str(e).split())}): the file is "
                        f"truncated or corrupt (an interrupted copy or save?); copy it again or pick another "
                        f"checkpoint") from None


def load_weights(model, folder, strict: bool = True):
    """Load folder/model.safetensors into `model`; a UserError naming the file when it is corrupt or its
    tensors do not fit the model's shapes (e.g. a config.yaml edited after the save). A transformers
    folder or a MiniMind .pth loads through minillm.hf, always strictly."""
    from minillm import hf
    source = hf.import_source(folder)
    if source is not None:
        state = hf.to_minillm_state(hf.read_weights(source), model.config, str(source[1]))
        return hf.load_state_into(model, state, str(source[1]))
    folder = resolve_checkpoint(folder)
    path = folder / WEIGHTS
    state = read_safetensors(path)
    expected = model.state_dict()
    wrong = [f"{name} is {list(t.shape)} in the file but {list(expected[name].shape)} in the model"
             for name, t in state.items() if name in expected and expected[name].shape != t.shape]
    if wrong:
        raise UserError(f"{path} does not fit the model: {len(wrong)} tensors have other shapes, e.g. "
                        f"{'; '.join(wrong[:2])}; the weights were saved from a model of another shape than its "
                        f"config describes (was {folder / CONFIG} edited?): restore it or pick another checkpoint")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # what the shape check above did not foresee
        raise UserError(f"{path} does not fit the model: {' '.join(str(e).split())[:500]}") from None
    missing = [m for m in missing if not (m == "lm_head.weight" and model.config.tie_word_embeddings)]
    if strict and (missing or unexpected):
        raise UserError(f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                        f"the weights and config.yaml come from different models")
    return model


def load_checkpoint(folder, device="cpu", kernel_backend: str | None = None, with_tokenizer: bool = True):
    """-> (model, tokenizer): any checkpoint folder a stage script wrote, a transformers folder
    (config.json + safetensors) of a supported architecture, or a MiniMind state dict file (.pth)."""
    from minillm import hf
    from minillm.model import MiniLLM
    from minillm.tokenizer import Tokenizer

    if hf.import_source(folder) is not None:
        model = hf.load_model(folder, device, kernel_backend)
        tok = hf.load_tokenizer(folder) if with_tokenizer else None
        if tok is not None and tok.vocab_size > model.config.vocab_size:
            raise UserError(f"{folder}: tokenizer has {tok.vocab_size} ids but the model only "
                            f"{model.config.vocab_size}; the tokenizer belongs to another model")
        return model, tok
    folder = resolve_checkpoint(folder)
    cfg, _ = load_config(folder)
    if kernel_backend is not None:
        cfg.kernel_backend = kernel_backend
    model = load_weights(MiniLLM(cfg), folder).to(device)
    tok = None
    if with_tokenizer:
        has_tok = (folder / TOKENIZER).is_file() or (folder / "tokenizer.json").is_file()
        tok = Tokenizer.load(folder if has_tok else None)  # tokenizer.json (an imported model's) or .model
        if tok.vocab_size > cfg.vocab_size:
            raise UserError(f"{folder}: tokenizer has {tok.vocab_size} ids but the model only {cfg.vocab_size}; "
                            f"its {TOKENIZER} belongs to another model")
    return model, tok


def load_trainer_state(folder) -> dict | None:
    try:
        folder = resolve_checkpoint(folder, marker=STATE)
    except FileNotFoundError:
        resolve_checkpoint(folder)  # a checkpoint without resume state: None; no checkpoint: the error
        return None
    path = folder / STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        raise UserError(f"{path} cannot be read ({' '.join(str(e).split())[:200]}): the file is truncated or "
                        f"corrupt; start without --from_resume, or restore the folder") from None
