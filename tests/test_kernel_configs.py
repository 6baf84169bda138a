"""The GPU block-size tables (kernels/attention.py, kernels/moe.py) hold invariants the kernels
rely on and nothing checks at run time: the causal loop split needs the outer block to be a
multiple of the inner one, and the autotune pruner must hand each head dim its own class. The
tables exist only when Triton compiles for a GPU, so they are read in a subprocess with
TRITON_INTERPRET unset (importing compiles nothing and needs no GPU)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# no `import triton` here: Triton fixes interpreted vs compiled mode for the whole process when it is
# first imported, and the kernel tests that run after this file need the interpreter
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json
import minillm.kernels.attention as A
import minillm.kernels.moe as M

def rows(tuner, **launch):
    picked = tuner.early_config_prune(tuner.configs, {}, **launch) if tuner.early_config_prune else tuner.configs
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in picked]

out = {}
for block_d in (32, 64, 128):
    out[f"fwd{block_d}"] = rows(A._attn_fwd, BLOCK_D=block_d)
    out[f"dkdv{block_d}"] = rows(A._attn_bwd_dkdv, BLOCK_D=block_d)
    out[f"dq{block_d}"] = rows(A._attn_bwd_dq, BLOCK_D=block_d)
out["all_fwd"] = len(A._attn_fwd.configs)
out["moe"] = rows(M._grouped_mm_kernel) + rows(M._grouped_wgrad_kernel)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def tables():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_causal_split_invariant_holds_for_every_config(tables):
    for block_d in (32, 64, 128):
        for cfg in tables[f"fwd{block_d}"] + tables[f"dq{block_d}"]:  # query-block programs
            assert cfg["BLOCK_M"] % cfg["BLOCK_N"] == 0, cfg
        for cfg in tables[f"dkdv{block_d}"]:  # key-block programs
            assert cfg["BLOCK_N"] % cfg["BLOCK_M"] == 0, cfg


def test_pruner_gives_each_head_dim_class_its_own_configs(tables):
    assert tables["fwd32"] == tables["fwd64"]
    assert tables["fwd64"] != tables["fwd128"] and tables["dkdv64"] != tables["dkdv128"]
    assert tables["all_fwd"] >= len(tables["fwd128"]) > 1
    # head dim 96/128: the 4-warp 128x64 forward spilled registers at sm_90a; it must not be offered
    assert {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3} not in [
        {k: c[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")} for c in tables["fwd128"]]
    assert all(c["num_warps"] == 8 for c in tables["dkdv128"])


def test_configs_use_warpgroups(tables):
    """Hopper's wgmma is issued per 4-warp group: every GPU config uses 4 or 8 warps."""
    every = [c for k, v in tables.items() if isinstance(v, list) for c in v]
    assert every and all(c["num_warps"] in (4, 8) for c in every)
