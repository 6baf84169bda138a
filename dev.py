"""Set up this repository on a fresh machine and run a command in it, in one step (stdlib only).

    python3 dev.py demo [ARGS]    set up if needed, then train the demo model: python train_pretrain.py ARGS
    python3 dev.py test [ARGS]    set up if needed, then the test suite:      python -m pytest -q tests ARGS
    python3 dev.py run ARGS       set up if needed, then the venv's python:   python ARGS
    python3 dev.py setup          set up only

Setting up means: a virtual environment in .venv (next to this file), torch==2.13.0 in it, then
`pip install -e ".[dev]"`. Each step runs only if its result is missing, and a stamp file in .venv
(keyed on setup.py, the torch pin and this folder's path) lets a second call skip all of it after
one quick look that torch and minillm are still installed.

Environment variables:
    MINILLM_TORCH_INDEX=URL   install torch from this index (pip --index-url), e.g. PyTorch's CPU wheel
                              index as pytorch.org's install selector gives it, to get the CPU build on a
                              Linux machine where plain PyPI's torch is the multi-GB CUDA build
    MINILLM_TORCH=skip        do not install the pinned torch: keep the torch .venv already has (a CUDA
                              build you installed yourself); with none, `pip install -e .` brings torch
                              from pip's default index (on Linux from PyPI: the CUDA build)
"""
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time

TORCH_PIN = "2.13.0"
ROOT = os.path.dirname(os.path.abspath(__file__))
STAMP_NAME = ".minillm-setup.json"

COMMANDS = {
    "demo": ["train_pretrain.py"],
    "test": ["-m", "pytest", "-q"],   # "tests" is added unless a path is passed
    "run": [],
    "setup": None,
}

PROBE = r"""
import importlib.metadata as md, json, sys
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
print(json.dumps({"python": "%d.%d" % sys.version_info[:2], "pip": version("pip"),
                  "torch": version("torch"), "minillm": version("minillm")}))
"""


def say(msg):
    print("[dev.py] " + msg, flush=True)


class SetupError(Exception):
    def __init__(self, msg, code=1):
        super().__init__(msg)
        self.code = code


def venv_python(venv):
    if os.name == "nt":
        return os.path.join(venv, "Scripts", "python.exe")
    return os.path.join(venv, "bin", "python")


def torch_spec():
    """What MINILLM_TORCH asks for: 'skip', or the pin 'torch==2.13.0' when unset."""
    value = os.environ.get("MINILLM_TORCH", "").strip()
    if value.lower() == "skip":
        return "skip"
    if value:
        raise SetupError("MINILLM_TORCH=%r: the only value it takes is 'skip' (keep the torch .venv has)" % value)
    return "torch==" + TORCH_PIN


def torch_matches(installed, pin=TORCH_PIN):
    """'2.13.0+cpu' and '2.13.0' both satisfy the pin 2.13.0 (the local label names the build)."""
    return installed is not None and installed.split("+", 1)[0] == pin


def stamp_key(root, spec):
    h = hashlib.sha256()
    with open(os.path.join(root, "setup.py"), "rb") as f:
        h.update(f.read())
    h.update(b"\0" + spec.encode() + b"\0" + os.path.realpath(root).encode())
    return h.hexdigest()


