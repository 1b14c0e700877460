"""Tests for llama.data and data/prepare.py: corpus -> shards (every input kind), no-op reruns, errors,
and the loader: real windows, ranks, exact resume, sequential order, the fixed val slice."""
import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from llama.data import (
    PretrainLoader,
    TokenShards,
    check_vocab_size,
    eval_batches,
    find_source,
    prepare,
    split_text,
    token_dtype,
)
from llama.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_docs(n: int = 40, seed: int = 0) -> list[str]:
    """Multi-line documents without blank lines; one holds the literal text "[EOT]", which stays text."""
    rng = random.Random(seed)
    words = "the a fox cat runs jumps over lazy dog river café naïve 東京 🚀 sees quickly".split()
    docs = ["\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
                      for _ in range(rng.randint(1, 3))) for _ in range(n)]
    docs[5] = "a document that mentions [EOT] and [BOT] as plain text"
    return docs


DOCS = make_docs()


@pytest.fixture(autouse=True)
def hf_cache(tmp_path_factory, monkeypatch):
    """Keep the datasets Arrow cache out of ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-cache"))


# --- writing each input kind -----------------------------------------------------------------------

def write_txt(folder: Path):
    (folder / "corpus.txt").write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    return folder / "corpus.txt", {}


def write_jsonl(folder: Path):
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i, doc in enumerate(DOCS):
            f.write(json.dumps({"id": i, "body": doc}) + "\n")
    return folder / "corpus.jsonl", {"text_field": "body"}


def write_json(folder: Path):
    (folder / "corpus.json").write_text(json.dumps([{"text": d, "n": i} for i, d in enumerate(DOCS)]))
    return folder / "corpus.json", {}


def write_csv(folder: Path):
    with open(folder / "corpus.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "text"])
        writer.writerows([i % 2, doc] for i, doc in enumerate(DOCS))
    return folder / "corpus.csv", {}


def write_parquet(folder: Path):
    pq.write_table(pa.table({"text": DOCS}), folder / "corpus.parquet")
    return folder / "corpus.parquet", {}


def write_folder(folder: Path):
    """Two .txt files in nested folders, TinyStories-style separators, plus files that must be skipped."""
    (folder / "corpus" / "part2").mkdir(parents=True)
    (folder / "corpus" / "a.txt").write_text("\n<|endoftext|>\n".join(DOCS[:25]), encoding="utf-8")
    (folder / "corpus" / "part2" / "b.txt").write_text("\n<|endoftext|>\n".join(DOCS[25:]) + "\n<|endoftext|>\n")
    (folder / "corpus" / "README.md").write_text("not a document")
    (folder / "corpus" / ".hidden.txt").write_text("not a document either")
    (folder / "corpus" / "empty.txt").write_text("")
    return folder / "corpus", {"doc_sep": "<|endoftext|>"}


def write_wikiextractor(folder: Path):
    """WikiExtractor's layout: AA/wiki_00, ... without an extension, <doc ...> blocks with a title line."""
    (folder / "wiki" / "AA").mkdir(parents=True)
    for part, docs in enumerate((DOCS[:20], DOCS[20:])):
        blocks = [f'<doc id="{i}" url="u?curid={i}" title="T{i}">\n{doc}\n</doc>\n' for i, doc in enumerate(docs)]
        (folder / "wiki" / "AA" / f"wiki_{part:02d}").write_text("".join(blocks), encoding="utf-8")
    return folder / "wiki", {"doc_sep": "wikiextractor"}


WRITERS = {f.__name__.removeprefix("write_"): f for f in
           (write_txt, write_jsonl, write_json, write_csv, write_parquet, write_folder, write_wikiextractor)}


