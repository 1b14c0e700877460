
import random
import re

import pytest
import torch

import llama.generation as generation
from llama import Llama, LlamaConfig, Tokenizer
from llama.generation import (
    _compiled_decode,
    apply_repetition_penalty,
    draw,
    generate,
    generate_tokens,
    sample_next,
    split_at_stop,
    stream,
    top_k_filter,
    top_p_filter,
)

EMOJI_CJK = "Hello 👩‍👩‍👧‍👦 world 🚀🔥! 東京は日本の首都です。北京欢迎你 👍🏽 done."


@pytest.fixture(scope="module")
def tokenizer():
    lines = [f"The {a} {b} jumps over the lazy dog number {i}." for i, (a, b) in
             enumerate(zip(["quick", "slow", "red", "tiny"] * 50, ["fox", "cat", "bird", "whale"] * 50))]
    return Tokenizer.train(lines + ["Once upon a time, there was a little robot."] * 20, vocab_size=400)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return Llama(LlamaConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size)).eval()


def greedy_without_cache(model, ids, steps):
    """The article's method: re-run the whole sequence for every new token."""
    ids = list(ids)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids


@torch.no_grad()
def test_greedy_with_cache_equals_greedy_without_cache(model):
    prompt = [1, 50, 60, 70, 80]
    ours = [int(t) for t in generate_tokens(model, [prompt], max_tokens=40, temperature=0)]
    assert prompt + ours == greedy_without_cache(model, prompt, 40)


@torch.no_grad()
def test_greedy_matches_the_articles_generate(model, article_llama):
    c = model.config
    theirs = article_llama.LlamaForPretraining(article_llama.LlamaConfig(
        vocab_size=c.vocab_size, max_position_embeddings=c.max_seq_len, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads))
    theirs.load_state_dict({("base_model." + k if k != "lm_head.weight" else k): v
                            for k, v in model.state_dict().items()}, strict=False)
    prompt = [1, 50, 60, 70]
    # top_k=1 leaves one candidate, so the article's multinomial sampling is its greedy decoding
    expected = article_llama.generate_ids(theirs, prompt, max_tokens=30, temperature=1.0, top_k=1)
    assert [int(t) for t in generate_tokens(model, [prompt], max_tokens=30, temperature=0)] == expected


