"""llama.cpp's GGUF files, read into our model and written from it.

Reading (`GGUFFile`, one pass with struct): the file's metadata gives the config and a byte-level BPE
tokenizer (vocabulary, merges, special tokens, chat template); the `gguf` package dequantizes each
tensor. llama.cpp permutes the rows of the q/k projections for its interleaved RoPE, and we undo that
permutation, so the weights fit our rotate-half layout under our parameter names. load_pretrained
(llama/hub.py) calls `open_gguf`.

Writing (`save_gguf`, behind `python -m llama.convert SRC out.gguf`) is the inverse, laid out as
llama.cpp's convert_hf_to_gguf.py lays out a Llama: its hyperparameter keys and tensor names, the q/k
permutation, a rope_freqs tensor for Llama-3 RoPE scaling, norms in F32 and 2-D weights in the chosen
type. The tokenizer's `tokenizer.ggml.pre` is the llama.cpp split that reproduces its own pre-tokenizer,
found by comparing the two (`gguf_pre_type`); a tokenizer no known split reproduces is refused.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import tokenizers
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from torch import Tensor
from tqdm import tqdm

from .config import LlamaConfig
from .files import atomic_file
from .model import Llama, rope_inverse_frequencies
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
        raise ValueError("reading or writing GGUF files needs the gguf package: pip install gguf") from None
    return gguf


TensorsOf = Callable[[list[Any], LlamaConfig, Path], Iterator[tuple[str, Any]]]
Opened = tuple[LlamaConfig, Tokenizer, dict[str, tuple[int, ...]], Iterator[tuple[str, Tensor]]]


def open_gguf(file: Path, tensors_of: TensorsOf | None = None) -> Opened:
    """(config, tokenizer, shape of each tensor under our names, an iterator of (our name, tensor)) of a
    llama GGUF file; the tensors are dequantized to float32 one at a time as the iterator is read.

    tensors_of(the reader's tensors, config, file), when given, makes the iterator instead, from the same
    parse of the file (llama/quant.py's gguf_tensors keeps quantized blocks as stored)."""
    gguf = _import_gguf()
    try:
        reader = GGUFFile(file)
    except Exception as e:  # a damaged file fails in many ways (struct.error, ValueError, UnicodeDecodeError, ...)
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
                weight, heads = _dequantize(gguf, tensor, file), permuted_heads(ours, config)
                yield ours, weight if heads is None else _undo_llama_cpp_permute(weight, heads)

    iterator = dequantized() if tensors_of is None else tensors_of(list(tensors.values()), config, file)
    return config, _gguf_tokenizer(gguf, metadata, file), shapes, iterator


class GGUFTensor(NamedTuple):
    """A tensor of a GGUF file, as gguf.GGUFReader gives it: `shape` in GGUF's order (columns first), `data`
    a read-only numpy view of the file (its elements, or for a block-quantized type its rows of bytes)."""
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: np.ndarray
    data: np.ndarray


class GGUFFile:
    """A GGUF file's metadata (`fields`: key -> Python value) and tensors, parsed in one pass.

    gguf.GGUFReader, which reads the same, makes a numpy view of every element of every array, and spends
    seconds on a tokenizer's 100,000 tokens and merges; this reads them with struct, in a tenth of that.
    Little-endian files only (llama.cpp writes no others).
    """

    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    _STRING, _ARRAY = 8, 9
    _ELEMENTS = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                 "I32": np.int32, "I64": np.int64}  # tensor types stored element by element; others in blocks

    def __init__(self, file: Path) -> None:
        gguf = _import_gguf()
        self.buffer = np.memmap(file, mode="r")
        if bytes(self.buffer[:4]) != b"GGUF":
            raise ValueError("GGUF magic invalid")
        self.offset = 4
        version = self._unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"version {version} (big-endian, or unknown): only little-endian versions 2 and 3 "
                             "are read")
        tensor_count, field_count = self._unpack("<Q"), self._unpack("<Q")
        self.fields: dict[str, Any] = {}
        for _ in range(field_count):
            key = self._string()
            if key in self.fields:
                raise ValueError(f"the key {key!r} comes twice")
            self.fields[key] = self._value(self._unpack("<I"))
        infos = []
        for _ in range(tensor_count):
            name = self._string()
            dims = [self._unpack("<Q") for _ in range(self._unpack("<I"))]
            infos.append((name, dims, self._unpack("<I"), self._unpack("<Q")))
        alignment = self.fields.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment is {alignment!r}, not a power of two")
        start = -(-self.offset // alignment) * alignment
        self.tensors: list[GGUFTensor] = []
        for name, dims, type_id, offset in infos:
            kind = gguf.GGMLQuantizationType(type_id)
            count, shape = math.prod(dims), tuple(reversed(dims))
            dtype = self._ELEMENTS.get(kind.name)
            if dtype is None:  # blocks of weights: rows of bytes
                block_size, type_size = gguf.GGML_QUANT_SIZES[kind]
                dtype, count, shape = np.uint8, count * type_size // block_size, gguf.quant_shape_to_byte_shape(
                    shape, kind)
            begin = start + offset
            data = self.buffer[begin:begin + count * np.dtype(dtype).itemsize].view(dtype).reshape(shape)
            self.tensors.append(GGUFTensor(name, kind, np.array(dims, dtype=np.uint64), data))
        if len({t.name for t in self.tensors}) != len(self.tensors):
            raise ValueError("a tensor name comes twice")

    def _unpack(self, fmt: str) -> Any:
        [value] = struct.unpack_from(fmt, self.buffer, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        length = self._unpack("<Q")
        end = self.offset + length
        if end > len(self.buffer):
            raise ValueError(f"a string of {length} bytes runs past the end of the file")
        text = bytes(self.buffer[self.offset:end]).decode("utf-8")
        self.offset = end
        return text

    def _value(self, kind: int) -> Any:
        if kind in self._SCALARS:
            return self._unpack(self._SCALARS[kind])
        if kind == self._STRING:
            return self._string()
        if kind != self._ARRAY:
            raise ValueError(f"unknown value type {kind}")
        item, count = self._unpack("<I"), self._unpack("<Q")
        if item == self._STRING:
            return [self._string() for _ in range(count)]
        if item in self._SCALARS:  # numbers in one read
            dtype = np.dtype(self._SCALARS[item])
            if self.offset + count * dtype.itemsize > len(self.buffer):
                raise ValueError(f"an array of {count} values runs past the end of the file")
            values = np.frombuffer(self.buffer, dtype, count, self.offset).tolist()
            self.offset += count * dtype.itemsize
            return values
        return [self._value(item) for _ in range(count)]  # arrays of arrays stay nested


class _GGUFMetadata:
    """Typed access to a GGUF file's key-value metadata, with errors that name the file and key."""

    _REQUIRED = object()

    def __init__(self, reader: GGUFFile, file: Path) -> None:
        self.fields, self.file = reader.fields, file

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        if key not in self.fields:
            if default is self._REQUIRED:
                raise ValueError(f"{self.file} lacks the metadata key {key!r}, which a llama GGUF file must have")
            return default
        return self.fields[key]


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


def permuted_heads(ours: str, config: LlamaConfig) -> int | None:
    """The heads whose rows llama.cpp interleaved in the tensor of our name `ours` (q_proj: the query heads,
    k_proj: the key/value heads); None for every other tensor."""
    if ours.endswith("self_attn.q_proj.weight"):
        return config.num_heads
    return config.num_kv_heads if ours.endswith("self_attn.k_proj.weight") else None


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


# --- writing GGUF files ------------------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file
# --dtype of a GGUF file -> (the ggml type of its 2-D weights, its general.file_type), as llama.cpp names them
GGUF_DTYPES = {"float32": ("F32", "ALL_F32"), "bfloat16": ("BF16", "MOSTLY_BF16"), "float16": ("F16", "MOSTLY_F16"),
               "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0")}
