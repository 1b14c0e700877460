"""Tests for GGUF export: llama.gguf.save_gguf and `python -m llama.convert SRC out.gguf`.

transformers is the independent reference: it reads the files written here with its own GGUF code
(metadata, dequantization, the undoing of llama.cpp's q/k permutation, the tokenizer), and its logits and
token ids must equal ours. Our own reader must read the files back to the same model and tokenizer.
"""
import copy
import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers

from llama import Llama, LlamaConfig, Tokenizer
from llama.convert import main as convert
from llama.gguf import LLAMA3_SPLIT, gguf_pre_type, save_gguf
from llama.hub import ACCEPTED, load_pretrained, save_pretrained
from llama.tokenizer import SPECIAL_TOKENS
from test_hub import llama_cpp_rope_freqs  # the converter's loop, restated once

transformers = pytest.importorskip("transformers", reason="the reference implementation needs `pip install -e .[test]`")
gguf = pytest.importorskip("gguf", reason="GGUF tests need `pip install -e .[test]`")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# Accents, CJK, emoji (with a skin-tone modifier), digits after runs of spaces, tabs and newlines, the
# added tokens of the tokenizer below, and a special token's spelling.
TEXT = ("Ça coûte 12,50 € — naïve café déjà vu.\n\n日本の首都は東京です。한국어 😀👍🏽🇫🇷\n"
        "  3 spaces\t\ttabs 2024-05-17 x=1234567\r\n<|im_start|>user\nhi<think>why?</think> [EOT] [BOT]")
CORPUS = [TEXT, "The quick brown fox jumps over the lazy dog. It's 9 o'clock; we'll see 100 dogs.",
          "Die Straße ist schön, über alles. 東京タワー 🗼 and 😀 again"] * 30
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
DTYPES = ["float32", "float16", "bfloat16", "q8_0", "q4_0"]
WEIGHT_TYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}
LLAMA3_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


# --- a tiny model and tokenizer --------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run many times faster on one thread than on two busy cores (see conftest's tiny_chat)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_tokenizer(pre_tokenizer=None, ignore_merges: bool = False) -> Tokenizer:
    """A byte-level BPE like Tokenizer.train's (or with another pre-tokenizer), plus a special added token
    (<|im_start|>: CONTROL in GGUF) and a plain one (<think>: USER_DEFINED), and a chat template."""
    backend = tokenizers.Tokenizer(models.BPE(ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.add_special_tokens([AddedToken("<|im_start|>", special=True, normalized=False)])
    backend.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    return Tokenizer(backend, chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer()


# tied: the tiny preset (GQA 4/2 heads; ffn_down's rows of 176 are not whole 32-blocks: the F16 fallback).
# untied: head_dim 32 != 64 / 4 (llama.key_length), and 3 ids the tokenizer lacks ([PAD<id>], UNUSED).
VARIANTS = {"tied": dict(), "untied": dict(tie_word_embeddings=False, head_dim=32, intermediate_size=128, extra=3)}


def tiny_model(tokenizer: Tokenizer, variant: str, **overrides) -> Llama:
    settings = {**VARIANTS[variant], **overrides}
    extra = settings.pop("extra", 0)
    torch.manual_seed(0)
    return Llama(LlamaConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size + extra, **settings)).eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tokenizer, tmp_path_factory) -> tuple[Llama, dict[str, Path]]:
    """A tiny model and its GGUF file in every dtype, all in one folder."""
    model = tiny_model(tokenizer, request.param)
    folder = tmp_path_factory.mktemp(f"gguf-{request.param}")
    for dtype in DTYPES:
        save_gguf(model, tokenizer, folder / f"{dtype}.gguf", dtype)
    return model, {dtype: folder / f"{dtype}.gguf" for dtype in DTYPES}


def expected_type(weight: torch.Tensor, dtype: str) -> str:
    """The ggml type llama.cpp's converter gives a tensor: F32 for 1-D ones, else the dtype's type, or F16
    for a weight whose rows are not a whole number of the type's blocks."""
    if weight.dim() == 1:
        return "F32"
    kind = WEIGHT_TYPES[dtype]
    return kind if weight.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][0] == 0 else "F16"


