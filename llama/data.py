"""Pretraining data: corpus -> token shards on disk -> Batches of windows (llama/batch.py).

Writing (data/prepare.py is a thin front end over `prepare`):

- A corpus is a Hugging Face Hub dataset or local files (txt, json, jsonl, csv, parquet, or folders of
  them), read through `datasets`, so big corpora stay on disk as memory-mapped Arrow files.
- What a document is in a .txt file is the `doc_sep` choice: "blank" (blocks separated by blank
  lines: a paragraph, a speech of a play), "line", "file", "wikiextractor" (`<doc ...>` ... `</doc>`
  blocks), or any other string, a literal separator such as TinyStories' "<|endoftext|>". Empty and
  whitespace-only documents are dropped in every format.
- The validation split is a seeded random choice of whole documents; both splits keep corpus order.
- Each document is stored as [BOT] tokens [EOT], concatenated into `{split}_000000.bin`, ... files of
  raw little-endian uint16 (uint32 when the vocabulary exceeds 65536), at most `shard_tokens` each; a
  document may continue into the next shard. Shards are written under a temporary name and renamed;
  meta.json is written last, so a folder with a finished meta.json is complete. Until then meta.json lists
  what prepare is writing, so that a rerun deletes or replaces those files and never anyone else's.
- meta.json records a fingerprint of the inputs (paths, sizes and mtimes, or the Hub id) and the
  settings, so preparing the same corpus the same way again is a no-op.

Reading:

- `TokenShards` memory-maps one split and reads any window of it, across shard boundaries.
- `PretrainLoader` yields random (or sequential) windows as Batches. Batch i of a rank depends only on
  (seed, rank, i), so the data position is one counter: resuming from `state_dict()` replays exactly
  the batches an uninterrupted run would have seen, on every rank.
- `eval_batches` is the fixed validation slice: the first windows of the val split.
"""
from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from .batch import Batch, check_token_ids
from .files import check_output_path, not_a_file, read_json, write_text_atomically
from .rows import ROW_FILE_KINDS, load_hub, unreadable
from .tokenizer import BOT_TOKEN, ENCODE_BATCH, EOT_TOKEN, Tokenizer

if TYPE_CHECKING:
    import datasets  # imported where used: reading prepared shards should not cost its import time


# --- the corpus ------------------------------------------------------------------------------------

# File kinds by extension, named as `datasets` builders. WikiExtractor writes files without one.
EXTENSIONS = {".txt": "text", "": "text", **ROW_FILE_KINDS}
FILE_KINDS = ("text", "json", "csv", "parquet")
COMPRESSIONS = (".gz", ".bz2", ".xz")  # `datasets` decompresses these on the fly
DOC_SEPS = ("blank", "line", "file", "wikiextractor")  # any other string is a literal separator
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")
_WIKI_DOC = re.compile(r"^<doc[^>]*>\n(.*?)^</doc>", re.DOTALL | re.MULTILINE)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_KNOWN = ".txt, .json, .jsonl, .csv or .parquet"


@dataclasses.dataclass(frozen=True)
class Source:
    """Where documents come from: local files of one kind, or a Hugging Face Hub dataset (kind "hub")."""

    name: str
    kind: str
    files: tuple[Path, ...] = ()
    hub_config: str | None = None
    hub_split: str = "train"

    def describe(self) -> str:
        if self.kind == "hub":
            config = "" if self.hub_config is None else f", config {self.hub_config!r}"
            return f"Hugging Face dataset {self.name!r} (split {self.hub_split!r}{config})"
        return f"{len(self.files)} {self.kind} file{'s' if len(self.files) > 1 else ''} from {self.name!r}"

    def identity(self) -> list | dict:
        """What the fingerprint covers: each file's path, size and mtime, or the Hub id (not its content)."""
        if self.kind == "hub":
            return {"hub": self.name, "config": self.hub_config, "split": self.hub_split}
        return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in self.files]


