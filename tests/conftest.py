"""tests/gpu/ runs the Triton kernels compiled for a real GPU, in bf16 at real shapes. The other kernel
tests run the same kernels in Triton's interpreter (TRITON_INTERPRET=1), and Triton fixes the mode of a
kernel when its module is imported, so the two cannot share a process: tests/gpu is collected only
when it is named on its own (`python -m pytest tests/gpu` on a CUDA machine)."""
import importlib.util
import os
from pathlib import Path

import pytest

# the export/import tests use transformers, PEFT and tokenizers on folders they write themselves:
# never reach for a hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GPU_DIR = Path(__file__).resolve().parent / "gpu"


def pytest_ignore_collect(collection_path, config):
    if Path(collection_path).resolve() != GPU_DIR:
        return None
    asked = [Path(str(a).split("::")[0]).resolve() for a in config.args]
    return not all(p == GPU_DIR or GPU_DIR in p.parents for p in asked)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first few hundred documents of the demo corpus, in a folder of its own (its token cache lands
    there): the small pretraining data of the trainer and lose-nothing tests."""
    path = tmp_path_factory.mktemp("corpus") / "pretrain.jsonl"
    root = Path(__file__).resolve().parents[1]
    lines = (root / "dataset/demo/pretrain.jsonl").read_text(encoding="utf-8").splitlines()[:300]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class Crash(Exception):
    """Raised by `crash_after_save`: a run killed right after a save."""


def crash_after_save(monkeypatch, step: int, run):
    """Run `run()` with Trainer.save patched to raise Crash right after the save of `step` (the process
    dies there, its checkpoint intact), then put save back: the resume tests' way of killing a run."""
    from minillm.trainer import Trainer
    original_save = Trainer.save

    def save_then_crash(self):
        original_save(self)
        if self.step == step:
            raise Crash

    monkeypatch.setattr(Trainer, "save", save_then_crash)
    try:
        with pytest.raises(Crash):
            run()
    finally:
        monkeypatch.setattr(Trainer, "save", original_save)


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts folder is not a package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