def rounded(model: Llama, dtype: str) -> Llama:
    """A copy of `model` whose weights went through the file's types and back: what the file holds."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in model.parameters():
            kind = gguf.GGMLQuantizationType[expected_type(parameter, dtype)]
            back = gguf.quants.dequantize(gguf.quants.quantize(parameter.numpy(), kind), kind)
            parameter.copy_(torch.from_numpy(back.reshape(parameter.shape)))
    return model


def read_transformers(file: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name,
                                                             dtype=torch.float32).eval()


@torch.no_grad()
def max_logit_difference(ours: Llama, reference, ids: torch.Tensor) -> float:
    return (ours(ids) - reference(ids).logits).abs().max().item()


def random_ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))


# --- transformers reads what we write ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_transformers_logits_match(exported, dtype):
    """transformers' model from our file computes our logits: at float32 the original model's, and in the
    other types those of our model with its weights rounded as the file rounds them. Both are float32
    computations over the same weights, which agree exactly here; 1e-5 leaves room for another summation
    order. The rounding itself moves these logits by ~2e-4 (f16) to ~0.1 (q4_0), far above that, so a
    tensor stored in the wrong type, layout or permutation fails."""
    model, files = exported
    reference = model if dtype == "float32" else rounded(model, dtype)
    theirs = read_transformers(files[dtype])
    assert theirs.config.tie_word_embeddings == model.config.tie_word_embeddings
    assert max_logit_difference(reference, theirs, random_ids(model.config.vocab_size)) <= 1e-5
    if dtype != "float32":  # the rounding is real: the full-precision model is measurably elsewhere
        assert max_logit_difference(model, theirs, random_ids(model.config.vocab_size)) > 1e-5


def test_transformers_tokenizer_matches(exported, tokenizer):
    model, files = exported
    theirs = transformers.AutoTokenizer.from_pretrained(files["float32"].parent, gguf_file=files["float32"].name)
    ours = tokenizer.encode(TEXT, allow_special=True)  # transformers matches special tokens in text
    assert theirs(TEXT, add_special_tokens=False)["input_ids"] == ours
    assert theirs(TEXT)["input_ids"] == [tokenizer.bot_id] + ours  # add_bos_token
    assert tokenizer.token_to_id("<|im_start|>") in ours and tokenizer.token_to_id("<think>") in ours
    assert (theirs.bos_token, theirs.eos_token, theirs.pad_token) == ("[BOT]", "[EOT]", "[PAD]")
    assert theirs.chat_template == CHAT_TEMPLATE


# --- our reader reads it back --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_our_reader_reads_it_back_bit_identically(exported, tokenizer, dtype):
    model, files = exported
    loaded, loaded_tokenizer = load_pretrained(files[dtype])
    # GGUF stores the epsilon as a float32
    assert loaded.config == dataclasses.replace(model.config, rms_norm_eps=float(np.float32(model.config.rms_norm_eps)))
    expected = dict(model.named_parameters())
    assert list(dict(loaded.named_parameters())) == list(expected)  # a tied lm_head is listed once either way
    for name, parameter in loaded.named_parameters():
        assert torch.equal(parameter, expected[name] if dtype == "float32" else expected[name].half().float()), name
    assert loaded_tokenizer.encode_batch([TEXT, *CORPUS[:3]], allow_special=True) == tokenizer.encode_batch(
        [TEXT, *CORPUS[:3]], allow_special=True)
    assert loaded_tokenizer.encode(TEXT) == tokenizer.encode(TEXT)
    for role in ("bot_token", "eot_token", "pad_token", "chat_template", "add_bot"):
        assert getattr(loaded_tokenizer, role) == getattr(tokenizer, role)
    if model.config.vocab_size == tokenizer.vocab_size:  # no padding ids: the very same tokenizer
        assert tokenizer_json(loaded_tokenizer) == tokenizer_json(tokenizer)


def tokenizer_json(tokenizer: Tokenizer) -> dict:
    """The backend's JSON, with the added tokens in the BPE vocabulary, where GGUF keeps every token."""
    data = json.loads(tokenizer.backend.to_str())
    data["model"]["vocab"] = tokenizer.backend.get_vocab(with_added_tokens=True)
    return data


# --- the file's layout -----------------------------------------------------------------------------