_LLAMA_CPP_NAMES = {ours: theirs for theirs, ours in GGUF_NAMES.items()}


def is_gguf_file(path: Path) -> bool:
    """Whether `path` is a file that starts with GGUF's magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def check_gguf_destination(path: str | Path, overwrite: bool = False) -> None:
    """Raise unless save_gguf may write the file `path`; callers check before the slow load.

    Its folder must exist. An existing file is replaced only with overwrite=True, and only if it is a GGUF
    file, so that a mistyped path never destroys anything else.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent} is not an existing folder; create it first, or choose another "
                                f"destination for {path.name}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; a GGUF model is one file: pass a file path such as "
                         f"{path / 'model.gguf'}")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise ValueError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it, or choose a "
                             "new file")
        if not is_gguf_file(path):
            raise ValueError(f"{path} is not a GGUF file, and --overwrite (overwrite=True) replaces only a GGUF "
                             "file; it was left as it is: choose another destination")


def save_gguf(model: Llama, tokenizer: Tokenizer, path: str | Path, dtype: str = "float32", *,
              overwrite: bool = False, name: str | None = None, progress: bool = False) -> None:
    """Write model and tokenizer to the GGUF file `path` (see check_gguf_destination), atomically.

    `dtype` (a key of GGUF_DTYPES) is the type of the 2-D weights; norms stay F32. A quantized type falls
    back to F16 for a weight whose rows are not a whole number of its blocks, as convert_hf_to_gguf.py
    does. general.name is `name`, by default the file's stem. Everything is checked before a byte is
    written, and the tensors are converted one at a time, so no second copy of the model is held.
    """
    gguf = _import_gguf()
    path = Path(path)
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(GGUF_DTYPES)} for a GGUF file, got {dtype!r}")
    check_gguf_destination(path, overwrite)
    if type(model) is not Llama:
        raise ValueError(f"a {type(model).__name__} is not a plain Llama, the only model a llama GGUF file holds; "
                         "export it in our format (--format ours) instead")
    config = model.config
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                         f"vocab_size={config.vocab_size}")
    weight_type = gguf.GGMLQuantizationType[GGUF_DTYPES[dtype][0]]
    writer = gguf.GGUFWriter(None, "llama")
    _add_hyperparameters(writer, gguf, config, name or path.stem, gguf.LlamaFileType[GGUF_DTYPES[dtype][1]])
    _add_tokenizer(writer, gguf, tokenizer, config.vocab_size)
    tensors = _llama_cpp_tensors(gguf, model, weight_type)
    sizes = [math.prod(gguf.quants.quant_shape_to_byte_shape(tensor.shape, kind)) for _, tensor, kind in tensors]
    for (tensor_name, tensor, kind), size in zip(tensors, sizes):  # the shape as stored; raw_dtype says the type
        writer.add_tensor_info(tensor_name, tensor.shape, np.dtype(np.float32), size, raw_dtype=kind)
    with atomic_file(path, sum(sizes)) as temporary:
        try:
            writer.write_header_to_file(temporary)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for tensor_name, tensor, kind in tqdm(tensors, desc=f"writing {path.name}", unit="tensor",
                                                  disable=not progress):
                tensor = _llama_cpp_layout(tensor_name, tensor, config)
                array = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
                writer.write_tensor_data(gguf.quants.quantize(array, kind))
        finally:
            writer.close()


