"""llama-from-scratch: a readable, fast, hand-written Llama in PyTorch."""
from .config import PRESETS, LlamaConfig
from .model import KVCache, Llama
from .tokenizer import Tokenizer

__all__ = ["LlamaConfig", "PRESETS", "Llama", "KVCache", "Tokenizer"]