def test_layout_is_llama_cpps(exported):
    """llama.cpp's tensor names and types, with output.weight only when untied, and its header keys."""
    model, files = exported
    config = model.config
    untied = not config.tie_word_embeddings
    ours = dict(model.named_parameters())
    names = {"token_embd": "embed_tokens", "output_norm": "norm", **({"output": "lm_head"} if untied else {}),
             **{f"blk.{i}.{theirs}": f"layers.{i}.{mine}" for i in range(config.num_layers) for theirs, mine in (
                 ("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
                 ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                 ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                 ("ffn_down", "mlp.down_proj"))}}
    for dtype, file in files.items():
        reader = gguf.GGUFReader(file)
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types == {f"{name}.weight": expected_type(ours[f"{mine}.weight"], dtype)
                         for name, mine in names.items()}
        assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType[
            {"float32": "ALL_F32"}.get(dtype, f"MOSTLY_{WEIGHT_TYPES[dtype]}")]
        assert (reader.fields["general.architecture"].contents(), reader.fields["general.name"].contents()) == (
            "llama", dtype)
        if dtype == "q4_0":  # spelled out: the F16 fallback (rows of 176), and output.weight only when untied
            assert types["blk.0.ffn_down.weight"] == ("F16" if config.intermediate_size % 32 else "Q4_0")
            assert ("output.weight" in types) == untied
    header = gguf.GGUFReader(files["float32"]).fields
    field = lambda key: header[key].contents()  # noqa: E731
    expected = {"context_length": config.max_seq_len, "embedding_length": config.hidden_size,
                "block_count": config.num_layers, "feed_forward_length": config.intermediate_size,
                "attention.head_count": config.num_heads, "attention.head_count_kv": config.num_kv_heads,
                "rope.dimension_count": config.head_dim, "vocab_size": config.vocab_size,
                "rope.freq_base": config.rope_theta,
                "attention.layer_norm_rms_epsilon": float(np.float32(config.rms_norm_eps))}
    if config.head_dim * config.num_heads != config.hidden_size:
        expected.update({"attention.key_length": config.head_dim, "attention.value_length": config.head_dim})
    assert {key.removeprefix("llama."): field(key) for key in header if key.startswith("llama.")} == expected
    tokens, token_types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert (len(tokens), field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")) == (
        config.vocab_size, "gpt2", "gpt-2")
    kinds = {token: gguf.TokenType(kind).name for token, kind in zip(tokens, token_types)}
    assert [kinds[t] for t in ("[PAD]", "[EOT]", "<|im_start|>", "<think>", "Ġthe")] == [
        "CONTROL", "CONTROL", "CONTROL", "USER_DEFINED", "NORMAL"]
    padding = [token for token, kind in kinds.items() if kind == "UNUSED"]
    assert padding == [f"[PAD{i}]" for i in range(len(tokens) - len(padding), len(tokens))]
    assert len(padding) == (3 if untied else 0)


def test_llama3_rope_scaling_is_a_rope_freqs_tensor(tokenizer, tmp_path):
    """As convert_hf_to_gguf.py writes it (its loop, restated in test_hub), and read back to the same scaling."""
    model = tiny_model(tokenizer, "untied", rope_scaling=LLAMA3_SCALING, rope_theta=5e5)
    save_gguf(model, tokenizer, tmp_path / "llama3.gguf")
    stored = next(t for t in gguf.GGUFReader(tmp_path / "llama3.gguf").tensors if t.name == "rope_freqs.weight")
    dim, s = model.config.head_dim, LLAMA3_SCALING
    factors = llama_cpp_rope_freqs(5e5, dim, s).tolist()
    assert stored.tensor_type.name == "F32"
    assert 1.0 in factors and s["factor"] in factors and len(set(factors)) > 2  # all three bands are there
    assert torch.allclose(torch.from_numpy(stored.data.copy()), torch.tensor(factors), rtol=1e-6, atol=0)
    loaded, _ = load_pretrained(tmp_path / "llama3.gguf")
    assert loaded.config.rope_scaling == LLAMA3_SCALING
    with torch.no_grad():
        ids = random_ids(model.config.vocab_size)
        assert torch.allclose(loaded(ids), model(ids), atol=1e-5, rtol=0)


# --- tokenizer.ggml.pre --------------------------------------------------------------------------------

def llama3_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


@pytest.mark.parametrize("pre_tokenizer, ignore_merges, pre", [
    (pre_tokenizers.ByteLevel(add_prefix_space=False), False, "gpt-2"),
    (pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False), False, "gpt-2"),  # offsets only
    (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                              pre_tokenizers.ByteLevel(add_prefix_space=False)]), False, "smollm"),
    (llama3_split(), True, "llama-bpe"),
], ids=["gpt-2", "gpt-2 without trim_offsets", "smollm", "llama-bpe"])
def test_pre_type_is_the_split_that_reproduces_the_tokenizer(tmp_path, pre_tokenizer, ignore_merges, pre):
    """Each known split is found, and the file's tokenizer gives our ids in our reader and in transformers
    (for "smollm" only once SmolLM's digit split is put back: see test_smollm2_exports)."""
    tokenizer = train_tokenizer(pre_tokenizer, ignore_merges)
    assert gguf_pre_type(tokenizer.backend) == pre
    torch.manual_seed(0)
    save_gguf(Llama(LlamaConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size)), tokenizer,
              tmp_path / "model.gguf")
    ours = tokenizer.encode_batch([TEXT, *CORPUS[:3]], allow_special=True)
    assert load_pretrained(tmp_path / "model.gguf")[1].encode_batch([TEXT, *CORPUS[:3]], allow_special=True) == ours
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    if pre == "smollm":
        theirs.backend_tokenizer.pre_tokenizer = pre_tokenizer
    assert [theirs(text, add_special_tokens=False)["input_ids"] for text in [TEXT, *CORPUS[:3]]] == ours


