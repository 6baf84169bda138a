"""A run's folder, kept safe: one writer at a time, no finished run replaced by accident, older
checkpoints kept for a fallback, and the leftovers of killed runs cleaned up.

    out/full_sft/                  the latest checkpoint (what eval_model.py and the next stage read)
    out/full_sft.history/step_*/   the last --keep_last checkpoints, hard links into the saved files
    out/.full_sft.lock             held (flock) by the run writing out/full_sft; it dies with the process
    out/logs/full_sft/             TensorBoard

The lock is an OS file lock, so a `kill -9` never leaves a stale one: the kernel drops it with the
process. The pid written in the file only serves the message of a second run that finds it held.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from minillm.errors import UserError

HISTORY_SUFFIX = ".history"


class RunLock:
    """An exclusive, non-blocking lock on `<save_dir>/.<name>.lock` for this process's lifetime."""

    def __init__(self, run_dir: Path):
        self.path = run_dir.with_name(f".{run_dir.name}.lock")
        self.fd = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # no flock (Windows): nothing to hold, nothing to refuse
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            folder = self.path.with_name(self.path.name[1:].removesuffix(".lock"))
            raise UserError(f"another run (pid {holder}) is writing to {folder}; wait for it to finish, stop it, "
                            f"or pick another --save_weight / --save_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def has_checkpoint(run_dir: Path) -> bool:
    """A finished or resumable run lives there (a full checkpoint, a LoRA adapter or resume state)."""
    return any((run_dir / f).is_file() for f in ("model.safetensors", "adapter.safetensors", "trainer_state.pt"))


def history_dir(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + HISTORY_SUFFIX)


def refuse_to_replace(run_dir: Path) -> None:
    raise UserError(f"{run_dir} already holds a run; to continue it pass --from_resume 1, to replace it (and its "
                    f"checkpoint history and TensorBoard logs) pass --overwrite 1, or keep it and pass another "
                    f"--save_dir / --save_weight")


def clear_previous_run(run_dir: Path, log_dir: Path) -> None:
    """--overwrite 1: the old history and curves go now; the old checkpoint itself stays until the
    new run's first save replaces it (atomically), so a new run that fails early loses nothing more."""
    shutil.rmtree(history_dir(run_dir), ignore_errors=True)
    shutil.rmtree(log_dir, ignore_errors=True)


def remove_stale_temp_folders(run_dir: Path) -> list[Path]:
    """Temporary save folders (`<name>.tmp<pid>`) of killed runs. Called while holding the run's lock,
    so no live run is writing them."""
    stale = [p for p in run_dir.parent.glob(run_dir.name + ".tmp*") if p.is_dir()]
    stale += [p for p in history_dir(run_dir).glob("*.tmp*") if p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a checkpoint folder as hard links (no extra space; files are never rewritten in place,
    a save always writes a new folder), falling back to a copy where links are not possible."""
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(src, tmp, copy_function=os.link)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)  # the same step saved again (after a fallback): the new one wins
    os.replace(tmp, dst)


def record_history(run_dir: Path, step: int, keep_last: int) -> None:
    """Keep the checkpoint just saved as history/step_N and prune to the newest `keep_last`."""
    if keep_last <= 0:
        return
    history = history_dir(run_dir)
    history.mkdir(parents=True, exist_ok=True)
    _link_tree(run_dir, history / f"step_{step:08d}")
    for old in history_checkpoints(run_dir)[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)


def history_checkpoints(run_dir: Path) -> list[Path]:
    """The kept checkpoints, newest first."""
    return sorted((p for p in history_dir(run_dir).glob("step_*") if p.is_dir() and ".tmp" not in p.name),
                  reverse=True)