class FixedLogits(torch.nn.Module):
    """A stand-in model that always predicts the same logits, for comparing samplers draw by draw."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids):
        return self.logits.expand(1, input_ids.shape[1], -1).clone()


CRAFTED = torch.tensor([2.0, -1.0, 0.5, 3.0, 0.0, -2.5, 1.5, 2.9, -0.3, 1.0])


def test_repetition_penalty_matches_the_articles_function(article_llama):
    recent = [3, 1, 4, 3, 5, 0]  # 3 twice: penalized twice, as the article's loop does
    expected = article_llama.apply_repetition_penalty(CRAFTED.clone(), recent, 1.7)
    assert torch.equal(apply_repetition_penalty(CRAFTED[None], torch.tensor([recent]), 1.7)[0], expected)
    assert apply_repetition_penalty(CRAFTED[None], torch.tensor([[3, 3]]), 2.0)[0, 3] == 3.0 / 4
    assert apply_repetition_penalty(CRAFTED[None], torch.tensor([[5]]), 2.0)[0, 5] == -5.0
    untouched = apply_repetition_penalty(CRAFTED[None], torch.tensor([[-1, -1]]), 2.0)  # -1: no token yet
    assert torch.equal(untouched[0], CRAFTED)


@pytest.mark.parametrize("temperature, top_k, penalty", [(1.0, 3, 1.0), (0.7, 5, 1.3), (1.5, 0, 1.0), (0.9, 10, 1.1)])
def test_sampling_draws_match_the_articles_generate(temperature, top_k, penalty, article_llama, monkeypatch):
    """The article's temperature, top-k and repetition penalty, draw by draw. Its torch.multinomial draws
    one random number per token, ours one per row (draw): the article's loop runs here with its
    multinomial drawing as ours does, from the same uniform numbers, so the distributions must agree."""
    def multinomial(probs, num_samples):
        assert num_samples == 1
        return draw(probs[None], torch.rand(1, 1, dtype=torch.float64))

    fake = FixedLogits(CRAFTED)
    for seed in range(20):
        torch.manual_seed(seed)
        with monkeypatch.context() as patch:
            patch.setattr(torch, "multinomial", multinomial)
            expected = article_llama.generate_ids(fake, [0], max_tokens=8, temperature=temperature, top_k=top_k,
                                                  repetition_penalty=penalty, repetition_penalty_range=3)
        torch.manual_seed(seed)
        ours: list[int] = []
        for _ in range(8):
            recent = torch.tensor([ours[-3:]], dtype=torch.long)
            ours.append(int(sample_next(CRAFTED[None], recent, temperature=temperature,
                                        top_k=top_k, repetition_penalty=penalty)))
        assert ours == expected


def test_draw_takes_each_index_with_its_share_and_never_a_zero():
    """draw against its definition: frequencies within 4 standard errors of the shares (any total), no
    zero entry ever, and a uniform number at the very top of [0, 1) (rounding up to the total) takes the
    last positive entry, not the zeros after it."""
    probs = torch.tensor([[0.0, 2.0, 0.0, 1.0, 0.5, 0.0, 0.5, 0.0, 0.0]])
    uniform = torch.rand(40000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    draws = draw(probs.expand(40000, -1), uniform)
    share = probs[0] / probs.sum()
    frequencies = torch.bincount(draws, minlength=9) / 40000
    assert torch.all((frequencies - share).abs() <= 4 * (share * (1 - share) / 40000).sqrt() + 1e-12)
    assert frequencies[share == 0].sum() == 0
    assert draw(probs, torch.tensor([[1.0]], dtype=torch.float64)).tolist() == [6]
    assert draw(probs, torch.tensor([[0.0]], dtype=torch.float64)).tolist() == [1]
    assert draw(torch.tensor([[0.0, 0.0, 1e-30, 0.0]]), torch.tensor([[0.999]], dtype=torch.float64)).tolist() == [2]


def test_top_p_sorts_the_whole_row_only_where_the_first_64_fall_short():
    """top_p_filter's shortcut (the 64 most likely tokens, where they reach p) keeps what sorting every
    token keeps, on peaked and flat rows alike."""
    def by_sorting(logits, p):
        ranked, order = logits.softmax(-1).sort(dim=-1, descending=True)
        drop_ranked = ranked.cumsum(-1) - ranked >= p
        return logits.masked_fill(drop_ranked.scatter(1, order, drop_ranked), float("-inf"))

    generator = torch.Generator().manual_seed(0)
    for scale in (0.5, 3.0, 12.0):  # flat: the whole row sorted; peaked: the shortcut
        logits = torch.randn(6, 5000, generator=generator) * scale
        for p in (0.3, 0.9, 0.99):
            assert torch.equal(top_p_filter(logits, p).isfinite(), by_sorting(logits, p).isfinite()), (scale, p)


def test_top_k_and_top_p_keep_exactly_the_right_tokens():
    kept = lambda logits: torch.isfinite(logits[0]).nonzero().flatten().tolist()  # noqa: E731
    assert kept(top_k_filter(CRAFTED[None], 3)) == [0, 3, 7]
    assert kept(top_k_filter(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), 2)) == [1, 2]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert kept(top_p_filter(probs.log(), 0.5)) == [0]
    assert kept(top_p_filter(probs.log(), 0.79)) == [0, 1]
    assert kept(top_p_filter(probs.log(), 0.81)) == [0, 1, 2]
    assert kept(top_p_filter(probs.log()[:, [3, 1, 0, 2]], 0.79)) == [1, 2]  # order does not matter
    assert kept(top_p_filter(probs.log(), 1.0)) == [0, 1, 2, 3]


def test_temperature_reshapes_the_distribution():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    generator = torch.Generator().manual_seed(0)
    for temperature in (0.5, 2.0):
        draws = torch.stack([sample_next(logits, temperature=temperature, generator=generator) for _ in range(4000)])
        frequencies = torch.bincount(draws.flatten(), minlength=3).float() / 4000
        assert torch.allclose(frequencies, (logits[0] / temperature).softmax(-1), atol=0.03)
    assert all(int(sample_next(logits, temperature=0)) == 0 for _ in range(5))


def test_the_smallest_temperatures_either_sample_the_top_token_or_are_refused(capsys):
    """A temperature that rounds to 0 in float32 would divide the logits by 0 (NaN): check_sampling and
    generate.py's flag check refuse it, while the smallest one that does not samples the top token."""
    from llama.cli import generate as generate_cli
    from llama.generation import FLOAT32_ZERO, check_sampling

    logits = torch.tensor([[1.0, 0.0, -1.0, 0.999]])
    assert torch.tensor(FLOAT32_ZERO, dtype=torch.float32) == 0 < torch.tensor(FLOAT32_ZERO * 1.01, dtype=torch.float32)
    assert [int(sample_next(logits, temperature=FLOAT32_ZERO * 1.01)) for _ in range(5)] == [0] * 5
    message = "temperature must be 0 (greedy) or above 7e-46, which rounds to 0 in float32; got 1e-46"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        check_sampling(1e-46, 0, 1.0, 1.0, 1)
    assert generate_cli.main(["--prompt", "Hi", "--temperature", "1e-46"]) == 2
    assert capsys.readouterr().err == f"error: --{message}\n"


