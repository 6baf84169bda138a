"""minillm: train small language models end to end, from scratch, in PyTorch and Triton."""
from minillm.config import ModelConfig, TrainConfig
from minillm.model import MiniLLM, KVCache

__version__ = "0.1.0"

__all__ = ["ModelConfig", "TrainConfig", "MiniLLM", "KVCache", "__version__"]
