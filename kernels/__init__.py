"""Triton kernels for minillm, each with a torch reference.

`kernels.dispatch` is the one entry point the model uses: every op there picks the Triton
implementation on CUDA and the torch reference elsewhere (or whichever `backend` forces).
This package knows nothing of minillm.
"""
from kernels.dispatch import (  # noqa: F401
    attention,
    rms_norm,
    apply_rope,
    swiglu,
    linear_cross_entropy,
    triton_available,
)
