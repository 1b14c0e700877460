"""LlamaConfig: every number that defines a Llama-family decoder, with presets, validation and JSON."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclasses.dataclass
class LlamaConfig:
    vocab_size: int = 50000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: int = 3
    head_dim: int | None = None  # None means hidden_size // num_heads
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    # Llama-3 style frequency scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}, or None for plain RoPE.
    rope_scaling: dict[str, float] | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"LlamaConfig.num_heads={self.num_heads} does not divide hidden_size={self.hidden_size}; "
                    "change one of them or set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_heads
        elif not isinstance(self.head_dim, int) or self.head_dim < 1:
            raise ValueError(f"LlamaConfig.head_dim must be a positive integer or None, got {self.head_dim!r}")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim={self.head_dim} must be even: RoPE rotates pairs of dimensions")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig.num_kv_heads={self.num_kv_heads} does not divide num_heads={self.num_heads}; "
                "grouped-query attention needs a whole number of query heads per KV head")
        for name in ("rope_theta", "rms_norm_eps", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive number, got {value!r}")
        if self.rope_scaling is not None:
            keys = set(self.rope_scaling) - {"rope_type"}
            if keys != set(ROPE_SCALING_KEYS):
                raise ValueError(
                    f"LlamaConfig.rope_scaling has keys {sorted(keys)}; expected exactly {list(ROPE_SCALING_KEYS)}")
            if self.rope_scaling["low_freq_factor"] >= self.rope_scaling["high_freq_factor"]:
                raise ValueError("LlamaConfig.rope_scaling: low_freq_factor must be below high_freq_factor")
            self.rope_scaling = {k: self.rope_scaling[k] for k in ROPE_SCALING_KEYS}

    @property
    def num_kv_groups(self) -> int:
        """How many query heads share each KV head."""
        return self.num_heads // self.num_kv_heads

    def residual_init_std(self) -> float:
        """Std for projections that write into the residual stream, scaled so its variance stays put."""
        return self.init_std / math.sqrt(2 * self.num_layers)

    # --- presets and JSON ---------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LlamaConfig:
        """A named preset (see PRESETS), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LlamaConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LlamaConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LlamaConfig:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data)


PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: well under 1M parameters, still with GQA (2 query heads per KV head).
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
                 num_kv_heads=2, max_seq_len=256, tie_word_embeddings=True),
    # CPU experiments: about 13M parameters with an 8K vocabulary.
    "small": dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6,
                  num_kv_heads=2, max_seq_len=512, tie_word_embeddings=True),
    # GPT-2-small-sized Llama, about 129M parameters: the GPU pretraining workhorse.
    "125m": dict(vocab_size=32768, hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12,
                 num_kv_heads=4, max_seq_len=2048, tie_word_embeddings=True),
    # The config of the Llama fine-tuning article this project grew from (docs/finetuning.md).
    "article": dict(vocab_size=50000, hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12,
                    num_kv_heads=3, max_seq_len=2048, rope_theta=10000.0, tie_word_embeddings=False),
    # HuggingFaceTB/SmolLM2-135M(-Instruct).
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                         num_heads=9, num_kv_heads=3, max_seq_len=8192, rope_theta=100000.0,
                         tie_word_embeddings=True, init_std=0.041666666666666664),
    # meta-llama/Llama-3.2-1B.
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                         num_heads=32, num_kv_heads=8, head_dim=64, max_seq_len=131072, rope_theta=500000.0,
                         rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192),
                         tie_word_embeddings=True),
}
