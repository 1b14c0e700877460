import json

import pytest

from llama import PRESETS, Llama, LlamaConfig


def test_presets_build_with_the_sizes_they_promise():
    sizes = {name: Llama(LlamaConfig.from_preset(name)).num_params() for name in ("tiny", "small", "125m")}
    assert sizes["tiny"] < 1_000_000
    assert 10_000_000 <= sizes["small"] <= 30_000_000
    assert 110_000_000 <= sizes["125m"] <= 140_000_000


def test_article_preset_is_the_articles_config():
    c = LlamaConfig.from_preset("article")
    assert (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.intermediate_size,
            c.max_seq_len, c.rope_theta, c.tie_word_embeddings) == (50000, 768, 12, 12, 3, 3072, 2048, 1e4, False)


def test_real_model_presets():
    smol = LlamaConfig.from_preset("smollm2-135m")
    assert (smol.num_layers, smol.num_heads, smol.num_kv_heads, smol.head_dim, smol.rope_theta) == (30, 9, 3, 64, 1e5)
    llama = LlamaConfig.from_preset("llama-3.2-1b")
    assert llama.rope_scaling["factor"] == 32.0 and llama.head_dim == 64 and llama.num_kv_groups == 4
    assert set(PRESETS) >= {"tiny", "small", "125m", "article", "smollm2-135m", "llama-3.2-1b"}


def test_json_round_trip(tmp_path):
    c = LlamaConfig.from_preset("llama-3.2-1b", max_seq_len=4096)
    c.save(tmp_path / "config.json")
    assert LlamaConfig.load(tmp_path / "config.json") == c
    assert json.loads((tmp_path / "config.json").read_text())["head_dim"] == 64


def test_head_dim_defaults_to_hidden_over_heads():
    assert LlamaConfig(hidden_size=96, num_heads=6, num_kv_heads=2).head_dim == 16
    assert LlamaConfig(hidden_size=96, num_heads=6, num_kv_heads=2, head_dim=32).head_dim == 32


@pytest.mark.parametrize("fields, message", [
    (dict(hidden_size=100, num_heads=12, num_kv_heads=3),
     "LlamaConfig.num_heads=12 does not divide hidden_size=100; change one of them or set head_dim explicitly"),
    (dict(num_heads=12, num_kv_heads=5),
     "LlamaConfig.num_kv_heads=5 does not divide num_heads=12; grouped-query attention needs a whole number"),
    (dict(vocab_size=0), "LlamaConfig.vocab_size must be a positive integer, got 0"),
    (dict(num_layers=2.5), "LlamaConfig.num_layers must be a positive integer, got 2.5"),
    (dict(head_dim=33), "LlamaConfig.head_dim=33 must be even: RoPE rotates pairs of dimensions"),
    (dict(rope_theta=-1.0), "LlamaConfig.rope_theta must be a positive number, got -1.0"),
    (dict(rope_scaling={"factor": 8.0}), "LlamaConfig.rope_scaling has keys ['factor']; expected exactly"),
])
def test_inconsistent_config_names_the_field(fields, message):
    with pytest.raises(ValueError) as error:
        LlamaConfig(**fields)
    assert str(error.value).startswith(message)


def test_unknown_preset_and_fields_are_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"unknown preset 'huge'; choose one of tiny, small, 125m"):
        LlamaConfig.from_preset("huge")
    (tmp_path / "bad.json").write_text('{"hidden": 64}')
    with pytest.raises(ValueError, match=r"unknown LlamaConfig fields \['hidden'\]"):
        LlamaConfig.load(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text('{"hidden_size": ')
    with pytest.raises(ValueError, match=r"broken.json is not valid JSON"):
        LlamaConfig.load(tmp_path / "broken.json")