def test_split_at_stop_holds_back_exactly_the_longest_start_of_a_stop_string():
    """The per-token search (only where a stop string holds the text's last character) against the definition:
    every prefix of every stop string tried, on random texts over a small alphabet, where overlaps abound."""
    def defined(text, stop, final):
        found = [text.index(s) for s in stop if s in text]
        if found:
            return text[:min(found)], "", True
        hold = 0 if final else max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        return text[:len(text) - hold], text[len(text) - hold:], False

    rng = random.Random(0)
    word = lambda n: "".join(rng.choice("ab c") for _ in range(n))  # noqa: E731
    for _ in range(20000):
        text, stop, final = word(rng.randint(0, 8)), [word(rng.randint(1, 6)) for _ in range(rng.randint(0, 3))], \
            rng.random() < 0.1
        assert split_at_stop(text, stop, final) == defined(text, stop, final), (text, stop, final)


def test_same_seed_same_text(model, tokenizer):
    sample = dict(max_tokens=30, temperature=1.0, top_k=0)
    first = generate(model, tokenizer, "Once upon a time", seed=7, **sample)
    assert first == generate(model, tokenizer, "Once upon a time", seed=7, **sample)
    assert first != generate(model, tokenizer, "Once upon a time", seed=8, **sample)


@torch.no_grad()
def test_batch_gives_each_prompt_its_greedy_tokens(model, tokenizer):
    prompts = ["Once upon a time", "The quick fox", "A", "The lazy dog number 12 jumps over"]
    alone = [generate(model, tokenizer, p, max_tokens=25, temperature=0) for p in prompts]
    assert generate(model, tokenizer, prompts, max_tokens=25, temperature=0) == alone


def scripted(monkeypatch, ids):
    """Make generation produce exactly these token ids."""
    def fake_generate_tokens(model, prompts, max_tokens, stop_ids=(), **sampling):
        for token in ids[:max_tokens]:
            yield torch.tensor([token])
    monkeypatch.setattr(generation, "generate_tokens", fake_generate_tokens)


def test_streaming_never_splits_characters_and_joins_to_the_whole_text(model, tokenizer, monkeypatch):
    ids = tokenizer.encode(EMOJI_CJK)
    assert len(ids) > len(EMOJI_CJK) / 2  # byte-level: emoji and CJK take several tokens each
    scripted(monkeypatch, ids + [tokenizer.eot_id, 5, 6])
    pieces = list(stream(model, tokenizer, "Hi", max_tokens=500))
    assert "".join(pieces) == EMOJI_CJK == generate(model, tokenizer, "Hi", max_tokens=500)
    assert not any("\ufffd" in piece for piece in pieces)
    assert len(pieces) > 10


def test_real_model_stream_equals_generate(model, tokenizer):
    sample = dict(max_tokens=40, temperature=1.0, seed=3)
    assert "".join(stream(model, tokenizer, "Once upon", **sample)) == generate(model, tokenizer, "Once upon", **sample)


