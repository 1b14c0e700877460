"""Tests for llama.tokenizer: exact round trips, special-token policy, save/load, streaming decode."""
import json
import random
import re

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from llama.generation import encode_prompt
from llama.tokenizer import SPECIAL_TOKENS, Tokenizer

ENGLISH = "The quick brown fox jumps over the lazy dog. It's 3:45 PM -- isn't it?"
ACCENTED = "Crème brûlée, naïve façade, Ångström"
CJK = "東京は日本の首都です。北京欢迎你"
EMOJI = "👩‍👩‍👧‍👦 🚀🔥 👍🏽"
WHITESPACE = "  leading spaces\n\n\ttab\tseparated\r\nwindows line\n   trailing   \t\n"
UNSEEN = "Ωμέγα ≈ √∫ ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🦀🦩 \x00\x07\x7f ∰"  # characters absent from the corpus below
TEXTS = [ENGLISH, ACCENTED, CJK, EMOJI, WHITESPACE, UNSEEN, "", " ", "[EOT]"]


def make_corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    subjects = ["The cat", "A young engineer", "My neighbour", "The old man", "Every student", "Our team"]
    verbs = ["reads", "writes", "builds", "finds", "loves", "carries", "paints", "studies"]
    objects = ["a book", "the letter", "some bread", "a small boat", "the garden", "new models"]
    endings = ["today.", "in the morning.", "after dinner.", "with great care.", "again and again!", "?"]
    lines = [" ".join(rng.choice(part) for part in (subjects, verbs, objects, endings)) for _ in range(n)]
    lines += ["Le café est très crème, déjà vu à la façade.", "Über grüne Wiesen läuft ein Bär."] * 5
    lines += ["日本の首都は東京です。", "我喜欢学习中文。"] * 3
    lines += ["Great job 👍 🎉", "Launch 🚀 now"] * 3
    return lines


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(make_corpus(), vocab_size=800)


def test_train_layout(tok):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert (tok.pad_id, tok.bot_id, tok.eot_id) == (0, 1, 2)
    assert len({tok.pad_id, tok.bot_id, tok.eot_id}) == 3
    assert 259 < tok.vocab_size <= 800
    assert len(tok.encode("The cat reads a book")) < len("The cat reads a book".encode())  # merges learned


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_no_bot_or_eot_added(tok):
    ids = tok.encode(ENGLISH)
    assert tok.bot_id not in ids and tok.eot_id not in ids


@pytest.mark.parametrize("token,expected", zip(SPECIAL_TOKENS, [0, 1, 2]))
def test_special_tokens_are_single_ids_when_allowed(tok, token, expected):
    assert tok.encode(token, allow_special=True) == [expected]


def test_literal_special_token_in_document_is_ordinary_text(tok):
    text = "stop here [EOT] and [BOT] then [PAD]"
    ids = tok.encode(text)
    assert not set(ids) & {tok.pad_id, tok.bot_id, tok.eot_id}
    assert len(tok.encode("[EOT]")) > 1
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=False) == text
    assert tok.encode("[EOT]", allow_special=True) == [tok.eot_id]
    allowed = tok.encode(text, allow_special=True)
    assert allowed.count(tok.eot_id) == allowed.count(tok.bot_id) == allowed.count(tok.pad_id) == 1
    # Special tokens are dropped on decode by default and kept on request.
    assert tok.decode(allowed, skip_special=False) == text
    assert tok.decode(allowed) == "stop here  and  then "


def test_allow_special_flag_does_not_leak(tok):
    assert tok.backend.encode_special_tokens is False
    tok.encode("[EOT]", allow_special=True)
    assert tok.backend.encode_special_tokens is False
    tok.encode("[EOT]")
    assert tok.backend.encode_special_tokens is False
    with pytest.raises(TypeError):
        tok.encode_batch([123])  # fails inside the backend; the flag must still be restored
    assert tok.backend.encode_special_tokens is False
    assert tok.encode("[EOT]", allow_special=True) == [tok.eot_id]


