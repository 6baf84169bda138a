"""dev.py, the two-command quickstart: it sets .venv up only where something is missing and then runs
the command in it. Checked against a stand-in .venv whose python is a shell script: it answers dev.py's
version probe from a file, logs pip calls instead of running them, and runs anything else with the
real interpreter, so nothing here creates a venv or installs a package (well under a second)."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(os.name == "nt", reason="the stand-in python is a shell script")

FAKE_PYTHON = """#!/bin/sh
here="$(dirname "$0")"
case "$2" in *importlib.metadata*) cat "$here/probe.json"; exit 0;; esac
if [ "$1 $2" = "-m pip" ]; then echo "$*" >> "$here/pip.log"; exit 0; fi
exec {real} "$@"
"""


def load_dev(root):
    spec = importlib.util.spec_from_file_location("dev_under_test", root / "dev.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def tree(tmp_path):
    """A copy of dev.py and setup.py with a stand-in .venv that has torch 2.13.0+cpu and minillm."""
    shutil.copy(REPO / "dev.py", tmp_path / "dev.py")
    shutil.copy(REPO / "setup.py", tmp_path / "setup.py")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(FAKE_PYTHON.format(real=sys.executable))
    (bin_dir / "python").chmod(0o755)
    set_installed(tmp_path, torch="2.13.0+cpu", minillm="0.1.0")
    return tmp_path


def set_installed(root, torch, minillm):
    (root / ".venv" / "bin" / "probe.json").write_text(json.dumps(
        {"python": "3.11", "pip": "24.0", "torch": torch, "minillm": minillm}))


def pip_calls(root):
    log = root / ".venv" / "bin" / "pip.log"
    return log.read_text().splitlines() if log.exists() else []


def dev(root, *args, env=None, pre=""):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MINILLM_TORCH")}
    full_env.update(env or {})
    code = pre + f"import runpy, sys; sys.argv = ['dev.py'] + {list(args)!r}; runpy.run_path('dev.py', run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=full_env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=60)


def test_torch_pin_accepts_any_build_of_the_pinned_version():
    mod = load_dev(REPO)
    assert mod.torch_matches("2.13.0+cpu") and mod.torch_matches("2.13.0") and mod.torch_matches("2.13.0+cu128")
    assert not mod.torch_matches("2.13.1") and not mod.torch_matches(None)


def test_pytest_gets_the_tests_folder_unless_a_path_is_named(tree, monkeypatch):
    mod = load_dev(tree)
    monkeypatch.chdir(REPO)
    assert mod.pytest_args(["-k", "dpo"]) == ["tests", "-k", "dpo"]
    assert mod.pytest_args(["tests/test_dpo.py::test_x", "-x"]) == ["tests/test_dpo.py::test_x", "-x"]


def test_second_run_installs_nothing_and_passes_the_exit_status_through(tree):
    first = dev(tree, "run", "-c", "print('ran first')")
    assert first.returncode == 0, first.stderr
    calls = pip_calls(tree)
    # torch already had the pinned version: only the editable install ran, then the stamp was written
    assert "torch 2.13.0+cpu already installed" in first.stdout
    assert len(calls) == 1 and "install -q -e .[dev]" in calls[0], calls
    assert "ran first" in first.stdout and (tree / ".venv" / ".minillm-setup.json").exists()

    second = dev(tree, "run", "-c", "import sys; print('ran second'); sys.exit(3)")
    assert second.returncode == 3
    assert "already set up" in second.stdout and "ran second" in second.stdout
    assert pip_calls(tree) == calls                      # nothing installed the second time

    # a changed setup.py redoes the editable install (still not torch)
    with open(tree / "setup.py", "a") as f:
        f.write("# changed\n")
    third = dev(tree, "setup")
    assert third.returncode == 0 and len(pip_calls(tree)) == 2 and "already installed" in third.stdout


def test_missing_or_other_torch_is_installed_from_the_given_index(tree):
    set_installed(tree, torch="2.5.1", minillm="0.1.0")
    # the stand-in pip installs nothing, so dev.py must notice that the pin is still not there
    out = dev(tree, "setup", env={"MINILLM_TORCH_INDEX": "file:///some/torch/index"})
    calls = pip_calls(tree)
    assert calls[0].endswith("install torch==2.13.0 --index-url file:///some/torch/index"), calls
    assert out.returncode == 1 and "not torch==2.13.0" in out.stderr
    assert not (tree / ".venv" / ".minillm-setup.json").exists()   # no stamp for a failed set-up

    kept = dev(tree, "setup", env={"MINILLM_TORCH": "skip"})
    assert kept.returncode == 0, kept.stderr
    assert "keeping .venv's torch (2.5.1)" in kept.stdout and not any("torch==" in c for c in pip_calls(tree)[1:])
    assert dev(tree, "setup", env={"MINILLM_TORCH": "cuda"}).returncode == 1


def test_missing_ensurepip_names_the_package_to_install(tmp_path):
    shutil.copy(REPO / "dev.py", tmp_path / "dev.py")
    shutil.copy(REPO / "setup.py", tmp_path / "setup.py")
    out = dev(tmp_path, "test", pre="import sys; sys.modules['ensurepip'] = None; ")
    assert out.returncode == 1
    assert "ensurepip is missing" in out.stderr and "apt install python3." in out.stderr
    assert not (tmp_path / ".venv").exists()


def test_unknown_command_prints_the_usage(tmp_path):
    shutil.copy(REPO / "dev.py", tmp_path / "dev.py")
    out = dev(tmp_path, "trian")
    assert out.returncode == 2 and "python3 dev.py demo" in out.stdout
