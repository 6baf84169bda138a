"""tests/gpu/ runs the Triton kernels compiled for a real GPU, in bf16 at real shapes. The other kernel
tests run the same kernels in Triton's interpreter (TRITON_INTERPRET=1), and Triton fixes the mode of a
kernel when its module is imported, so the two cannot share a process: tests/gpu is collected only
when it is named on its own (`python -m pytest tests/gpu` on a CUDA machine)."""
import os
from pathlib import Path

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