def _kind_of(path: Path) -> str | None:
    name = path.name
    for compression in COMPRESSIONS:
        name = name.removesuffix(compression)
    return EXTENSIONS.get(Path(name).suffix.lower())


def find_source(input: str, *, fmt: str = "auto", hub_config: str | None = None,
                hub_split: str = "train") -> Source:
    """Resolve `input`: an existing file or folder (its files, recursively), else a Hub dataset id
    (a missing path shaped like "name" or "owner/name", without a data file extension).

    In a folder, hidden files and files of other extensions (README.md) are skipped, files without an
    extension count as text, and empty files are left out. `fmt` (text, json, csv, parquet) overrides
    the extension of a single file, and picks one kind in a folder that mixes several.
    """
    if fmt != "auto" and fmt not in FILE_KINDS:
        raise ValueError(f"format {fmt!r} is not supported; pass auto or one of {', '.join(FILE_KINDS)}")
    path = Path(input).expanduser()
    if os.path.lexists(path) and not path.exists():  # a link to nothing, a loop of links: no Hub id either
        raise not_a_file(path, f"pass a file or folder ({_KNOWN})")
    if not path.exists():
        if _HUB_ID.fullmatch(input) and not (path.suffix and _kind_of(path)):
            return Source(input, "hub", hub_config=hub_config, hub_split=hub_split)
        raise FileNotFoundError(f"input {input!r} does not exist; pass a file or folder ({_KNOWN}) "
                                "or a Hugging Face dataset id such as 'roneneldan/TinyStories'")
    if path.is_file():
        kind = _kind_of(path) if fmt == "auto" else fmt
        if kind is None:
            raise ValueError(f"cannot tell the format of {str(path)!r} from its extension; "
                             f"pass --format with one of {', '.join(FILE_KINDS)}")
        files = [path]
    else:
        kinds = set(FILE_KINDS) if fmt == "auto" else {fmt}
        files = [f for f in sorted(path.rglob("*")) if f.is_file() and _kind_of(f) in kinds
                 and not any(part.startswith(".") for part in f.relative_to(path).parts)]
        found = sorted({_kind_of(f) for f in files})
        if len(found) > 1:
            raise ValueError(f"folder {str(path)!r} mixes {', '.join(found)} files; pass --format to pick one kind")
        if not files:
            raise ValueError(f"folder {str(path)!r} holds no {fmt if fmt != 'auto' else 'corpus'} files ({_KNOWN})")
        kind = found[0]
    files = [f.resolve() for f in files if f.stat().st_size > 0]
    if not files:
        raise ValueError(f"no documents in {input!r}: its files are empty")
    return Source(input, kind, tuple(files))


def split_text(text: str, doc_sep: str = "blank") -> list[str]:
    """The documents of one text file (see the module docstring), without surrounding newlines."""
    if not doc_sep:
        raise ValueError(f"doc_sep={doc_sep!r} is empty; pass one of {', '.join(DOC_SEPS)} or a separator string")
    if doc_sep == "file":
        parts = [text]
    elif doc_sep == "line":
        parts = text.split("\n")
    elif doc_sep == "blank":
        parts = _BLANK_LINES.split(text)
    elif doc_sep == "wikiextractor":
        parts = _WIKI_DOC.findall(text)
    else:
        parts = text.split(doc_sep)
    return [part.strip("\n") for part in parts if part.strip()]


def _documents(texts: list[str | None], doc_sep: str | None) -> dict[str, list[str]]:
    """A `datasets.map` step: split text files into documents (doc_sep) or keep rows; drop blank ones."""
    if doc_sep is not None:
        return {"text": [doc for text in texts for doc in split_text(text, doc_sep)]}
    return {"text": [text for text in texts if text and text.strip()]}