def _add_hyperparameters(writer: Any, gguf: Any, config: LlamaConfig, name: str, file_type: Any) -> None:
    """general.* and llama.* keys, as convert_hf_to_gguf.py writes them for a Llama."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name.encode("utf-8", "replace").decode("utf-8"))  # a file name need not be UTF-8
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    if config.head_dim * config.num_heads != config.hidden_size:  # llama.cpp's default is hidden / heads
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)


def _llama_cpp_tensors(gguf: Any, model: Llama, weight_type: Any) -> list[tuple[str, Tensor, Any]]:
    """(llama.cpp's name, the tensor in our layout, its ggml type) for every tensor of the file.

    A tied lm_head is the embedding, which llama.cpp reads in place of a missing output.weight.
    """
    config = model.config
    tensors = []
    if config.rope_scaling is not None:  # Llama 3.1+: llama.cpp divides each frequency by its factor
        plain = dataclasses.replace(config, rope_scaling=None)
        tensors.append((ROPE_FREQS, rope_inverse_frequencies(plain) / rope_inverse_frequencies(config),
                        gguf.GGMLQuantizationType.F32))
    for name, weight in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        tensors.append((_llama_cpp_name(name), weight, _tensor_type(gguf, weight, weight_type)))
    return tensors


def _llama_cpp_name(name: str) -> str:
    """llama.cpp's tensor name for one of our parameter names (the inverse of _our_name)."""
    match = re.fullmatch(r"(?:layers\.(\d+)\.)?(.+)\.weight", name)
    if match is None or match[2] not in _LLAMA_CPP_NAMES:
        raise ValueError(f"the model's tensor {name} has no place in a llama GGUF file")
    block = "" if match[1] is None else f"blk.{match[1]}."
    return f"{block}{_LLAMA_CPP_NAMES[match[2]]}.weight"


def _tensor_type(gguf: Any, weight: Tensor, weight_type: Any) -> Any:
    """F32 for 1-D tensors (llama.cpp reads norms only as F32), else `weight_type`, or F16 where a row is not
    a whole number of its blocks (convert_hf_to_gguf.py's fallback)."""
    if weight.dim() < 2:
        return gguf.GGMLQuantizationType.F32
    block_size = gguf.GGML_QUANT_SIZES[weight_type][0]
    return weight_type if weight.shape[-1] % block_size == 0 else gguf.GGMLQuantizationType.F16


def _llama_cpp_layout(gguf_name: str, weight: Tensor, config: LlamaConfig) -> Tensor:
    """The tensor as llama.cpp stores it: q/k rows permuted for its RoPE, the rest as it is."""
    heads = permuted_heads(_our_name(gguf_name), config)
    return weight if heads is None else _llama_cpp_permute(weight, heads)


def _llama_cpp_permute(weight: Tensor, num_heads: int) -> Tensor:
    """convert_hf_to_gguf.py's permute (the inverse of _undo_llama_cpp_permute): each head's rows from
    rotate-half order to llama.cpp's interleaved RoPE pairs."""
    rows, rest = weight.shape[0], weight.shape[1:]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *rest).transpose(1, 2).reshape(weight.shape)