def read_stamp(venv):
    try:
        with open(os.path.join(venv, STAMP_NAME)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def pytest_args(extra):
    """`tests` unless the caller names a path of their own (`dev.py test tests/test_dpo.py -x`)."""
    named = [a for a in extra if not a.startswith("-") and os.path.exists(a.split("::", 1)[0])]
    return list(extra) if named else ["tests"] + list(extra)


def check(cmd, what, env=None):
    say("$ " + " ".join(shlex.quote(c) for c in cmd))
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        raise SetupError("%s failed (exit %d); fix the cause above and run the same command again" % (what, rc), rc)


def ensurepip_missing(python_minor):
    return SetupError(
        "Python's venv cannot install pip into .venv because the module ensurepip is missing.\n"
        "On Debian/Ubuntu install it with:  sudo apt install python%s-venv   (or: python3-venv)\n"
        "then run the same command again." % python_minor)


def probe(py):
    try:
        out = subprocess.run([py, "-c", PROBE], stdout=subprocess.PIPE, universal_newlines=True)
    except OSError as e:
        out = None
        err = str(e)
    if out is None or out.returncode != 0:
        raise SetupError(".venv exists but its python does not run (%s); delete .venv and run again"
                         % (err if out is None else "exit %d" % out.returncode))
    return json.loads(out.stdout.strip().splitlines()[-1])


def setup(root):
    """Make .venv ready; return its python. Cheap (one stat and one small file read) when done already."""
    venv = os.path.join(root, ".venv")
    py = venv_python(venv)
    spec = torch_spec()
    key = stamp_key(root, spec)
    if read_stamp(venv).get("key") == key and os.path.exists(py):
        # the stamp says set-up finished for this setup.py and pin; one ~50 ms look at the installed
        # versions catches a torch or minillm removed or replaced since
        info = probe(py)
        if info["minillm"] and (spec == "skip" or torch_matches(info["torch"])):
            say("already set up (.venv: python %s, torch %s, minillm editable)" % (info["python"], info["torch"]))
            return py

    t0 = time.time()
    minor = "%d.%d" % sys.version_info[:2]
    if not os.path.exists(py):
        try:
            import ensurepip  # noqa: F401  (Debian/Ubuntu ship it in python3.X-venv)
        except ImportError:
            raise ensurepip_missing(minor)
        say("creating .venv (python %s: %s)" % (minor, sys.executable))
        rc = subprocess.call([sys.executable, "-m", "venv", venv])
        if rc != 0:
            if not os.path.exists(py):
                raise SetupError("python -m venv .venv failed (exit %d); see above" % rc, rc)
            # venv made the folder but could not install pip: handled just below

    info = probe(py)
    if info["pip"] is None:
        say("installing pip into .venv (python -m ensurepip)")
        rc = subprocess.call([py, "-m", "ensurepip", "--upgrade", "--default-pip"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        if rc != 0:
            raise ensurepip_missing(info["python"])
    pip = [py, "-m", "pip", "--disable-pip-version-check"]

    if spec == "skip":
        say("MINILLM_TORCH=skip: keeping .venv's torch (%s)"
            % (info["torch"] or "none yet: `pip install -e .` below takes torch from pip's default index"))
    elif torch_matches(info["torch"]):
        say("torch %s already installed" % info["torch"])
    else:
        index = os.environ.get("MINILLM_TORCH_INDEX", "").strip()
        if info["torch"]:
            say("replacing torch %s with %s" % (info["torch"], spec))
        if index:
            say("installing %s from MINILLM_TORCH_INDEX" % spec)
            check(pip + ["install", spec, "--index-url", index], "installing torch")
        else:
            note = ""
            if sys.platform.startswith("linux"):
                note = (" (from plain PyPI on Linux that is the CUDA build, several GB; for the CPU build"
                        " set MINILLM_TORCH_INDEX to PyTorch's CPU wheel index, see README)")
            say("installing %s with pip's own index settings%s" % (spec, note))
            check(pip + ["install", spec], "installing torch")

    say('installing minillm (pip install -e ".[dev]")')
    check(pip + ["install", "-q", "-e", ".[dev]"], 'pip install -e ".[dev]"')

    info = probe(py)
    if info["minillm"] is None:
        raise SetupError('pip install -e ".[dev]" finished but .venv has no minillm')
    if spec != "skip" and not torch_matches(info["torch"]):
        raise SetupError("after set-up .venv has torch %s, not %s" % (info["torch"], spec))
    with open(os.path.join(venv, STAMP_NAME), "w") as f:
        # key: sha256 of setup.py, the torch pin (or skip) and this folder's path
        json.dump({"key": key, "python": info["python"], "torch": info["torch"],
                   "written": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
    build = "CPU build" if "+cpu" in (info["torch"] or "") else "build as resolved by pip"
    say("set up in %.0f s (.venv: python %s, torch %s [%s], minillm editable)"
        % (time.time() - t0, info["python"], info["torch"], build))
    return py


def main(argv):
    if sys.version_info < (3, 10):
        print("dev.py: minillm needs Python >= 3.10; this is %s (%s)"
              % (sys.version.split()[0], sys.executable), file=sys.stderr)
        return 1
    if not argv or argv[0] in ("-h", "--help", "help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help", "help") else 2
    name, extra = argv[0], argv[1:]
    if name == "run" and not extra:
        print("dev.py run: give the python arguments, e.g. python3 dev.py run train_full_sft.py", file=sys.stderr)
        return 2
    os.chdir(ROOT)
    try:
        py = setup(ROOT)
    except SetupError as e:
        print("[dev.py] " + str(e), file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    if name == "setup":
        return 0

    args = COMMANDS[name] + (pytest_args(extra) if name == "test" else extra)
    env = dict(os.environ, VIRTUAL_ENV=os.path.dirname(os.path.dirname(py)))
    env["PATH"] = os.path.dirname(py) + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONHOME", None)
    cmd = [py] + args
    say("$ " + " ".join(shlex.quote(c) for c in [os.path.relpath(py, ROOT)] + args))
    sys.stdout.flush()
    if os.name == "nt":
        return subprocess.call(cmd, env=env)
    try:
        os.execve(py, cmd, env)   # the command's exit status becomes this process's
    except OSError as e:
        print("[dev.py] cannot run %s (%s); delete .venv and run again" % (py, e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