def load_documents(source: Source, *, text_field: str = "text", doc_sep: str = "blank") -> datasets.Dataset:
    """A Dataset with one "text" column and a row per non-blank document.

    text_field names the column of json, csv, parquet and Hub data; doc_sep splits text files.
    """
    import datasets

    try:
        if source.kind == "hub":
            raw = load_hub(source.name, source.hub_split, source.hub_config)  # offline: one line, at once
        else:
            options = {"sample_by": "document"} if source.kind == "text" else {}  # one row per file
            raw = datasets.load_dataset(source.kind, data_files=[str(f) for f in source.files], split="train",
                                        **options)
    except ConnectionError:  # load_hub's own line
        raise
    except Exception as e:  # noqa: BLE001 (pyarrow, json and StopIteration errors that name no file)
        if source.kind == "hub" and isinstance(e, (OSError, ValueError, datasets.exceptions.DatasetsError)):
            raise FileNotFoundError(f"{source.name!r} is not a local file or folder, and loading it from the "
                                    f"Hugging Face Hub failed: {e}") from e
        if source.kind == "hub" or isinstance(e, OSError):
            raise
        raise unreadable(source.files, e) from None
    field = "text" if source.kind == "text" else text_field
    if field not in raw.column_names:
        raise ValueError(f"no field {field!r} in {source.describe()}; its fields are "
                         f"{', '.join(map(repr, raw.column_names))}: pass one as --text-field")
    feature = raw.features[field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise ValueError(f"field {field!r} in {source.describe()} holds {feature}, not text; "
                         "pass a text field as --text-field")
    docs = raw.map(_documents, batched=True, batch_size=1 if source.kind == "text" else 1000,
                   input_columns=[field], remove_columns=raw.column_names,
                   fn_kwargs={"doc_sep": doc_sep if source.kind == "text" else None}, desc="finding documents",
                   load_from_cache_file=False)  # its cache key would miss changes to split_text's code
    if len(docs) == 0:
        raise ValueError(f"no documents in {source.name!r}: every text is empty or whitespace")
    return docs


def split_train_val(docs: datasets.Dataset, *, val_fraction: float = 0.05, val_docs: int | None = None,
                    seed: int = 0) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A seeded random choice of whole documents for validation (val_docs of them, else at least one
    when val_fraction > 0); both splits keep corpus order."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} is out of range; pass a fraction in [0, 1)")
    if val_docs is not None and val_docs < 0:
        raise ValueError(f"val_docs={val_docs} is negative; pass a count >= 0")
    n = len(docs)
    n_val = val_docs if val_docs is not None else max(1, round(val_fraction * n)) if val_fraction > 0 else 0
    if n_val >= n:
        raise ValueError(f"{n_val} validation document(s) leave none for training: the corpus has {n}; "
                         "pass a smaller --val-fraction or --val-docs (0 for no validation split)")
    is_val = np.zeros(n, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    return docs.select(np.flatnonzero(~is_val)), docs.select(np.flatnonzero(is_val))


def _texts(docs: datasets.Dataset) -> Iterator[str]:
    for batch in docs.iter(batch_size=1000):
        yield from batch["text"]


# --- token shards: writing -------------------------------------------------------------------------

DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB of uint16, as in llm.c's FineWeb shards
META_FILE = "meta.json"
META_VERSION = 1  # bump when the folder layout changes, so older folders are rebuilt
# While prepare writes a folder, its meta.json is {"version", "unfinished": true, "files": [...]}: every name
# prepare has written or is about to write there, so that a rerun after a stop deletes those and no other.
UNFINISHED = "unfinished"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type holding every id: uint16 up to 65536 tokens, else uint32 (little-endian)."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


class _ShardWriter:
    """Appends tokens to {split}_000000.bin, {split}_000001.bin, ..., each at most shard_tokens long.

    A shard is written as NAME.tmp, synced, then renamed, so a NAME.bin file is always complete.
    """

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int,
                 claim: Callable[[list[str]], None] = lambda names: None) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.claim = claim  # called with a shard's names before its file is created (prepare's journal)
        self.shards: list[dict[str, Any]] = []  # {"file", "tokens"} of each finished shard
        self._file = None
        self._count = 0  # tokens in the open shard

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None:
                self.claim([self._name(), f"{self._name()}.tmp"])
                self._file = open(self.folder / f"{self._name()}.tmp", "wb")
                self._count = 0
            room = self.shard_tokens - self._count
            chunk, tokens = tokens[:room], tokens[room:]
            self._file.write(chunk.tobytes())
            self._count += len(chunk)
            if self._count == self.shard_tokens:
                self._finish()

    def close(self) -> list[dict[str, Any]]:
        if self._file is not None:
            self._finish()
        return self.shards

    def _name(self) -> str:
        return f"{self.split}_{len(self.shards):06d}.bin"

    def _finish(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self.folder / f"{self._name()}.tmp", self.folder / self._name())
        self.shards.append({"file": self._name(), "tokens": self._count})


