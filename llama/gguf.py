"""llama.cpp's GGUF files read into our model: config, tokenizer and dequantized weights.

The file's metadata gives the config and a byte-level BPE tokenizer (vocabulary, merges, special
tokens, chat template); the `gguf` package dequantizes each tensor. llama.cpp permutes the rows of the
q/k projections for its interleaved RoPE, and we undo that permutation, so the weights fit our
rotate-half layout under our parameter names. load_pretrained (llama/hub.py) calls `open_gguf`.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tokenizers
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from torch import Tensor

from .config import LlamaConfig
from .model import rope_inverse_frequencies
from .tokenizer import Tokenizer

# --- GGUF files ------------------------------------------------------------------------------------

# llama.cpp's tensor names, without "blk.N." and ".weight", and ours, without "layers.N." and ".weight".
GGUF_NAMES = {
    "token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1+ files: the factor each RoPE frequency is divided by

# How llama.cpp splits text before byte-level BPE, by tokenizer.ggml.pre (see its llama-vocab.cpp).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gpt2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's own regex


def _smollm_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """GPT-2's split after cutting every digit apart, as SmolLM's own tokenizer.json does."""
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])


def _llama3_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# tokenizer.ggml.pre -> (pre-tokenizer, whether a word already in the vocabulary skips the merges).
GGUF_PRE_TOKENIZERS = {
    "gpt-2": (_gpt2_pre_tokenizer, False),
    "smollm": (_smollm_pre_tokenizer, False),
    **{name: (_llama3_pre_tokenizer, True) for name in ("llama-bpe", "llama3", "llama-v3", "falcon3")},
}


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise ValueError("reading GGUF files needs the gguf package: pip install gguf") from None
    return gguf


def open_gguf(file: Path) -> tuple[LlamaConfig, Tokenizer, dict[str, tuple[int, ...]], Iterator[tuple[str, Tensor]]]:
    """(config, tokenizer, shape of each tensor under our names, an iterator of (our name, tensor)) of a
    llama GGUF file; the tensors are dequantized to float32 one at a time as the iterator is read."""
    gguf = _import_gguf()
    try:
        reader = gguf.GGUFReader(file)
    except Exception as e:  # the reader fails in many ways (ValueError, IndexError, ...) on a damaged file
        raise ValueError(f"{file} is not a valid GGUF file (truncated or corrupt: {e})") from None
    metadata = _GGUFMetadata(reader, file)
    architecture = metadata.get("general.architecture")
    if architecture != "llama":
        raise ValueError(f"{file} holds a {architecture!r} model; only 'llama' GGUF files can be loaded")
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    config = _config_from_gguf(gguf, metadata, tensors, file)
    shapes = {_our_name(name): tuple(int(n) for n in reversed(tensor.shape))
              for name, tensor in tensors.items() if name != ROPE_FREQS}

    def dequantized() -> Iterator[tuple[str, Tensor]]:
        for name, tensor in tensors.items():
            if name != ROPE_FREQS:
                ours = _our_name(name)
                weight = _dequantize(gguf, tensor, file)
                if ours.endswith("self_attn.q_proj.weight"):
                    weight = _undo_llama_cpp_permute(weight, config.num_heads)
                elif ours.endswith("self_attn.k_proj.weight"):
                    weight = _undo_llama_cpp_permute(weight, config.num_kv_heads)
                yield ours, weight

    return config, _gguf_tokenizer(gguf, metadata, file), shapes, dequantized()


class _GGUFMetadata:
    """Typed access to a GGUF file's key-value metadata, with errors that name the file and key."""

    _REQUIRED = object()

    def __init__(self, reader: Any, file: Path) -> None:
        self.fields, self.file = reader.fields, file

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        field = self.fields.get(key)
        if field is None:
            if default is self._REQUIRED:
                raise ValueError(f"{self.file} lacks the metadata key {key!r}, which a llama GGUF file must have")
            return default
        return field.contents()