def split_docs(folder: Path, split: str) -> list[list[int]]:
    """The token ids of each document in a split's shards, checking that [BOT] ... [EOT] frames each one."""
    meta = json.loads((folder / "meta.json").read_text())
    files = [folder / shard["file"] for shard in meta["splits"][split]["shards"]]
    tokens = np.concatenate([np.fromfile(f, dtype=meta["dtype"]) for f in files] or [np.zeros(0, np.uint16)])
    starts, = np.nonzero(tokens == meta["bot_id"])
    ends, = np.nonzero(tokens == meta["eot_id"])
    assert len(starts) == len(ends) and (starts[1:] == ends[:-1] + 1).all()
    assert len(tokens) == 0 or (starts[0], ends[-1]) == (0, len(tokens) - 1)
    return [tokens[s + 1:e].tolist() for s, e in zip(starts, ends)]


@pytest.mark.parametrize("kind", WRITERS)
def test_prepare_each_input_kind(tmp_path, kind):
    source, options = WRITERS[kind](tmp_path)
    result = prepare(str(source), tmp_path / "out", vocab_size=300, val_docs=4, seed=1, **options)
    meta, out = result.meta, tmp_path / "out"
    tok = Tokenizer.load(out)
    train = [tok.decode(ids) for ids in split_docs(out, "train")]
    val = [tok.decode(ids) for ids in split_docs(out, "val")]
    assert sorted(train + val) == sorted(DOCS) and len(val) == 4
    assert train == [d for d in DOCS if d in train] and val == [d for d in DOCS if d in val]  # corpus order
    for name, docs in (("train", train), ("val", val)):
        split = meta["splits"][name]
        assert split["documents"] == len(docs)
        assert split["tokens"] == sum(len(tok.encode(d)) + 2 for d in docs)
        assert split["tokens"] == sum(s["tokens"] for s in split["shards"])
        assert split["bytes"] == sum(len(d.encode()) for d in docs)
    assert (meta["dtype"], meta["vocab_size"], meta["bot_id"], meta["eot_id"]) == ("uint16", tok.vocab_size, 1, 2)
    assert json.loads((out / "meta.json").read_text()) == meta
    assert not list(out.glob("*.tmp"))


def test_split_text():
    text = "a\nb\n\n\nc\n  \t\nd\n\n"
    assert split_text(text, "blank") == ["a\nb", "c", "d"]
    assert split_text(text, "line") == ["a", "b", "c", "d"]
    assert split_text(text, "file") == ["a\nb\n\n\nc\n  \t\nd"]
    assert split_text("One.\n<|endoftext|>\nTwo\nlines.\n<|endoftext|>\n", "<|endoftext|>") == ["One.", "Two\nlines."]
    wiki = '<doc id="1" url="u" title="A">\nA\n\nText <b>.\n</doc>\n<doc id="2" title="B">\nB\n</doc>\n'
    assert split_text(wiki, "wikiextractor") == ["A\n\nText <b>.", "B"]
    with pytest.raises(ValueError, match=r"^doc_sep='' is empty; pass one of blank, line, file, wikiextractor"):
        split_text(text, "")


def test_token_dtype():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def word_tokenizer(folder: Path, size: int, specials: tuple[str, ...]) -> Path:
    """A word-level tokenizer.json with `size` words w0, w1, ... after the given special tokens."""
    vocab = {t: i for i, t in enumerate(specials)} | {f"w{i}": len(specials) + i for i in range(size)}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(list(specials))
    backend.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def test_uint32_shards_for_a_big_vocabulary(tmp_path):
    file = word_tokenizer(tmp_path, 70_000, ("[PAD]", "[BOT]", "[EOT]"))
    (tmp_path / "c.txt").write_text("w69999 w1\n\nw65534 w65535 w3\n\nw7\n")
    meta = prepare(str(tmp_path / "c.txt"), tmp_path / "out", tokenizer=file, val_docs=0).meta
    assert (meta["dtype"], meta["vocab_size"]) == ("uint32", 70_003)
    assert split_docs(tmp_path / "out", "train") == [[70002, 4], [65537, 65538, 6], [10]]
    assert meta["splits"]["val"] == {"documents": 0, "tokens": 0, "bytes": 0, "shards": []}