def frame_documents(ids: list[list[int]], bot_id: int, eot_id: int, dtype: np.dtype) -> np.ndarray:
    """[BOT] doc [EOT] for each document, concatenated."""
    flat: list[int] = []
    for doc in ids:
        flat.append(bot_id)
        flat += doc
        flat.append(eot_id)
    return np.array(flat, dtype=dtype)


def write_split(docs: datasets.Dataset, tokenizer: Tokenizer, folder: Path, split: str, *,
                shard_tokens: int = DEFAULT_SHARD_TOKENS, progress: bool = False,
                claim: Callable[[list[str]], None] = lambda names: None) -> dict[str, Any]:
    """Encode `docs` into folder/{split}_*.bin; returns the split's meta.json entry. claim(names) is told
    each shard's file names before the file is created."""
    writer = _ShardWriter(folder, split, token_dtype(tokenizer.vocab_size), shard_tokens, claim)
    tokens = text_bytes = 0
    with tqdm(total=len(docs), desc=f"encoding {split}", unit="doc", disable=not progress) as bar:
        for batch in docs.iter(batch_size=ENCODE_BATCH):
            texts = batch["text"]
            framed = frame_documents(tokenizer.encode_batch(texts), tokenizer.bot_id, tokenizer.eot_id,
                                     writer.dtype)
            writer.write(framed)
            tokens += len(framed)
            text_bytes += sum(len(text.encode()) for text in texts)
            bar.update(len(texts))
            bar.set_postfix(tokens=f"{tokens:,}")
    return {"documents": len(docs), "tokens": tokens, "bytes": text_bytes, "shards": writer.close()}


def _load_tokenizer(path: str | Path, bot_token: str | None, eot_token: str | None) -> Tokenizer:
    """A pretrained tokenizer to reuse; it must know which tokens begin and end a document."""
    tokenizer = Tokenizer.load(path, bot_token=bot_token, eot_token=eot_token)
    for ours, flag, token_id in ((BOT_TOKEN, "--bot-token", tokenizer.bot_id),
                                 (EOT_TOKEN, "--eot-token", tokenizer.eot_id)):
        if token_id is None:
            specials = [t.content for t in tokenizer.backend.get_added_tokens_decoder().values() if t.special]
            raise ValueError(f"the tokenizer at {str(path)!r} has no {ours} token, and its tokenizer_config.json "
                             f"names none in its place; pass {flag} with one of its special tokens: "
                             f"{', '.join(map(repr, specials[:10])) or 'it has none'}")
    return tokenizer


