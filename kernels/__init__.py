"""Triton kernels for minillm, each with a torch reference.

`kernels.dispatch` is the one entry point the model uses: every op there (attention, rms_norm,
apply_rope, swiglu, linear_cross_entropy) picks the Triton implementation on CUDA and the torch
reference elsewhere (or whichever `backend` forces). The ops are not re-exported here: the
submodules `kernels.attention` and `kernels.swiglu` share their names, and importing a submodule
rebinds the package attribute. Importing `kernels` compiles and autotunes nothing.
This package knows nothing of minillm.
"""
from kernels import dispatch  # noqa: F401
from kernels.dispatch import triton_available  # noqa: F401
