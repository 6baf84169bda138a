"""minillm: train small language models end to end, from scratch, in PyTorch and Triton.

    import minillm
    cfg = minillm.ModelConfig.preset("minimind2-small")
    model = minillm.MiniLLM(cfg)
    model, tok = minillm.load_checkpoint("out/full_sft")
    for piece in minillm.generate(model, tok, "Hello!", stream=True): print(piece, end="")
"""


def _load_kernels_from_checkout():
    """Make `minillm.kernels` the checkout's top-level kernels/ folder when minillm runs from a
    source checkout (editable install, or none: `python train_pretrain.py` in the repo).

    setup.py installs kernels/ as the subpackage minillm.kernels (package_dir); there is no
    top-level `kernels` (that name is another PyPI package), and no sys.path entry is added here.
    Installed with `pip install .`, minillm/kernels/ is a real subpackage and the plain import
    below finds it; this does nothing then. In a checkout it loads the kernels/ beside this
    package, so the model never mixes with the kernels of another install.
    """
    import importlib.util
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    init = here.parent / "kernels" / "__init__.py"
    if ("minillm.kernels" in sys.modules or (here / "kernels").exists()
            or not (init.is_file() and (here.parent / "setup.py").is_file())):
        return
    spec = importlib.util.spec_from_file_location("minillm.kernels", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # before running it, as the import system does: its relative imports need it
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise


_load_kernels_from_checkout()

from minillm import kernels  # noqa: E402  (installed subpackage, or the checkout's kernels/ loaded above)
from minillm.config import ModelConfig, TrainConfig  # noqa: E402
from minillm.model import KVCache, MiniLLM  # noqa: E402
from minillm.tokenizer import Tokenizer  # noqa: E402
from minillm.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from minillm.generate import SamplingParams, generate  # noqa: E402

__version__ = "0.1.0"

__all__ = ["ModelConfig", "TrainConfig", "MiniLLM", "KVCache", "Tokenizer", "load_checkpoint",
           "save_checkpoint", "SamplingParams", "generate", "__version__"]