def read_meta(folder: str | Path) -> dict[str, Any]:
    """A prepared folder's meta.json."""
    file = Path(folder) / META_FILE
    if not file.is_file():
        if Path(folder).is_file():
            raise ValueError(f"{folder} is a file, not a folder of token shards; pass the folder that "
                             "data/prepare.py wrote")
        if os.path.lexists(folder) and not Path(folder).is_dir():  # a broken link, a loop of links
            raise not_a_file(folder, "pass the folder that data/prepare.py wrote")
        raise FileNotFoundError(f"no {META_FILE} in {str(folder)!r}; prepare the data first: "
                                f"python data/prepare.py --input CORPUS --out {folder}")
    meta = read_json(file)
    if meta.get(UNFINISHED):
        raise ValueError(f"{folder} is only partly prepared: data/prepare.py stopped before it finished; run it "
                         "again")
    return meta


def _up_to_date(out: Path, fingerprint: str) -> dict[str, Any] | None:
    """The existing meta.json when it has this fingerprint and its files are all there."""
    try:
        meta = read_meta(out)
    except (OSError, ValueError):
        return None
    if meta.get("fingerprint") != fingerprint or not (out / meta["tokenizer"]["file"]).is_file():
        return None
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in meta["splits"].values():
        for shard in split["shards"]:
            file = out / shard["file"]
            if not file.is_file() or file.stat().st_size != shard["tokens"] * itemsize:
                return None
    return meta


def _written_by_prepare(out: Path) -> set[str]:
    """The names in `out` that prepare wrote, as its meta.json records them: a finished folder's shards,
    tokenizer files and meta.json; a folder whose prepare stopped unfinished, every name it claimed. None
    without a meta.json of prepare's (a file of that name that does not parse is someone else's)."""
    try:
        meta = read_json(out / META_FILE)
        if meta.get(UNFINISHED) is True:
            names = list(meta["files"])
        else:
            names = [shard["file"] for split in meta["splits"].values() for shard in split["shards"]]
            names += [meta["tokenizer"]["file"], "tokenizer_config.json"]  # Tokenizer.save writes both
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    plain = {name for name in names if isinstance(name, str) and name and Path(name).name == name
             and not name.startswith(".")}  # a name in this folder, never a path elsewhere
    return plain | {META_FILE} if len(plain) == len(names) else set()


def _check_out(out: Path) -> set[str]:
    """Refuse an output folder holding anything prepare did not write: rebuilding deletes the old shards
    and meta.json, and must never delete someone else's files, even those that share their names (what
    prepare wrote is what its meta.json lists). Returns the names prepare wrote there."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; pass a folder as the output")
    entries = [entry for entry in out.iterdir() if not entry.name.startswith(".")] if out.is_dir() else []
    ours = _written_by_prepare(out)
    foreign = sorted(entry.name for entry in entries if not (entry.name in ours and entry.is_file()
                                                             and not entry.is_symlink()))
    if foreign:
        listed = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise ValueError(f"{out} holds files that data/prepare.py did not write ({listed}); prepare into a new or "
                         "empty folder (nothing of those is deleted)")
    return ours


class _Journal:
    """prepare's record of what it writes into a folder, kept in the folder's meta.json (unfinished) until
    the finished meta.json replaces it: every name is claimed before its file is created."""

    def __init__(self, out: Path, names: set[str]) -> None:
        self.out, self.names = out, set(names) - {META_FILE}
        self._write()

    def claim(self, names: list[str]) -> None:
        if not set(names) <= self.names:
            self.names.update(names)
            self._write()

    def _write(self) -> None:
        write_text_atomically(self.out / META_FILE, json.dumps({"version": META_VERSION, UNFINISHED: True,
                                                                "files": sorted(self.names)}) + "\n")


@dataclasses.dataclass
class PrepareResult:
    """What `prepare` did: the folder's meta.json, and seconds per phase (all 0 when up to date)."""

    meta: dict[str, Any]
    up_to_date: bool
    load_seconds: float = 0.0
    tokenizer_seconds: float = 0.0  # 0 when a tokenizer was reused
    encode_seconds: float = 0.0


