"""minillm: train small language models end to end, from scratch, in PyTorch and Triton.

    import minillm
    cfg = minillm.ModelConfig.preset("minimind2-small")
    model = minillm.MiniLLM(cfg)
    model, tok = minillm.load_checkpoint("out/full_sft")
    for piece in minillm.generate(model, tok, "Hello!", stream=True): print(piece, end="")
"""
from minillm.config import ModelConfig, TrainConfig
from minillm.model import KVCache, MiniLLM
from minillm.tokenizer import Tokenizer
from minillm.checkpoint import load_checkpoint, save_checkpoint
from minillm.generate import SamplingParams, generate

__version__ = "0.1.0"

__all__ = ["ModelConfig", "TrainConfig", "MiniLLM", "KVCache", "Tokenizer", "load_checkpoint",
           "save_checkpoint", "SamplingParams", "generate", "__version__"]
