"""Triton kernels for minillm, each with a torch reference.

Installed and imported as `minillm.kernels` (setup.py maps this folder there; minillm/__init__.py
does the same in a source checkout), never as a top-level `kernels`, which is another PyPI package.
Imports inside this package are relative, so it works under whatever name it is given.

`dispatch` is the one entry point the model uses: every op there (attention, rms_norm,
apply_rope, swiglu, linear_cross_entropy) picks the Triton implementation on CUDA and the torch
reference elsewhere (or whichever `backend` forces). The ops are not re-exported here: the
submodules `attention` and `swiglu` share their names, and importing a submodule rebinds the
package attribute. Importing this package compiles and autotunes nothing.
This package knows nothing of minillm.
"""
from . import dispatch  # noqa: F401
from .dispatch import triton_available  # noqa: F401