def prepare(input: str, out: str | Path, *, fmt: str = "auto", text_field: str = "text", doc_sep: str = "blank",
            hub_config: str | None = None, hub_split: str = "train", val_fraction: float = 0.05,
            val_docs: int | None = None, seed: int = 0, vocab_size: int = 8192,
            tokenizer: str | Path | None = None, bot_token: str | None = None, eot_token: str | None = None,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, force: bool = False, progress: bool = False) -> PrepareResult:
    """Tokenize a corpus into `out`: train/val shards, tokenizer.json, then meta.json.

    Trains a byte-level BPE of `vocab_size` on the train documents, unless `tokenizer` (a tokenizer.json
    or a folder holding one) is given to reuse. Does nothing when `out` already holds this corpus
    prepared with these settings, unless `force`.
    """
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens={shard_tokens} must be at least 1")
    check_output_path(out, "--out")
    out = Path(out)
    source = find_source(input, fmt=fmt, hub_config=hub_config, hub_split=hub_split)
    reused = None if tokenizer is None else _load_tokenizer(tokenizer, bot_token, eot_token)
    settings = {"format": source.kind, "text_field": text_field, "doc_sep": doc_sep, "val_fraction": val_fraction,
                "val_docs": val_docs, "seed": seed, "shard_tokens": shard_tokens,
                "tokenizer": {"vocab_size": vocab_size} if reused is None else
                {"sha256": hashlib.sha256(reused.backend.to_str().encode()).hexdigest(),
                 "bot_token": reused.bot_token, "eot_token": reused.eot_token}}
    fingerprint = hashlib.sha256(json.dumps([META_VERSION, source.identity(), settings]).encode()).hexdigest()
    if not force and (meta := _up_to_date(out, fingerprint)) is not None:
        return PrepareResult(meta, up_to_date=True)
    ours = _check_out(out)

    start = time.perf_counter()
    train, val = split_train_val(load_documents(source, text_field=text_field, doc_sep=doc_sep),
                                 val_fraction=val_fraction, val_docs=val_docs, seed=seed)
    load_seconds = time.perf_counter() - start
    start = time.perf_counter()
    tok = reused if reused is not None else Tokenizer.train(_texts(train), vocab_size, show_progress=progress)
    tokenizer_seconds = 0.0 if reused is not None else time.perf_counter() - start

    # Nothing failed so far; replace the old output. meta.json becomes the journal of what this run writes
    # (the old files, then each new one before it is created), so the folder reads as unprepared until the
    # new meta.json is written, and a rerun after a stop deletes what prepare wrote and nothing else.
    out.mkdir(parents=True, exist_ok=True)
    journal = _Journal(out, ours)
    for name in sorted(ours - {META_FILE}):
        (out / name).unlink(missing_ok=True)
    start = time.perf_counter()
    splits = {name: write_split(docs, tok, out, name, shard_tokens=shard_tokens, progress=progress,
                                claim=journal.claim)
              for name, docs in (("train", train), ("val", val))}
    encode_seconds = time.perf_counter() - start
    journal.claim(["tokenizer.json", "tokenizer_config.json"])
    tok.save(out)
    tokenizer_sha256 = hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    meta = {"version": META_VERSION, "source": source.describe(), "fingerprint": fingerprint, "settings": settings,
            "vocab_size": tok.vocab_size, "dtype": token_dtype(tok.vocab_size).name, "bot_id": tok.bot_id,
            "eot_id": tok.eot_id,
            "tokenizer": {"file": "tokenizer.json", "trained": reused is None, "sha256": tokenizer_sha256},
            "splits": splits}
    write_text_atomically(out / META_FILE, json.dumps(meta, indent=2) + "\n")
    return PrepareResult(meta, False, load_seconds, tokenizer_seconds, encode_seconds)


# --- token shards: reading -------------------------------------------------------------------------

