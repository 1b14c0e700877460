"""Logit parity with transformers' LlamaForCausalLM, an independent implementation, on the same weights."""
import pytest
import torch

from llama import Llama, LlamaConfig

transformers = pytest.importorskip("transformers", reason="the reference implementation needs `pip install -e .[test]`")

LLAMA3_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)

CONFIGS = {
    "tied, MHA (GQA ratio 1)": dict(num_heads=4, num_kv_heads=4, tie_word_embeddings=True),
    "untied, GQA ratio 3": dict(num_heads=6, num_kv_heads=2, hidden_size=96, tie_word_embeddings=False),
    "GQA ratio 4, theta 1e5": dict(num_heads=8, num_kv_heads=2, rope_theta=1e5),
    "head_dim 24 != hidden/heads": dict(num_heads=6, num_kv_heads=2, hidden_size=96, head_dim=24,
                                        tie_word_embeddings=False),
    "Llama-3 rope scaling, untied": dict(num_heads=8, num_kv_heads=2, head_dim=16, rope_theta=5e5,
                                         rope_scaling=LLAMA3_SCALING, tie_word_embeddings=False),
}


def hf_config(c: LlamaConfig) -> "transformers.LlamaConfig":
    rope_scaling = dict(rope_type="llama3", **c.rope_scaling) if c.rope_scaling else None
    return transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rope_theta=c.rope_theta,
        rope_scaling=rope_scaling, rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
        attn_implementation="eager")


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
@torch.no_grad()
def test_logits_match_transformers(overrides):
    config = LlamaConfig(**{**dict(vocab_size=384, hidden_size=64, intermediate_size=176, num_layers=3,
                                   max_seq_len=256), **overrides})
    torch.manual_seed(0)
    ours = Llama(config).eval()
    reference = transformers.LlamaForCausalLM(hf_config(config)).eval()
    weights = {("model." + name if not name.startswith("lm_head") else name): tensor
               for name, tensor in ours.state_dict().items()}
    missing, unexpected = reference.load_state_dict(weights, strict=False)
    assert not unexpected and all("rotary" in name for name in missing)
    ids = torch.randint(0, config.vocab_size, (2, 200), generator=torch.Generator().manual_seed(1))
    difference = (ours(ids) - reference(ids).logits).abs().max().item()
    assert difference <= 1e-5
