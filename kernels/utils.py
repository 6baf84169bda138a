"""Small helpers shared by the Triton kernels (no Triton import here)."""
import contextlib
import os

import torch

# Read once, at import: the kernels choose their configs (one small config under the
# interpreter, a few autotuned ones on a GPU) when their module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n):
    return 1 << max(int(n) - 1, 0).bit_length()


def device_guard(t):
    """Triton launches on the *current* CUDA device; make it the tensor's one (DDP, multi-GPU)."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def num_programs_for(t, rows):
    """How many persistent programs a row-loop kernel uses: a few per SM on CUDA, few on CPU."""
    if t.is_cuda:
        sms = torch.cuda.get_device_properties(t.device).multi_processor_count
        return max(1, min(rows, 4 * sms))
    return max(1, min(rows, 4))


def dot_precision(dtype):
    """fp32 inputs: full-precision dots unless the user allowed TF32 for torch matmuls too."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"