def test_batch_matches_single(tok):
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.encode_batch(TEXTS, allow_special=True) == [tok.encode(t, allow_special=True) for t in TEXTS]
    batch = tok.encode_batch(TEXTS)
    assert tok.decode_batch(batch) == [tok.decode(ids) for ids in batch] == TEXTS
    with_specials = [[tok.bot_id, *ids, tok.eot_id] for ids in batch]
    assert tok.decode_batch(with_specials) == TEXTS
    assert tok.decode_batch(with_specials, skip_special=False) == [f"[BOT]{t}[EOT]" for t in TEXTS]


@pytest.mark.parametrize("target", ["file", "folder"])
def test_save_load(tok, tmp_path, target):
    path = tmp_path / "tok.json" if target == "file" else tmp_path / "out"
    tok.save(path)
    saved = path if target == "file" else path / "tokenizer.json"
    assert saved.is_file()
    loaded = Tokenizer.load(path)
    assert (loaded.pad_id, loaded.bot_id, loaded.eot_id) == (tok.pad_id, tok.bot_id, tok.eot_id)
    assert (loaded.pad_token, loaded.bot_token, loaded.eot_token) == SPECIAL_TOKENS
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    assert loaded.encode("[EOT]", allow_special=True) == [tok.eot_id]
    assert Tokenizer.load(saved).encode(CJK) == tok.encode(CJK)
    assert loaded.add_bot is True


def test_add_bot_round_trips_and_decides_the_prompts_first_token(tok, tmp_path):
    """A model that never saw BOT before a document (Hugging Face's add_bos_token=false) gets none."""
    Tokenizer(tok.backend, add_bot=False).save(tmp_path / "tok.json")
    loaded = Tokenizer.load(tmp_path / "tok.json")
    assert loaded.add_bot is False
    assert encode_prompt(loaded, "Once upon") == tok.encode("Once upon")
    assert encode_prompt(tok, "Once upon") == [tok.bot_id, *tok.encode("Once upon")]


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_save_writes_hf_tokenizer_config(tok, tmp_path):
    Tokenizer(tok.backend, chat_template=CHATML).save(tmp_path / "tok.json")
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == {
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
        "bos_token": "[BOT]", "eos_token": "[EOT]", "pad_token": "[PAD]", "chat_template": CHATML,
        "add_bos_token": True}
    loaded = Tokenizer.load(tmp_path / "tok.json")
    assert loaded.chat_template == CHATML
    assert Tokenizer.load(tmp_path / "tok.json", chat_template="{{ messages }}").chat_template == "{{ messages }}"
    tok.save(tmp_path / "plain")
    assert "chat_template" not in json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())
    assert Tokenizer.load(tmp_path / "plain").chat_template is None


def test_load_reads_hf_tokenizer_config(tmp_path):
    """Roles and chat template from Hugging Face's files; explicit arguments still win."""
    path = make_wordlevel(tmp_path)
    config = {"bos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "special": True},
              "eos_token": "<|endoftext|>", "pad_token": None,
              "chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": CHATML}]}
    (path.parent / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.load(path.parent)
    assert (tok.bot_token, tok.eot_token, tok.pad_token) == ("<|endoftext|>", "<|endoftext|>", None)
    assert (tok.bot_id, tok.eot_id, tok.pad_id) == (3, 3, None)
    assert tok.chat_template == CHATML
    named = Tokenizer.load(path, eot_token="[UNK]", pad_token="[UNK]")
    assert (named.bot_id, named.eot_id, named.pad_id) == (3, 0, 0)

    del config["chat_template"]
    (path.parent / "tokenizer_config.json").write_text(json.dumps(config))
    (path.parent / "chat_template.jinja").write_text(CHATML)  # where recent transformers versions put it
    assert Tokenizer.load(path).chat_template == CHATML

    (path.parent / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"^" + re.escape(str(path.parent / "tokenizer_config.json")) +
                       r" is not valid JSON: "):
        Tokenizer.load(path)


def make_wordlevel(tmp_path):
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "<|endoftext|>": 3}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<|endoftext|>"])
    path = tmp_path / "wordlevel" / "tokenizer.json"
    path.parent.mkdir()
    backend.save(str(path))
    return path