def _config_from_gguf(gguf: Any, metadata: _GGUFMetadata, tensors: dict[str, Any], file: Path) -> LlamaConfig:
    hidden_size, num_heads = metadata.get("llama.embedding_length"), metadata.get("llama.attention.head_count")
    head_dim = metadata.get("llama.attention.key_length", hidden_size // num_heads)
    rotated = metadata.get("llama.rope.dimension_count", head_dim)
    if rotated != head_dim:
        raise ValueError(f"{file}: RoPE rotates {rotated} of the {head_dim} head dimensions; only full rotation "
                         "is supported")
    scaling_type = metadata.get("llama.rope.scaling.type", "none")
    if scaling_type != "none":
        raise ValueError(f"{file}: RoPE scaling type {scaling_type!r} is not supported; only Llama-3 scaling "
                         f"(a {ROPE_FREQS} tensor) is")
    try:
        config = LlamaConfig(
            vocab_size=len(metadata.get("tokenizer.ggml.tokens")), hidden_size=hidden_size,
            intermediate_size=metadata.get("llama.feed_forward_length"),
            num_layers=metadata.get("llama.block_count"), num_heads=num_heads,
            num_kv_heads=metadata.get("llama.attention.head_count_kv", num_heads), head_dim=head_dim,
            max_seq_len=metadata.get("llama.context_length"),
            rope_theta=metadata.get("llama.rope.freq_base", 10000.0),
            rms_norm_eps=metadata.get("llama.attention.layer_norm_rms_epsilon"),
            tie_word_embeddings="output.weight" not in tensors)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    if ROPE_FREQS in tensors:
        rope_freqs = _dequantize(gguf, tensors[ROPE_FREQS], file)
        config = dataclasses.replace(config, rope_scaling=_llama3_scaling(rope_freqs, config, file))
    return config


def _llama3_scaling(rope_freqs: Tensor, config: LlamaConfig, file: Path) -> dict[str, float]:
    """Llama-3 rope_scaling that reproduces llama.cpp's rope_freqs tensor, which keeps only the result.

    Try the parameters every Llama 3.1-3.3 release uses, with the factor read off the slowest
    frequencies, and check that they give exactly this tensor.
    """
    scaling = dict(factor=float(rope_freqs.max()), low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    plain = rope_inverse_frequencies(config)
    scaled = rope_inverse_frequencies(dataclasses.replace(config, rope_scaling=scaling))
    if rope_freqs.shape != plain.shape or not torch.allclose(plain / scaled, rope_freqs, rtol=1e-4):
        raise ValueError(f"{file}: {ROPE_FREQS} is not Llama-3 RoPE scaling with {scaling}; other RoPE "
                         "scalings are not supported")
    return scaling


def _our_name(gguf_name: str) -> str:
    """Our parameter name for a llama.cpp tensor name; unknown names come back unchanged (and get reported)."""
    match = re.fullmatch(r"(?:blk\.(\d+)\.)?(\w+)\.weight", gguf_name)
    if match is None or match[2] not in GGUF_NAMES:
        return gguf_name
    block = "" if match[1] is None else f"layers.{match[1]}."
    return f"{block}{GGUF_NAMES[match[2]]}.weight"


def _dequantize(gguf: Any, tensor: Any, file: Path) -> Tensor:
    """A float32 tensor [rows, columns] from any tensor type the gguf package can dequantize."""
    try:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ValueError(f"{file}: tensor {tensor.name} is {tensor.tensor_type.name}, which the installed gguf "
                         "package cannot dequantize; upgrading gguf may help") from None
    return torch.from_numpy(array if array.flags.writeable else array.copy())  # F32 is a view of the file


def _undo_llama_cpp_permute(weight: Tensor, num_heads: int) -> Tensor:
    """Inverse of convert_hf_to_gguf.py's permute, which interleaves the two RoPE halves of each head's rows."""
    rows, rest = weight.shape[0], weight.shape[1:]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *rest).transpose(1, 2).reshape(weight.shape)


def _gguf_tokenizer(gguf: Any, metadata: _GGUFMetadata, file: Path) -> Tokenizer:
    """The byte-level BPE tokenizer that a GGUF file's tokenizer.ggml.* metadata describes."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{file}: tokenizer.ggml.model is {kind!r}; only 'gpt2' (byte-level BPE) tokenizers can "
                         "be rebuilt from GGUF metadata. Load the model's Hugging Face folder instead")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"{file}: tokenizer.ggml.pre is {pre!r}, which this loader cannot split text for; "
                         f"known: {', '.join(GGUF_PRE_TOKENIZERS)}")
    pre_tokenizer, ignore_merges = GGUF_PRE_TOKENIZERS[pre]
    tokens = metadata.get("tokenizer.ggml.tokens")
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges")]
    backend = tokenizers.Tokenizer(models.BPE({token: i for i, token in enumerate(tokens)}, merges,
                                              ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>) are special; user-defined ones (<think>) are matched whole but decoded.
    token_types = metadata.get("tokenizer.ggml.token_type", [])
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token, token_type
                                in zip(tokens, token_types) if token_type == gguf.TokenType.CONTROL])
    backend.add_tokens([AddedToken(token, special=False, normalized=False) for token, token_type
                        in zip(tokens, token_types) if token_type == gguf.TokenType.USER_DEFINED])

    def token(key: str) -> str | None:
        token_id = metadata.get(key, None)
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise ValueError(f"{file}: {key}={token_id} is outside the vocabulary of {len(tokens)} tokens")
        return None if token_id is None else tokens[token_id]

    return Tokenizer(backend, bot_token=token("tokenizer.ggml.bos_token_id"),
                     eot_token=token("tokenizer.ggml.eos_token_id"), pad_token=token("tokenizer.ggml.padding_token_id"),
                     chat_template=metadata.get("tokenizer.chat_template", None),
                     add_bot=bool(metadata.get("tokenizer.ggml.add_bos_token", True)))