def test_rerun_is_a_noop_until_inputs_or_settings_change(tmp_path):
    source, _ = write_txt(tmp_path)
    out = tmp_path / "out"
    first = prepare(str(source), out, vocab_size=300, shard_tokens=200)
    assert not first.up_to_date and len(first.meta["splits"]["train"]["shards"]) > 2
    mtimes = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    again = prepare(str(source), out, vocab_size=300, shard_tokens=200)
    assert again.up_to_date and again.meta == first.meta
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == mtimes
    forced = prepare(str(source), out, vocab_size=300, shard_tokens=200, force=True)
    assert not forced.up_to_date and forced.meta["splits"] == first.meta["splits"]
    assert all(f.stat().st_mtime_ns != mtimes[f.name] for f in out.glob("*.bin"))
    # Another setting rebuilds, and shards of the old, longer layout are removed.
    fewer = prepare(str(source), out, vocab_size=300, shard_tokens=10_000)
    assert not fewer.up_to_date and sorted(f.name for f in out.glob("*.bin")) == ["train_000000.bin", "val_000000.bin"]
    # A failing run leaves the output as it was.
    with pytest.raises(ValueError, match="leave none for training"):
        prepare(str(source), out, vocab_size=300, shard_tokens=10_000, val_docs=100)
    assert prepare(str(source), out, vocab_size=300, shard_tokens=10_000).up_to_date
    # A changed input rebuilds.
    source.write_text("\n\n".join(DOCS[:30]))
    assert not prepare(str(source), out, vocab_size=300, shard_tokens=10_000).up_to_date


def test_reuse_a_tokenizer(tmp_path):
    source, _ = write_txt(tmp_path)
    trained = prepare(str(source), tmp_path / "a", vocab_size=300).meta
    reused = prepare(str(source), tmp_path / "b", tokenizer=tmp_path / "a").meta  # a folder holding tokenizer.json
    assert trained["tokenizer"]["trained"] and not reused["tokenizer"]["trained"]
    assert reused["splits"] == trained["splits"] and reused["tokenizer"]["sha256"] == trained["tokenizer"]["sha256"]
    for split in ("train", "val"):
        assert split_docs(tmp_path / "a", split) == split_docs(tmp_path / "b", split)


def test_reused_tokenizer_needs_document_tokens(tmp_path):
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(DOCS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.save(str(tmp_path / "gpt.json"))
    source, _ = write_txt(tmp_path)
    with pytest.raises(ValueError) as error:
        prepare(str(source), tmp_path / "out", tokenizer=tmp_path / "gpt.json")
    assert str(error.value) == (f"the tokenizer at '{tmp_path / 'gpt.json'}' has no [BOT] token, and its "
                                "tokenizer_config.json names none in its place; pass --bot-token with one of its "
                                "special tokens: '<|endoftext|>'")
    meta = prepare(str(source), tmp_path / "out", tokenizer=tmp_path / "gpt.json", bot_token="<|endoftext|>",
                   eot_token="<|endoftext|>").meta
    assert meta["bot_id"] == meta["eot_id"] == 0


def test_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        prepare(str(tmp_path / "missing.txt"), tmp_path / "out")
    assert str(error.value) == (f"input '{tmp_path / 'missing.txt'}' does not exist; pass a file or folder (.txt, "
                                ".json, .jsonl, .csv or .parquet) or a Hugging Face dataset id such as "
                                "'roneneldan/TinyStories'")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError) as error:
        prepare(str(tmp_path / "empty.txt"), tmp_path / "out")
    assert str(error.value) == f"no documents in '{tmp_path / 'empty.txt'}': its files are empty"
    (tmp_path / "blank.jsonl").write_text('{"text": "  "}\n{"text": "\\n"}\n')
    with pytest.raises(ValueError) as error:
        prepare(str(tmp_path / "blank.jsonl"), tmp_path / "out")
    assert str(error.value) == f"no documents in '{tmp_path / 'blank.jsonl'}': every text is empty or whitespace"
    source, _ = write_jsonl(tmp_path)
    with pytest.raises(ValueError) as error:
        prepare(str(source), tmp_path / "out")
    assert str(error.value) == (f"no field 'text' in 1 json file from '{source}'; its fields are 'id', 'body': "
                                "pass one as --text-field")
    with pytest.raises(ValueError) as error:
        prepare(str(source), tmp_path / "out", text_field="id")
    assert str(error.value) == (f"field 'id' in 1 json file from '{source}' holds Value('int64'), not text; "
                                "pass a text field as --text-field")
    with pytest.raises(ValueError) as error:
        prepare(str(source), tmp_path / "out", text_field="body", val_docs=40)
    assert str(error.value) == ("40 validation document(s) leave none for training: the corpus has 40; pass a "
                                "smaller --val-fraction or --val-docs (0 for no validation split)")
    write_csv(tmp_path)
    with pytest.raises(ValueError) as error:
        prepare(str(tmp_path), tmp_path / "out")
    assert str(error.value) == f"folder '{tmp_path}' mixes csv, json, text files; pass --format to pick one kind"
    assert not (tmp_path / "out" / "meta.json").exists()


