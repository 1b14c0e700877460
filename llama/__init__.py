"""llama-from-scratch: a readable, fast, hand-written Llama in PyTorch.

    from llama import LlamaConfig, Llama, Tokenizer, load_pretrained, generate

The names below are imported on first use, so that `import llama.cli.generate` can check a command line
before torch is loaded.
"""
import importlib

_EXPORTS = {
    "LlamaConfig": "config", "PRESETS": "config",
    "Llama": "model", "KVCache": "model",
    "Tokenizer": "tokenizer",
    "load_pretrained": "hub", "save_pretrained": "hub", "load_classifier": "tasks.classify",
    "generate": "generation", "stream": "generation",
    "Engine": "engine", "SamplingParams": "engine",
    "LlamaClassifier": "tasks.classify", "classify": "tasks.classify",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llama' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