@pytest.mark.parametrize("change, message", [
    (lambda b: setattr(b, "pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=True)),
     'no llama.cpp pre-tokenizer type splits text as this tokenizer does (its pre_tokenizer is {"type": '
     '"ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}, ignore_merges=False); GGUF '
     'export knows gpt-2, smollm, llama-bpe, llama3, llama-v3, falcon3, and llama.cpp would tokenize it differently'),
    (lambda b: setattr(b, "pre_tokenizer", llama3_split()),  # Llama-3's split, but without ignore_merges
     "ignore_merges=False); GGUF export knows"),
    (lambda b: setattr(b, "normalizer", tokenizers.normalizers.NFC()),
     "the tokenizer rewrites text first (a NFC normalizer), which no llama.cpp byte-level BPE tokenizer does; it "
     "cannot be written to GGUF"),
    (lambda b: b.add_special_tokens([AddedToken("<|x|>", lstrip=True)]),
     "the tokenizer's added token '<|x|>' strips spaces or matches whole words only, which a GGUF file cannot say; "
     "llama.cpp would split text differently"),
], ids=["prefix space", "llama3 split without ignore_merges", "normalizer", "lstrip"])
def test_a_tokenizer_llama_cpp_would_split_otherwise_is_refused(tmp_path, change, message):
    tokenizer = train_tokenizer()
    change(tokenizer.backend)
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size))
    with pytest.raises(ValueError) as error:
        save_gguf(model, tokenizer, tmp_path / "model.gguf")
    assert message in str(error.value) and "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left


# --- the command line ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ours_folder(tokenizer, tmp_path_factory) -> tuple[Path, Llama]:
    """The tied tiny model saved in our format."""
    model = tiny_model(tokenizer, "tied")
    folder = tmp_path_factory.mktemp("cli") / "ours"
    save_pretrained(model, tokenizer, folder, format="ours")
    return folder, model


def test_convert_writes_gguf(ours_folder, tmp_path, capsys):
    folder, model = ours_folder
    dst = tmp_path / "tiny.gguf"
    assert convert([str(folder), str(dst), "--dtype", "q8_0"]) == 0
    assert capsys.readouterr().out == (f"wrote {dst}: gguf format, {model.num_params():,} parameters in q8_0, from "
                                       f"ours {folder}\n")
    reader = gguf.GGUFReader(dst)
    assert reader.fields["general.name"].contents() == "ours"
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert convert([str(dst), str(dst), "--dtype", "float16", "--overwrite"]) == 0  # GGUF in, GGUF over it
    assert gguf.GGUFReader(dst).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    assert convert([str(folder), str(tmp_path / "model"), "--format", "gguf"]) == 0  # any name, with --format
    assert gguf.GGUFReader(tmp_path / "model").fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "tiny.gguf"]  # no temporary file left