class TokenShards:
    """One split of a prepared folder, its shards memory-mapped and read as one long array of tokens."""

    def __init__(self, folder: str | Path, split: str = "train") -> None:
        self.folder, self.split = Path(folder), split
        self.meta = read_meta(self.folder)
        try:
            self._open(split)
        except (KeyError, TypeError) as e:  # valid JSON, but not what prepare writes
            raise ValueError(f"{self.folder / META_FILE} is not a meta.json that data/prepare.py wrote (at "
                             f"{e}); prepare the folder again with --force") from None

    def _open(self, split: str) -> None:
        if split not in self.meta["splits"]:
            raise ValueError(f"no split {split!r} in {self.folder / META_FILE}; it has "
                             f"{', '.join(map(repr, self.meta['splits']))}")
        self.vocab_size: int = self.meta["vocab_size"]
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.shards: list[np.memmap] = []
        self.starts: list[int] = []  # index of each shard's first token in the split
        self.num_tokens = 0
        for shard in self.meta["splits"][split]["shards"]:
            file = self.folder / shard["file"]
            if not file.is_file() or file.stat().st_size != shard["tokens"] * self.dtype.itemsize:
                raise ValueError(f"shard {str(file)!r} is missing or does not hold the {shard['tokens']} tokens "
                                 f"{META_FILE} lists; prepare the folder again with --force")
            self.shards.append(np.memmap(file, dtype=self.dtype, mode="r"))
            self.starts.append(self.num_tokens)
            self.num_tokens += shard["tokens"]
        if self.num_tokens == 0:
            raise ValueError(f"split {split!r} of {str(self.folder)!r} holds no tokens; prepare it with "
                             "--val-fraction or --val-docs above 0")

    def __len__(self) -> int:
        return self.num_tokens

    @property
    def tokenizer_file(self) -> Path:
        return self.folder / self.meta["tokenizer"]["file"]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split: a view of the memory map within one shard, else a copy."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise ValueError(f"window [{start}, {start + length}) is outside split {self.split!r}, "
                             f"which holds {self.num_tokens} tokens")
        i = bisect.bisect_right(self.starts, start) - 1
        offset = start - self.starts[i]
        if offset + length <= len(self.shards[i]):
            return self.shards[i][offset:offset + length]
        parts = []
        while length > 0:
            part = self.shards[i][offset:offset + length]
            parts.append(part)
            length -= len(part)
            i, offset = i + 1, 0
        return np.concatenate(parts)


def check_vocab_size(shards: TokenShards, vocab_size: int) -> None:
    """Fail early, and clearly, when the data holds ids the model's embedding table has no row for."""
    if shards.vocab_size > vocab_size:
        raise ValueError(f"the token shards in {str(shards.folder)!r} use a vocabulary of {shards.vocab_size} "
                         f"tokens, more than the model's vocab_size={vocab_size}; use a model with vocab_size >= "
                         f"{shards.vocab_size}, or prepare the data with that model's tokenizer")


def _windows(shards: TokenShards, starts: list[int], seq_len: int) -> Batch:
    """A Batch of the seq_len + 1 token windows at `starts`: inputs and their next tokens, all counted; its
    ids checked against the vocabulary here, on the CPU, so that the training step never has to."""
    inputs = np.empty((len(starts), seq_len), dtype=np.int64)
    targets = np.empty_like(inputs)
    for row, start in enumerate(starts):
        window = shards.read(start, seq_len + 1)
        inputs[row] = window[:-1]
        targets[row] = window[1:]
    check_token_ids((inputs, targets[:, -1:]), shards.vocab_size, f"split {shards.split!r} of {str(shards.folder)!r}",
                    f"its shards do not match the vocabulary {META_FILE} gives: prepare the folder again with --force")
    input_ids = torch.from_numpy(inputs)
    return Batch(input_ids, torch.from_numpy(targets), torch.ones(input_ids.shape, dtype=torch.bool))


def _check_fits(shards: TokenShards, seq_len: int) -> None:
    if seq_len < 1 or shards.num_tokens < seq_len + 1:
        raise ValueError(f"seq_len={seq_len} does not fit split {shards.split!r} of {str(shards.folder)!r}, "
                         f"which holds {shards.num_tokens} tokens; pass 1 <= seq_len <= {shards.num_tokens - 1}")


