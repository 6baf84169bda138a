"""The kernels/ folder is importable only as `minillm.kernels`: a different package named `kernels`
(PyPI has one; transformers uses it) first on sys.path must not be picked up by minillm.

Run in a subprocess: Triton fixes interpreted vs compiled mode when it is first imported, and the
decoy must come before everything else on the path of a fresh interpreter."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

# no `import triton` here: it would fix compiled mode for this process, and the kernel tests that
# run after this file need the interpreter
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
ROOT = Path(__file__).resolve().parents[1]

DECOY = 'raise RuntimeError("the decoy top-level `kernels` package was imported")\n'

PROBE = r"""
import importlib.util
import sys
from pathlib import Path

import torch

decoy, root = (Path(p) for p in sys.argv[1:3])
# a top-level `import kernels` here would get the decoy (and raise)
assert Path(importlib.util.find_spec("kernels").origin).resolve() == decoy / "kernels" / "__init__.py"

import minillm

assert Path(minillm.__file__).resolve() == root / "minillm" / "__init__.py", minillm.__file__
assert Path(minillm.kernels.__file__).resolve() == root / "kernels" / "__init__.py", minillm.kernels.__file__

torch.manual_seed(0)
ref_model = minillm.MiniLLM(minillm.ModelConfig.preset("debug", kernel_backend="torch", num_hidden_layers=1))
model = minillm.MiniLLM(minillm.ModelConfig.preset("debug", kernel_backend="triton", num_hidden_layers=1))
model.load_state_dict(ref_model.state_dict())
input_ids = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    want, got = ref_model(input_ids), model(input_ids)
torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

# the Triton kernels ran, under their package name; nothing imported a top-level `kernels`
assert {"minillm.kernels.attention", "minillm.kernels.rmsnorm"} <= sys.modules.keys()
assert not [m for m in sys.modules if m == "kernels" or m.startswith("kernels.")]
print("ok")
"""


def test_minillm_kernels_ignores_a_top_level_kernels_package(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text(DECOY)
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path.resolve()), str(ROOT)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "ok"