def refused(args: list[str], capsys) -> str:
    assert convert(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


def test_convert_refuses_bad_destinations(ours_folder, tmp_path, capsys):
    """Each in one line, before the model is loaded (the missing source shows it: the destination is
    judged first), and with every file as it was."""
    folder, _ = ours_folder
    existing = tmp_path / "notes.gguf"
    existing.write_text("my notes")
    (tmp_path / "dir.gguf").mkdir()
    before = {p.name: p.read_bytes() if p.is_file() else None for p in tmp_path.iterdir()}
    missing = tmp_path / "missing"
    cases = {
        (str(folder), str(existing), "--overwrite"): f"{existing} is not a GGUF file, and --overwrite "
        "(overwrite=True) replaces only a GGUF file; it was left as it is: choose another destination",
        (str(missing), str(existing)): f"{existing} already exists; pass --overwrite (overwrite=True) to replace it, "
        "or choose a new file",
        (str(folder), str(tmp_path / "out"), "--dtype", "q4_0"): "--dtype q4_0 is a GGUF quantization: it needs a "
        ".gguf destination (or --format gguf); a model folder holds float32, bfloat16, float16",
        (str(folder), str(tmp_path / "out"), "--dtype", "q8_0", "--format", "hf"): "--dtype q8_0 is a GGUF "
        "quantization: it needs a .gguf destination (or --format gguf); a hf folder holds float32, bfloat16, float16",
        (str(missing), str(tmp_path / "out.gguf")): f"{missing} does not exist; {ACCEPTED}",
        (str(folder), str(tmp_path / "no" / "out.gguf")): f"{tmp_path / 'no'} is not an existing folder; create it "
        "first, or choose another destination for out.gguf",
        (str(missing), str(tmp_path / "dir.gguf"), "--overwrite"): f"{tmp_path / 'dir.gguf'} is a folder; a GGUF "
        f"model is one file: pass a file path such as {tmp_path / 'dir.gguf' / 'model.gguf'}",
        (str(folder), str(tmp_path / "x.gguf"), "--format", "ours"): f"--format ours writes a folder, but "
        f"{tmp_path / 'x.gguf'} names a .gguf file; leave out --format to write GGUF, or choose a folder name",
        (str(missing), os.fsdecode(bytes(tmp_path / "caf") + b"\xe9.gguf")): f"the destination "
        f"{tmp_path}/caf\\xe9.gguf is not valid UTF-8; choose a name spelt in UTF-8",
    }
    for args, message in cases.items():
        assert refused(list(args), capsys) == f"error: {message}\n", args
    assert {p.name: p.read_bytes() if p.is_file() else None for p in tmp_path.iterdir()} == before


def test_a_failed_write_leaves_the_previous_file(ours_folder, tokenizer, tmp_path, monkeypatch):
    """A write that fails half-way (here the third tensor) leaves the old file whole and no temporary one."""
    _, model = ours_folder
    dst = tmp_path / "model.gguf"
    save_gguf(model, tokenizer, dst)
    before = dst.read_bytes()
    calls, quantize = [], gguf.quants.quantize

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return quantize(*args)

    monkeypatch.setattr(gguf.quants, "quantize", failing)
    with pytest.raises(OSError, match=f"no space left in {re.escape(str(tmp_path))} to write model.gguf"):
        save_gguf(model, tokenizer, dst, "q8_0", overwrite=True)
    assert dst.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


# --- SmolLM2 -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_exports(tmp_path, capsys):
    """The bundled SmolLM2-135M-Instruct (Q4_1) through `convert smollm2 out.gguf` at float16 and q8_0.

    Logits: transformers from our file against our model with the file's rounding, within 1e-5 as for the
    tiny model (they agree exactly here; the rounding itself moves them by ~1). Tokenizer: the file says
    "smollm", llama.cpp's name for SmolLM's split (every digit apart, then GPT-2's). transformers has no
    split for "smollm" (integrations/gguf/gguf_tokenizer_mapping.py: GGUF_PRE_TOKENIZER_SPLITS) and falls
    back to GPT-2's, which differs only where 2+ whitespace characters precede a digit; with the digit
    split put back, its vocabulary, merges and added tokens give our ids on every text.
    """
    from llama.hub import bundled_smollm2

    try:
        bundled_smollm2()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    model, tokenizer = load_pretrained("smollm2")
    ids = torch.tensor([tokenizer.encode(TEXT, allow_special=True)[:64]])
    text = TEXT + "<|im_end|>\nSteps:\n\n1. mix  2 eggs"
    for dtype in ("float16", "q8_0"):
        dst = tmp_path / f"smollm2-{dtype}.gguf"
        assert convert(["smollm2", str(dst), "--dtype", dtype]) == 0
        assert capsys.readouterr().out.startswith(f"wrote {dst}: gguf format, 134,515,008 parameters in {dtype}")
        theirs = read_transformers(dst)
        assert max_logit_difference(rounded(model, dtype), theirs, ids) <= 1e-5
        del theirs
        reader = gguf.GGUFReader(dst)
        assert (reader.fields["tokenizer.ggml.pre"].contents(), "output.weight" in {t.name for t in reader.tensors}
                ) == ("smollm", False)
        assert load_pretrained(dst)[1].encode(text, allow_special=True) == tokenizer.encode(text, allow_special=True)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="smollm2-q8_0.gguf")
    plain = TEXT.replace("\n  3", "\n3")
    assert re.search(r"\s\s\d", plain) is None and re.search(r"\s\s\d", text)  # a whitespace run before a digit
    assert reference(plain, add_special_tokens=False)["input_ids"] == tokenizer.encode(plain, allow_special=True)
    assert reference(text, add_special_tokens=False)["input_ids"] != tokenizer.encode(text, allow_special=True)
    reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    assert reference(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text, allow_special=True)
    assert reference.chat_template == tokenizer.chat_template
