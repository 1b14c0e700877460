"""llama-from-scratch: a readable, fast, hand-written Llama in PyTorch."""
from .classify import LlamaClassifier, classify, load_classifier
from .config import PRESETS, LlamaConfig
from .generation import generate, stream
from .hub import load_pretrained, save_pretrained
from .model import KVCache, Llama
from .tokenizer import Tokenizer

__all__ = ["LlamaConfig", "PRESETS", "Llama", "KVCache", "Tokenizer", "load_pretrained", "save_pretrained",
           "generate", "stream", "LlamaClassifier", "classify", "load_classifier"]