def test_prepare_deletes_and_replaces_only_what_it_wrote(tmp_path, monkeypatch):
    """prepare deleted any file named like a shard in --out. What it wrote is what its meta.json lists (while it
    writes, every file before it creates it): a file of someone else's named like a shard is refused, nothing
    deleted; a prepare stopped halfway leaves a folder train.py refuses, which the next prepare rebuilds."""
    import llama.data

    source, _ = write_txt(tmp_path)
    out = tmp_path / "out"
    prepare(str(source), out, vocab_size=300, shard_tokens=200)
    written = sorted(f.name for f in out.iterdir())
    (out / "train_000999.bin").write_bytes(b"mine")
    with pytest.raises(ValueError) as error:
        prepare(str(source), out, vocab_size=300, shard_tokens=200, force=True)
    assert str(error.value) == (f"{out} holds files that data/prepare.py did not write (train_000999.bin); prepare "
                                "into a new or empty folder (nothing of those is deleted)")
    assert (out / "train_000999.bin").read_bytes() == b"mine" and sorted(f.name for f in out.iterdir()) == sorted(
        [*written, "train_000999.bin"])
    (out / "train_000999.bin").unlink()

    finish = llama.data._ShardWriter._finish
    calls = []

    def stop_at_the_third_shard(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        finish(self)

    monkeypatch.setattr(llama.data._ShardWriter, "_finish", stop_at_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(source), out, vocab_size=300, shard_tokens=100, force=True)
    monkeypatch.undo()
    journal = json.loads((out / "meta.json").read_text())
    assert journal["unfinished"] and "train_000002.bin.tmp" in journal["files"]
    assert (out / "train_000002.bin.tmp").exists()
    with pytest.raises(ValueError) as error:
        TokenShards(out)
    assert str(error.value) == (f"{out} is only partly prepared: data/prepare.py stopped before it finished; run it "
                                "again")
    result = prepare(str(source), out, vocab_size=300, shard_tokens=100)
    assert not result.up_to_date
    listed = {shard["file"] for split in result.meta["splits"].values() for shard in split["shards"]}
    assert {f.name for f in out.iterdir()} == listed | {"meta.json", "tokenizer.json", "tokenizer_config.json"}
    assert len(TokenShards(out)) == result.meta["splits"]["train"]["tokens"]


def test_find_source():
    assert find_source("roneneldan/TinyStories").kind == "hub"  # resolving it needs no network
    assert find_source("wikitext", hub_config="wikitext-2-raw-v1").describe() == \
        "Hugging Face dataset 'wikitext' (split 'train', config 'wikitext-2-raw-v1')"
    with pytest.raises(FileNotFoundError):
        find_source("not/here.jsonl")


def test_cli(tmp_path, capsys):
    source, _ = write_txt(tmp_path)
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(ROOT / "data" / "prepare.py"), "--input", str(source), "--out", str(out),
                          "--vocab-size", "300", "--val-docs", "3"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "train: " in run.stdout and " tokens/s; wrote " in run.stdout
    assert json.loads((out / "meta.json").read_text())["splits"]["val"]["documents"] == 3

    from llama.cli import prepare as cli

    assert cli.main(["--input", str(source), "--out", str(out), "--vocab-size", "300", "--val-docs", "3"]) == 0
    assert capsys.readouterr().out == f"{out} is up to date (same inputs and settings); pass --force to rebuild it\n"
    assert cli.main(["--input", str(tmp_path / "nope.csv"), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"error: input '{tmp_path / 'nope.csv'}' does not exist; pass a file or folder (.txt, "
                            ".json, .jsonl, .csv or .parquet) or a Hugging Face dataset id such as "
                            "'roneneldan/TinyStories'\n")
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    help_text = capsys.readouterr().out
    for flag in ("--input", "--out", "--format", "--text-field", "--doc-sep", "--hub-split", "--hub-config",
                 "--val-fraction", "--val-docs", "--seed", "--vocab-size", "--tokenizer", "--bot-token",
                 "--eot-token", "--shard-tokens", "--force"):
        assert flag in help_text


@pytest.mark.skipif(not (SHARED_DATA / "tinyshakespeare").is_dir(), reason="no shared/data/tinyshakespeare here")
def test_prepare_tinyshakespeare(tmp_path):
    meta = prepare(str(SHARED_DATA / "tinyshakespeare"), tmp_path, vocab_size=300).meta
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    text = (SHARED_DATA / "tinyshakespeare" / "input.txt").read_text()
    speeches = [block.strip("\n") for block in text.split("\n\n")]
    assert train["documents"] + val["documents"] == len(speeches) == 7222  # blocks between blank lines
    assert val["documents"] == 361 and train["bytes"] + val["bytes"] == sum(map(len, speeches))
    first = Tokenizer.load(tmp_path).decode(split_docs(tmp_path, "train")[0])
    assert first == "First Citizen:\nBefore we proceed any further, hear me speak."


# --- reading ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A prepared folder whose splits span several small shards, so windows cross shard boundaries."""
    folder = tmp_path_factory.mktemp("prepared")
    (folder / "c.txt").write_text("\n\n".join(make_docs(200, seed=3)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(folder / "hf-cache"))
        prepare(str(folder / "c.txt"), folder / "out", vocab_size=300, val_docs=40, shard_tokens=97)
    return folder / "out"


def all_tokens(folder: Path, split: str) -> np.ndarray:
    meta = json.loads((folder / "meta.json").read_text())
    return np.concatenate([np.fromfile(folder / s["file"], dtype=np.uint16) for s in meta["splits"][split]["shards"]])


def test_token_shards(prepared):
    shards, tokens = TokenShards(prepared, "train"), all_tokens(prepared, "train")
    assert len(shards.shards) > 10 and len(shards) == shards.num_tokens == len(tokens)
    meta = json.loads((prepared / "meta.json").read_text())
    assert (shards.vocab_size, shards.dtype) == (meta["vocab_size"], np.uint16)
    assert shards.tokenizer_file == prepared / "tokenizer.json"
    for start, length in ((0, len(tokens)), (90, 20), (96, 1), (97, 97), (5, 400), (len(tokens) - 3, 3), (7, 0)):
        assert np.array_equal(shards.read(start, length), tokens[start:start + length])
    with pytest.raises(ValueError, match=r"^window \[\d+, \d+\) is outside split 'train', which holds \d+ tokens$"):
        shards.read(len(tokens) - 2, 3)
    with pytest.raises(ValueError, match=r"^no split 'test' in .*meta.json; it has 'train', 'val'$"):
        TokenShards(prepared, "test")
    with pytest.raises(FileNotFoundError, match=r"^no meta.json in '.*'; prepare the data first"):
        TokenShards(prepared / "nothing")


def test_windows_are_real_slices(prepared):
    tokens, seq_len = all_tokens(prepared, "train"), 64
    batch = next(PretrainLoader(TokenShards(prepared), batch_size=4, seq_len=seq_len, seed=3))
    assert batch.input_ids.shape == batch.targets.shape == batch.loss_mask.shape == (4, seq_len)
    assert batch.input_ids.dtype == batch.targets.dtype == torch.int64 and batch.doc_ids is None
    assert batch.loss_mask.dtype == torch.bool and batch.loss_mask.all()
    assert torch.equal(batch.input_ids[:, 1:], batch.targets[:, :-1])
    all_windows = np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)
    for row in torch.cat([batch.input_ids, batch.targets[:, -1:]], dim=1).numpy():
        assert (all_windows == row).all(axis=1).any()


def take(loader, n: int):
    return [next(loader) for _ in range(n)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x.input_ids, y.input_ids) and torch.equal(x.targets, y.targets)
                                    for x, y in zip(a, b))


def test_ranks_are_distinct_and_deterministic(prepared):
    shards = TokenShards(prepared)

    def batches(**options):
        return take(PretrainLoader(shards, 4, 32, world_size=2, **options), 3)

    assert same(batches(rank=0), batches(rank=0))
    assert not same(batches(rank=0), batches(rank=1)) and not same(batches(rank=0), batches(rank=0, seed=1))
    assert not same(batches(rank=0, sequential=True), batches(rank=1, sequential=True))


@pytest.mark.parametrize("sequential", [False, True])
def test_ranks_together_read_what_one_process_reads_with_the_global_batch(prepared, sequential):
    shards = TokenShards(prepared)
    ranks = [take(PretrainLoader(shards, 3, 32, rank=r, world_size=2, sequential=sequential), 4) for r in (0, 1)]
    single = take(PretrainLoader(shards, 6, 32, sequential=sequential), 4)
    for step in range(4):
        assert torch.equal(torch.cat([ranks[0][step].input_ids, ranks[1][step].input_ids]), single[step].input_ids)


@pytest.mark.parametrize("sequential", [False, True])
def test_state_dict_resumes_exactly(prepared, sequential):
    shards = TokenShards(prepared)
    loader = PretrainLoader(shards, 4, 32, rank=1, world_size=2, seed=5, sequential=sequential)
    take(loader, 3)
    state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON checkpoint
    expected = take(loader, 5)
    resumed = PretrainLoader(shards, 4, 32, rank=1, world_size=2, seed=5, sequential=sequential)
    resumed.load_state_dict(state)
    assert same(take(resumed, 5), expected)
    other = PretrainLoader(shards, 4, 16, rank=1, world_size=2, seed=5, sequential=sequential)
    with pytest.raises(ValueError) as error:
        other.load_state_dict(state)
    assert str(error.value) == ("the data state was saved with seq_len=32, but this loader has seq_len=16; "
                                "resume with the same data and settings")


def test_sequential_reads_in_order_and_wraps(prepared):
    shards, tokens, T, B = TokenShards(prepared), all_tokens(prepared, "train"), 50, 3
    windows = (len(tokens) - 1) // T
    loader = PretrainLoader(shards, B, T, sequential=True)
    batches = take(loader, windows // B + 2)
    inputs = torch.cat([b.input_ids for b in batches]).flatten().numpy()
    targets = torch.cat([b.targets for b in batches]).flatten().numpy()
    assert np.array_equal(inputs[:windows * T], tokens[:windows * T])
    assert np.array_equal(targets[:windows * T], tokens[1:windows * T + 1])
    assert np.array_equal(inputs[windows * T:2 * windows * T], tokens[:len(inputs) - windows * T])  # wrapped
    # Two ranks take turns: together they read the same windows in the same order.
    ranks = [PretrainLoader(shards, B, T, rank=r, world_size=2, sequential=True) for r in (0, 1)]
    interleaved = [batch for _ in range(2) for batch in (next(ranks[0]), next(ranks[1]))]
    assert same(interleaved, batches[:4])


def test_eval_batches_are_the_fixed_start_of_val(prepared):
    shards, tokens = TokenShards(prepared, "val"), all_tokens(prepared, "val")
    batches = eval_batches(shards, batch_size=4, seq_len=32, max_tokens=32 * 10)
    assert [b.input_ids.shape[0] for b in batches] == [4, 4, 2]
    assert same(batches, eval_batches(shards, batch_size=4, seq_len=32, max_tokens=32 * 10))
    assert np.array_equal(torch.cat([b.input_ids for b in batches]).flatten().numpy(), tokens[:320])
    assert sum(b.num_counted for b in batches) == 320
    everything = eval_batches(shards, batch_size=4, seq_len=32, max_tokens=10**9)
    assert sum(b.num_counted for b in everything) == (len(tokens) - 1) // 32 * 32
    with pytest.raises(ValueError, match=r"^batch_size=4 and max_tokens=31 leave no window of seq_len=32"):
        eval_batches(shards, batch_size=4, seq_len=32, max_tokens=31)


def test_loader_errors(prepared):
    shards = TokenShards(prepared, "val")
    with pytest.raises(ValueError) as error:
        PretrainLoader(shards, 2, len(shards))
    assert str(error.value) == (f"seq_len={len(shards)} does not fit split 'val' of '{prepared}', which holds "
                                f"{len(shards)} tokens; pass 1 <= seq_len <= {len(shards) - 1}")
    with pytest.raises(ValueError, match=r"^rank=2 is out of range for world_size=2"):
        PretrainLoader(shards, 2, 8, rank=2, world_size=2)


def test_check_vocab_size(prepared):
    shards = TokenShards(prepared)
    check_vocab_size(shards, shards.vocab_size)
    with pytest.raises(ValueError) as error:
        check_vocab_size(shards, 256)
    assert str(error.value) == (f"the token shards in '{prepared}' use a vocabulary of {shards.vocab_size} tokens, "
                                f"more than the model's vocab_size=256; use a model with vocab_size >= "
                                f"{shards.vocab_size}, or prepare the data with that model's tokenizer")


def test_damaged_shards_are_caught_where_batches_are_made(prepared, tmp_path):
    """The training step never checks ids (each check would wait for a GPU): the loader does, on the CPU."""
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for file in prepared.iterdir():
        if file.is_file():
            (damaged / file.name).write_bytes(file.read_bytes())
    meta = json.loads((damaged / "meta.json").read_text())
    first = damaged / meta["splits"]["val"]["shards"][0]["file"]
    tokens = np.fromfile(first, dtype=np.uint16)
    tokens[3] = 999  # beyond the 300-token vocabulary meta.json gives
    tokens.tofile(first)
    loader = PretrainLoader(TokenShards(damaged, "val"), 2, 8, sequential=True)
    with pytest.raises(ValueError) as error:
        next(loader)
    assert str(error.value) == (f"split 'val' of '{damaged}' holds token id 999, out of range for vocab_size 300 "
                                "(ids must be in [0, 299]); its shards do not match the vocabulary meta.json gives: "
                                "prepare the folder again with --force")
    with pytest.raises(ValueError, match="holds token id 999"):
        eval_batches(TokenShards(damaged, "val"), batch_size=2, seq_len=8, max_tokens=64)