def test_load_foreign_tokenizer(tmp_path):
    path = make_wordlevel(tmp_path)
    tok = Tokenizer.load(path.parent)
    assert (tok.bot_token, tok.eot_token, tok.pad_token) == (None, None, None)
    assert (tok.bot_id, tok.eot_id, tok.pad_id) == (None, None, None)
    assert tok.vocab_size == 4
    assert tok.encode("hello world hello") == [1, 2, 1]
    assert tok.encode("hello <|endoftext|>", allow_special=True) == [1, 3]

    named = Tokenizer.load(path, bot_token="<|endoftext|>", eot_token="<|endoftext|>", pad_token="[UNK]")
    assert (named.bot_id, named.eot_id, named.pad_id) == (3, 3, 0)

    with pytest.raises(ValueError, match=r"^eot_token='\[EOT\]' is not in the tokenizer's vocabulary; "
                                         r"pass a token the vocabulary contains, or None$"):
        Tokenizer.load(path, eot_token="[EOT]")
    with pytest.raises(ValueError, match=r"bot_token='<s>' is not in the tokenizer's vocabulary"):
        Tokenizer(tokenizers.Tokenizer.from_file(str(path)), bot_token="<s>", eot_token=None, pad_token=None)


def stream(tok, ids):
    decoder = tok.stream_decoder()
    pushes = [decoder.push(i) for i in ids]
    return pushes, decoder.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_matches_decode(tok, text):
    ids = tok.encode(text)
    pushes, rest = stream(tok, ids)
    assert "".join(pushes) + rest == tok.decode(ids) == text
    if "\ufffd" not in text:
        assert not any("\ufffd" in p for p in pushes)


@pytest.mark.parametrize("text", [CJK, EMOJI, UNSEEN])
def test_stream_decoder_holds_back_split_characters(tok, text):
    ids = tok.encode(text)
    assert len(ids) > len(text)  # some characters span several tokens
    pushes, rest = stream(tok, ids)
    assert "" in pushes  # the hold-back path ran: a token ended mid-character
    assert not any("\ufffd" in p for p in pushes)
    assert rest == ""
    assert "".join(pushes) == text


def test_stream_decoder_skips_special_tokens(tok):
    ids = [tok.bot_id, *tok.encode(EMOJI), tok.eot_id, tok.pad_id]
    pushes, rest = stream(tok, ids)
    assert "".join(pushes) + rest == tok.decode(ids) == EMOJI


def test_stream_decoder_flushes_incomplete_character(tok):
    ids = tok.encode("ok 🦀")
    pushes, rest = stream(tok, ids[:-1])  # cut inside the crab's four bytes
    assert not any("\ufffd" in p for p in pushes)
    assert "".join(pushes) + rest == tok.decode(ids[:-1])
    assert rest.endswith("\ufffd")


def test_stream_decoder_keeps_metaspace_spaces(tmp_path):
    """Sentencepiece-style decoders strip the first token's leading space; streaming must not drop the rest."""
    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "▁again": 3, "!": 4}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tok = Tokenizer(backend, bot_token=None, eot_token=None, pad_token=None)
    ids = [1, 2, 3, 4]
    pushes, rest = stream(tok, ids)
    assert pushes == ["Hello", " world", " again", "!"]
    assert "".join(pushes) + rest == tok.decode(ids) == "Hello world again!"


def test_vocab_too_small():
    with pytest.raises(ValueError, match=r"vocab_size=100 is too small.*at least 259"):
        Tokenizer.train(["hello"], vocab_size=100)
    assert Tokenizer.train(["hello world"], vocab_size=259).vocab_size == 259


def test_missing_file(tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.load(missing)
    with pytest.raises(FileNotFoundError, match="empty"):
        Tokenizer.load(tmp_path / "empty")