class PretrainLoader:
    """An endless iterator of Batches of seq_len-token windows from `shards`.

    Random mode (default): every window starts at a uniformly random token. Batch j draws the starts
    of the whole global batch (world_size * batch_size windows) from a torch.Generator seeded by
    (seed, j), and rank r takes its slice of them: ranks read distinct windows, and one process with
    the global batch reads exactly what all ranks read together. Sequential mode: windows are
    consecutive and do not overlap, window i covering tokens [i * seq_len, (i + 1) * seq_len] (inputs and
    targets); batch j of rank r takes windows (j * world_size + r) * batch_size onwards, so the ranks
    together read the split in order, then wrap around.
    """

    def __init__(self, shards: TokenShards, batch_size: int, seq_len: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, sequential: bool = False) -> None:
        _check_fits(shards, seq_len)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is out of range for world_size={world_size}; pass 0 <= rank < world_size")
        if seed < 0:
            raise ValueError(f"seed={seed} is negative; pass a seed >= 0")
        self.shards, self.batch_size, self.seq_len = shards, batch_size, seq_len
        self.rank, self.world_size, self.seed, self.sequential = rank, world_size, seed, sequential
        self.batches = 0  # batches produced so far: the whole data position
        self._windows_per_epoch = (shards.num_tokens - 1) // seq_len  # sequential mode
        self._generator = torch.Generator()

    def __iter__(self) -> PretrainLoader:
        return self

    def __next__(self) -> Batch:
        starts = self._starts(self.batches)
        self.batches += 1
        return _windows(self.shards, starts, self.seq_len)

    def _starts(self, index: int) -> list[int]:
        if self.sequential:
            first = (index * self.world_size + self.rank) * self.batch_size
            return [(first + b) % self._windows_per_epoch * self.seq_len for b in range(self.batch_size)]
        seed = np.random.SeedSequence((self.seed, index)).generate_state(1, np.uint64)[0]
        self._generator.manual_seed(int(seed))
        high = self.shards.num_tokens - self.seq_len  # the last window ends at the last token
        starts = torch.randint(0, high, (self.world_size * self.batch_size,), generator=self._generator)
        return starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()

    def _settings(self) -> dict[str, Any]:
        return {"seed": self.seed, "sequential": self.sequential, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "world_size": self.world_size, "num_tokens": self.shards.num_tokens}

    def state_dict(self) -> dict[str, Any]:
        """The data position and the settings it depends on; the same on every rank, so rank 0's suffices."""
        return {"batches": self.batches, **self._settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`: the next batches are those an uninterrupted run would have produced."""
        for key, value in self._settings().items():
            if state.get(key) != value:
                raise ValueError(f"the data state was saved with {key}={state.get(key)!r}, but this loader has "
                                 f"{key}={value!r}; resume with the same data and settings")
        self.batches = int(state["batches"])


def eval_batches(shards: TokenShards, batch_size: int, seq_len: int, max_tokens: int) -> list[Batch]:
    """The fixed validation slice: consecutive windows from the start of `shards`, up to max_tokens inputs.

    The last batch is smaller when the windows do not fill it; weigh batch losses by Batch.num_counted.
    """
    _check_fits(shards, seq_len)
    if batch_size < 1 or max_tokens < seq_len:
        raise ValueError(f"batch_size={batch_size} and max_tokens={max_tokens} leave no window of "
                         f"seq_len={seq_len}; pass batch_size >= 1 and max_tokens >= seq_len")
    windows = min(max_tokens // seq_len, (shards.num_tokens - 1) // seq_len)
    starts = [i * seq_len for i in range(windows)]
    return [_windows(shards, starts[i:i + batch_size], seq_len) for i in range(0, windows, batch_size)]