def _add_tokenizer(writer: Any, gguf: Any, tokenizer: Tokenizer, vocab_size: int) -> None:
    """tokenizer.ggml.* and tokenizer.chat_template: what _gguf_tokenizer (and llama.cpp) rebuild it from.

    Added tokens are CONTROL when special (matched in text only when asked for, like <|im_start|>) and
    USER_DEFINED otherwise (always matched whole, like <think>). Ids the tokenizer lacks up to vocab_size
    are padded as convert_hf_to_gguf.py pads them: [PAD<id>], UNUSED.
    """
    backend = tokenizer.backend
    pre = gguf_pre_type(backend)
    added = backend.get_added_tokens_decoder()
    for token in added.values():
        if token.lstrip or token.rstrip or token.single_word:
            raise ValueError(f"the tokenizer's added token {token.content!r} strips spaces or matches whole words "
                             "only, which a GGUF file cannot say; llama.cpp would split text differently")
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    tokens, types = [], []
    for token_id in range(vocab_size):
        token = backend.id_to_token(token_id)
        if token is None:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        elif token_id in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token_id].special else gguf.TokenType.USER_DEFINED)
        elif set(token) <= alphabet:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
        else:
            raise ValueError(f"the tokenizer's token {token!r} (id {token_id}) is not spelled in byte-level BPE's "
                             "alphabet; only byte-level BPE tokenizers can be written to GGUF")
    merges = json.loads(backend.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([merge if isinstance(merge, str) else " ".join(merge) for merge in merges])
    for token_id, add in ((tokenizer.bot_id, writer.add_bos_token_id), (tokenizer.eot_id, writer.add_eos_token_id),
                          (tokenizer.pad_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(tokenizer.add_bot)
    if tokenizer.chat_template is not None:
        writer.add_chat_template(tokenizer.chat_template)


def gguf_pre_type(backend: tokenizers.Tokenizer) -> str:
    """The tokenizer.ggml.pre whose llama.cpp split gives exactly this byte-level BPE's token ids.

    The test is the tokenizer's own JSON: no normalizer, a plain BPE model, and a pre-tokenizer (and
    ignore_merges flag) equal to the one _gguf_tokenizer builds for that pre type (GGUF_PRE_TOKENIZERS).
    Anything else is refused: a file that llama.cpp would tokenize differently is worse than none.
    """
    data = json.loads(backend.to_str())
    model, normalizer = data["model"], data.get("normalizer")
    if model["type"] != "BPE":
        raise ValueError(f"the tokenizer is {model['type']}, not byte-level BPE, the only kind this writes to GGUF")
    if normalizer is not None:
        raise ValueError(f"the tokenizer rewrites text first (a {normalizer['type']} normalizer), which no llama.cpp "
                         "byte-level BPE tokenizer does; it cannot be written to GGUF")
    unusual = [key for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback")
               if model.get(key)]
    if unusual:
        raise ValueError(f"the tokenizer's BPE sets {', '.join(unusual)}, which llama.cpp's BPE does not have; it "
                         "cannot be written to GGUF")
    wanted = (_ids_only(data.get("pre_tokenizer")), bool(model.get("ignore_merges")))
    for pre, (pre_tokenizer, ignore_merges) in GGUF_PRE_TOKENIZERS.items():
        probe = tokenizers.Tokenizer(models.BPE())
        probe.pre_tokenizer = pre_tokenizer()
        if (_ids_only(json.loads(probe.to_str())["pre_tokenizer"]), ignore_merges) == wanted:
            return pre
    raise ValueError(f"no llama.cpp pre-tokenizer type splits text as this tokenizer does (its pre_tokenizer is "
                     f"{json.dumps(data.get('pre_tokenizer'))[:300]}, ignore_merges={wanted[1]}); GGUF export knows "
                     f"{', '.join(GGUF_PRE_TOKENIZERS)}, and llama.cpp would tokenize it differently")


def _ids_only(node: Any) -> Any:
    """A pre-tokenizer's JSON without trim_offsets, which moves offsets but never changes an id."""
    if isinstance(node, dict):
        return {key: _ids_only(value) for key, value in node.items() if key != "trim_offsets"}
    if isinstance(node, list):
        return [_ids_only(value) for value in node]
    return node