def test_stop_strings_end_generation_and_are_not_shown(model, tokenizer, monkeypatch):
    scripted(monkeypatch, tokenizer.encode("The fox. ### Instruction: more text"))
    pieces = list(stream(model, tokenizer, "Hi", stop=["###", "nothing"]))
    assert "".join(pieces) == "The fox. "
    assert not any("#" in piece for piece in pieces)


def test_stream_stats_count_the_tokens_and_say_why_it_ended(model, tokenizer, monkeypatch):
    from llama.generation import GenerationStats

    stats = GenerationStats()
    text = "".join(stream(model, tokenizer, "Once upon", max_tokens=9, temperature=0, stats=stats))
    prompt = generation.encode_prompt(tokenizer, "Once upon")
    assert (stats.prompt_tokens, stats.generated_tokens, stats.finish_reason) == (len(prompt), 9, "length")
    assert text == generate(model, tokenizer, "Once upon", max_tokens=9, temperature=0)
    assert stats.prefill_seconds > 0 and stats.decode_seconds > 0 and stats.decode_tokens_per_s > 0
    scripted(monkeypatch, tokenizer.encode("The fox.") + [tokenizer.eot_id, 7])
    stats = GenerationStats()
    assert "".join(stream(model, tokenizer, "Hi", max_tokens=50, stats=stats)) == "The fox."
    assert (stats.generated_tokens, stats.finish_reason) == (len(tokenizer.encode("The fox.")) + 1, "stop")
    scripted(monkeypatch, tokenizer.encode("The fox. ### more"))
    stats = GenerationStats()
    assert "".join(stream(model, tokenizer, "Hi", stop=["###"], stats=stats)) == "The fox. "
    assert stats.finish_reason == "stop"


def test_bad_input_gets_a_clear_error(model, tokenizer):
    cases = [(dict(temperature=-0.1), r"^temperature must be >= 0 \(0 means greedy\), got -0.1$"),
             (dict(top_p=0.0), r"^top_p must be in \(0, 1\], got 0.0$"),
             (dict(top_p=1.5), r"^top_p must be in \(0, 1\], got 1.5$"),
             (dict(top_k=-1), r"^top_k must be >= 0 \(0 disables it\), got -1$"),
             (dict(repetition_penalty=0.0), r"^repetition_penalty must be > 0 \(1 disables it\), got 0.0$")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            generate(model, tokenizer, "Once", **kwargs)
    with pytest.raises(ValueError, match=r"^the prompt is empty; give some text to continue$"):
        generate(model, tokenizer, "")
    long_prompt = "the quick fox " * 200
    with pytest.warns(UserWarning, match=r"left-truncated to 206 to fit the context of 256"):
        generate(model, tokenizer, long_prompt, max_tokens=50, temperature=0)
    with pytest.raises(ValueError, match=r"^the prompt has \d+ tokens but only 206 fit in the context of 256 "
                                         r"with max_tokens=50$"):
        generate(model, tokenizer, long_prompt, max_tokens=50, truncate=False)


@torch.no_grad()
def test_fixed_shape_decode_step_gives_the_same_tokens(model, tokenizer, monkeypatch):
    """The compiled path's logic, run eagerly: compiling it is PyTorch's job, the shapes are ours.

    Its cache outlives each call (CUDA graphs replay on fixed addresses), so a short prompt after a
    long one must not see the long one's stale keys.
    """
    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)
    _compiled_decode.cache_clear()
    long_prompt = tokenizer.encode("The quick fox jumps over the lazy dog, and then the dog barks back")
    prompts = [tokenizer.encode("Once upon a time"), tokenizer.encode("The quick fox jumps")]
    for batch in ([long_prompt], [prompts[0]], prompts, [long_prompt, prompts[1]]):
        dynamic = torch.stack(list(generate_tokens(model, batch, max_tokens=30, temperature=0)))
        fixed = torch.stack(list(generate_tokens(model, batch, max_tokens=30, temperature=0, compile=True)))
        assert torch.equal(dynamic, fixed)
    reused = model._static_cache
    list(generate_tokens(model, [prompts[0], prompts[1]], max_tokens=5, temperature=0, compile=True))
    assert model._static_cache is reused  # same batch size and size block: same buffers
    _compiled_decode.cache_clear()
