"""Tokenizer: a byte-level BPE trained with Hugging Face `tokenizers`, behind a small wrapper.

Design:

- Byte-level BPE (as in GPT-2 and Llama 3). Text is split into UTF-8 bytes before merging, so every
  string has an encoding (no unknown token) and decode(encode(text)) == text exactly. There is no
  normalizer for the same reason: nothing may rewrite the text.
- Three special tokens are reserved when we train: [PAD]=0, [BOT]=1 (beginning of text), [EOT]=2
  (end of text). `encode` never adds them; the data pipeline and the chat code insert BOT/EOT ids
  themselves, so there is exactly one place that decides where documents begin and end.
- Special tokens inside text. By default (`allow_special=False`) a special token's spelling found in
  the text, say a web page that literally contains "[EOT]", is encoded as ordinary text, several
  normal tokens. A document therefore can never inject a stop or boundary token; those ids only
  come from code. Pass `allow_special=True` for text we rendered ourselves and whose special tokens
  are meant, such as a ChatML prompt with "<|im_start|>" markers.
- `load` accepts any Hugging Face tokenizer.json (BPE, WordPiece, Unigram, ...), so pretrained
  checkpoints bring their own tokenizer. Their special tokens have other names, so bot/eot/pad are
  named explicitly, or read from the tokenizer_config.json beside the file (Hugging Face's
  bos_token/eos_token/pad_token), or, when neither says, left as None.
- `save` writes that tokenizer_config.json too, with the chat template, so a saved folder keeps its
  token roles and loads in `transformers.AutoTokenizer` unchanged.
- `StreamDecoder` turns generated ids into text as they arrive. A byte-level token can be a fraction
  of a character (an emoji is four bytes, often four tokens), so it holds text back until the
  character is complete instead of printing "\ufffd".
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from .files import not_a_file, read_json

SPECIAL_TOKENS = ("[PAD]", "[BOT]", "[EOT]")  # ids 0, 1, 2 in a tokenizer we train
PAD_TOKEN, BOT_TOKEN, EOT_TOKEN = SPECIAL_TOKENS
BYTE_ALPHABET_SIZE = 256
TOKENIZER_CONFIG = "tokenizer_config.json"
# Our token roles and the keys Hugging Face's tokenizer_config.json stores them under.
HF_TOKEN_KEYS = {"bot_token": "bos_token", "eot_token": "eos_token", "pad_token": "pad_token"}
ENCODE_BATCH = 1024  # texts per encode_batch call that callers with many texts make: the backend spreads each over all cores


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the names of the tokens that frame documents, and the chat template.

    `chat_template` is the Jinja template of a pretrained chat model (Hugging Face's format), kept so
    that a converted checkpoint still knows how to render a conversation; None when there is none.
    `add_bot` says whether a prompt starts with BOT: our models always saw one, but some pretrained
    ones never did (SmolLM2's BOS is its chat turn marker; Hugging Face's `add_bos_token` is false).
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bot_token: str | None = BOT_TOKEN,
                 eot_token: str | None = EOT_TOKEN, pad_token: str | None = PAD_TOKEN,
                 chat_template: str | None = None, add_bot: bool = True) -> None:
        self.backend = backend
        self.bot_token, self.eot_token, self.pad_token = bot_token, eot_token, pad_token
        self.chat_template, self.add_bot = chat_template, add_bot
        # Resolve ids once: a misspelled token name should fail here, not deep inside training.
        self._ids: dict[str, int | None] = {}
        for role, token in (("bot_token", bot_token), ("eot_token", eot_token), ("pad_token", pad_token)):
            token_id = None if token is None else backend.token_to_id(token)
            if token is not None and token_id is None:
                raise ValueError(f"{role}={token!r} is not in the tokenizer's vocabulary; "
                                 "pass a token the vocabulary contains, or None")
            self._ids[role] = token_id

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2,
              show_progress: bool = False) -> Tokenizer:
        """Train a byte-level BPE whose first ids are SPECIAL_TOKENS, then the 256 byte tokens."""
        minimum = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
        if vocab_size < minimum:
            raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
                             f"{minimum} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            # All 256 bytes, even ones the corpus lacks, so any text can be encoded later.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    @classmethod
    def load(cls, path: str | Path, *, bot_token: str | None = None, eot_token: str | None = None,
             pad_token: str | None = None, chat_template: str | None = None) -> Tokenizer:
        """Load a tokenizer.json, or a folder holding one, from us or from any Hugging Face model.

        Each token name and the chat template comes from its argument when given, else from the
        tokenizer_config.json (and chat_template.jinja) beside the file when that names it. Token names
        still unknown default to ours ([BOT], [EOT], [PAD]) when the vocabulary has them, and stay None
        otherwise (a GPT-2 tokenizer has different names).
        """
        file = _tokenizer_file(path)
        if not file.is_file():
            hint = "expected a tokenizer.json file or a folder containing one"
            for link in (Path(path), file):  # a loop of links, or a link to nothing, is named as such
                if link.is_symlink() and not link.exists():
                    raise not_a_file(link, hint)
            raise FileNotFoundError(f"no tokenizer found at {str(file)!r}; {hint}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust reader raises a bare Exception for truncated or corrupt JSON
            reason = " ".join(str(e).split()) or type(e).__name__
            raise ValueError(f"{file} is not a valid tokenizer.json ({reason[:200]}); copy it again from where it "
                             "came from") from None
        saved = _read_tokenizer_config(file.parent)
        given = {"bot_token": bot_token, "eot_token": eot_token, "pad_token": pad_token}
        names = {}
        for role, ours in (("bot_token", BOT_TOKEN), ("eot_token", EOT_TOKEN), ("pad_token", PAD_TOKEN)):
            if given[role] is not None:
                names[role] = given[role]
            elif role in saved:
                names[role] = saved[role]
            else:
                names[role] = ours if backend.token_to_id(ours) is not None else None
        return cls(backend, **names,
                   chat_template=chat_template if chat_template is not None else saved.get("chat_template"),
                   add_bot=saved.get("add_bot", True))

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json, and tokenizer_config.json beside it; `path` is that file or its folder.

        The config is Hugging Face's: token roles under their key names, the chat template, and the
        class that makes `transformers.AutoTokenizer` load the folder with no custom code.
        """
        file = _tokenizer_file(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(file))
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                                  # transformers would otherwise rewrite " ." as "." when decoding
                                  "clean_up_tokenization_spaces": False}
        config.update({key: getattr(self, role) for role, key in HF_TOKEN_KEYS.items()})
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        config["add_bos_token"] = self.add_bot
        (file.parent / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bot_id(self) -> int | None:
        return self._ids["bot_token"]

    @property
    def eot_id(self) -> int | None:
        return self._ids["eot_token"]

    @property
    def pad_id(self) -> int | None:
        return self._ids["pad_token"]

    @property
    def padding_id(self) -> int:
        """The id to pad batches with: pad_id, or 0 when the tokenizer has none (any id will do where pads
        never count in the loss and never take part in attention)."""
        return 0 if self.pad_id is None else self.pad_id

    @property
    def stop_ids(self) -> list[int]:
        """The ids that end a generated answer: the EOT (EOS) token, when the tokenizer has one."""
        return [] if self.eot_id is None else [self.eot_id]

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of `text`, without BOT/EOT. Special-token spellings count only if allow_special."""
        return self.encode_batch([text], allow_special=allow_special)[0]

    def encode_batch(self, texts: list[str], *, allow_special: bool = False) -> list[list[int]]:
        """Like `encode` for many texts, encoded in parallel by the Rust backend."""
        # The backend has no per-call switch, so flip its flag and always restore it. This makes
        # concurrent calls with different allow_special from several Python threads unsafe.
        previous = self.backend.encode_special_tokens
        self.backend.encode_special_tokens = not allow_special
        try:
            encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        finally:
            self.backend.encode_special_tokens = previous
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def decode_batch(self, batch: Sequence[Sequence[int]], *, skip_special: bool = True) -> list[str]:
        return self.backend.decode_batch([list(ids) for ids in batch], skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns token ids into text one at a time, never emitting half a UTF-8 character.

    Incremental detokenization as in vLLM and text-generation-inference: keep every id, but decode
    only the window ids[prefix:], where ids[prefix:read] is text already emitted and kept as left
    context. Context matters for decoders such as sentencepiece's Metaspace, which strip the leading
    space of the first token: decoding "▁world" alone gives "world", after "Hello" it gives " world".
    The window stays a few tokens long, so each push costs O(1) amortized.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the context window
        self.read = 0  # ids before this have been emitted as text

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text ('' while a character is incomplete)."""
        self.ids.append(token_id)
        emitted, new = self._decode_window()
        if len(new) > len(emitted) and not new.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return new[len(emitted):]
        return ""

    def flush(self) -> str:
        """Return whatever is still held back, even an incomplete character, at the end of generation."""
        emitted, new = self._decode_window()
        self.prefix, self.read = self.read, len(self.ids)
        return new[len(emitted):]

    def _decode_window(self) -> tuple[str, str]:
        decode = self.tokenizer.decode
        return decode(self.ids[self.prefix:self.read]), decode(self.ids[self.prefix:])


def _read_tokenizer_config(folder: Path) -> dict[str, Any]:
    """Token names by our role, "chat_template" and "add_bot", from Hugging Face's files in `folder`, if any."""
    found: dict[str, Any] = {}
    config_file = folder / TOKENIZER_CONFIG
    if config_file.is_file():
        config = read_json(config_file)
        for role, key in HF_TOKEN_KEYS.items():
            if key in config:
                value = config[key]
                value = value.get("content") if isinstance(value, dict) else value  # older files: AddedToken dicts
                if value is not None and not isinstance(value, str):
                    raise ValueError(f"{config_file}: {key} must name a token, got {value!r}")
                found[role] = value
        if isinstance(config.get("add_bos_token"), bool):
            found["add_bot"] = config["add_bos_token"]
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one renders chats
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is not None:
            found["chat_template"] = template
    jinja_file = folder / "chat_template.jinja"  # where recent transformers versions save it
    if "chat_template" not in found and jinja_file.is_file():
        found["chat_template"] = jinja_file.read_text()
    return found


def _tokenizer_file(path: str | Path) -> Path:
    """An existing folder, or a path not ending in .json, means the tokenizer.json inside it."""
    path = Path(path)
    return path / "tokenizer.json" if path.is_dir() or path.suffix != ".json" else path
