"""Where each public dataset of the experiments comes from, and how its rows become the files our scripts read.

Every dataset is a folder NAME/ in the layout of the project's copies in ../shared/data, so an experiment
reads a downloaded folder and a shared one alike. It comes from one of two kinds of origin:

- `Hub`: a Hugging Face dataset, the one the article loaded, read with `datasets.load_dataset`. Its
  dataset's `write` turns the hub's rows into the files our scripts read, mapping the columns (each
  writer cites the dataset card it took the column names from).
- `Remote`: files fetched over HTTPS from a pinned commit of a public repository, where no hub copy has
  what the experiments read (the Star Trek transcripts, the Wikipedia and TinyStories samples, ...).
  Each file's sha256 is in data/sources.sha256; a file with another checksum is deleted and the download
  stops with one line saying so. Checked files wait in DIR/.cache/ until their folder is complete, so a
  download that was stopped fetches only what is still missing; a cached file is used only if its content
  still has its sha256 (else it is deleted and fetched again).

`download` writes a dataset's folder all at once (llama/files.py's atomic_folder): an interrupted
download, Ctrl-C included, leaves no folder behind, and a folder with its PROVENANCE.md (written last:
source, revision or checksums, license, rows) is complete and is never fetched again. What a killed
download left (its hidden temporary folder) is deleted by the next one (llama/files.py's clean_orphans).
Offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set, the Hugging Face libraries' own switches) nothing is
fetched: what is not here yet is `Unavailable`, as it is when the network fails; a machine that cannot
reach the Hugging Face Hub is told so at once, not after its client's retries.

data/sources.sha256 also holds, for the files that a download writes from the hub's rows or derives
(Alpaca's alpaca_data.json, oasst1's top-1 threads, Spock's lines, PIQA's and GSM8K's evaluation files), the
checksum they have when the rows
equal those of ../shared/data, on which the results in docs/experiments.md were measured; a download
whose file differs says so, in one line and in PROVENANCE.md.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import html
import io
import json
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from llama.files import atomic_folder, clean_orphans
from llama.rows import PROJECT_DATA, hub_unreachable  # PROJECT_DATA: data/ of the repository, this folder

CHECKSUMS = Path(__file__).with_name("sources.sha256")
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
PROVENANCE = "PROVENANCE.md"  # written last: a folder that has it is complete
CACHE = ".cache"  # DIR/.cache/SHA256: fetched and checked files of folders not yet complete (checked again on use)
CHUNK = 1 << 20


class Unavailable(ConnectionError):
    """Data that is not here and cannot be fetched now: offline, or the network or the source failed."""


class ChecksumMismatch(ValueError):
    """A fetched file whose sha256 is not the one in data/sources.sha256 (it has been deleted)."""


@dataclasses.dataclass(frozen=True)
class Remote:
    """Files fetched over HTTPS from one pinned base URL: (path in the folder, path under `base`) pairs."""

    base: str
    files: tuple[tuple[str, str], ...]
    commit: str = ""  # the pinned commit, for PROVENANCE.md

    def url(self, remote: str) -> str:
        return self.base + remote


@dataclasses.dataclass(frozen=True)
class Hub:
    """A Hugging Face dataset: `datasets.load_dataset(repo, config, split=split, revision=revision)` per split.

    `repo` may also be a local folder laid out as the hub's repository (the tests use one)."""

    repo: str
    config: str | None = None
    splits: tuple[str, ...] = ("train",)
    revision: str | None = None  # None: the hub's main, whose commit the download records


Writer = Callable[[Path, Mapping[str, Iterable[Mapping[str, Any]]]], dict[str, int]]


@dataclasses.dataclass(frozen=True)
class PublicDataset:
    """One dataset: its folder name, where it comes from, and how its rows become the folder's files.

    For a `Hub` origin, `write(folder, {split: rows})` writes the files and returns {file: rows}. For a
    `Remote` one, `write(folder, {})` runs after the files are fetched, to derive files from them (or is
    None), and `count(folder)` describes the rows for PROVENANCE.md.
    """

    name: str
    title: str
    origin: Remote | Hub
    license: str
    card: str  # where the column names and formats were taken from
    write: Writer | None = None
    count: Callable[[Path], str] | None = None
    notes: str = ""  # how the rows became the files, for PROVENANCE.md
    size: str = ""
    in_all: bool = True


# --- where the bytes come from --------------------------------------------------------------------

def offline() -> str | None:
    """The offline switch that is set (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE, to 1, true, yes or on), or None."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return name
    return None


def fetch_url(url: str, destination: Path, progress: bool = True) -> None:
    """Stream `url` (https://, or file:// for a local mirror) into `destination`, with a bytes bar."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(destination, "wb") as out:
            total = response.headers.get("Content-Length")
            with tqdm(total=int(total) if total else None, unit="B", unit_scale=True, leave=False,
                      desc=url.rsplit("/", 1)[-1], disable=not progress) as bar:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        reason = getattr(error, "reason", error)
        raise Unavailable(f"cannot fetch {url}: {reason}") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checksums() -> dict[str, str]:
    """NAME/PATH -> sha256, from data/sources.sha256 (sha256sum's format, relative to a data folder)."""
    table = {}
    for line in CHECKSUMS.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            digest, path = line.split(maxsplit=1)
            table[path.strip()] = digest
    return table


def fetch_checked(url: str, sha256: str, destination: Path, cache: Path, fetch: Callable[..., None],
                  progress: bool) -> None:
    """The file with this sha256 at `destination` (inside a folder being written), and kept in `cache` until
    the dataset is complete, so that a download that was stopped does not fetch it again.

    A file in the cache is used only when its content has the sha256 it is named after; one that has not
    (torn by a kill, or changed) is deleted and fetched again. A fetch goes straight to `destination`, in the
    dataset's temporary folder, which an interruption (or a later start, after a kill) deletes whole: the
    cache only ever receives whole files, checked.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    kept = cache / sha256
    if kept.is_file():
        if sha256_of(kept) == sha256:
            place(kept, destination)
            return
        kept.unlink()  # ours, and not what its name says: fetched again below
    if not url.startswith("file:") and (switch := offline()):  # a file:// mirror is no network
        raise Unavailable(f"offline: {switch} is set, so {url} cannot be fetched")
    try:
        fetch(url, destination, progress)
        actual = sha256_of(destination)
    except BaseException:
        destination.unlink(missing_ok=True)
        raise
    if actual != sha256:
        destination.unlink()
        raise ChecksumMismatch(f"{url} has sha256 {actual}, not the expected {sha256}: deleted the download; "
                               "the source changed or the transfer was corrupted, so try again, or report it")
    cache.mkdir(parents=True, exist_ok=True)
    place(destination, kept)


def place(source: Path, destination: Path) -> None:
    """`source` at `destination` too: a hard link where the file system allows, else a copy (which a kill may
    tear: the cache's files are checked before use)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, destination)
    except FileExistsError:  # a file of the same content, cached by a download running beside this one
        return
    except OSError:
        shutil.copyfile(source, destination)


def load_split(hub: Hub, split: str, revision: str | None) -> Any:
    """One split of a hub dataset (or of a local folder in the hub's layout), with `datasets`' own bars."""
    if not Path(hub.repo).exists() and (switch := offline()):
        raise Unavailable(f"offline: {switch} is set, so the Hugging Face dataset {hub.repo} cannot be fetched")
    import datasets  # only here: reading local files must not pay for its import

    try:
        return datasets.load_dataset(hub.repo, hub.config, split=split, revision=revision)
    except Exception as error:  # the hub's own errors (network, not found, gated, HTTP): one line with the reason
        raise Unavailable(f"cannot load the Hugging Face dataset {hub.repo} (split {split}): "
                          f"{type(error).__name__}: {' '.join(str(error).split())}") from None


def reachable(hub: Hub, name: str, root: Path) -> None:
    """Raise Unavailable at once, in one line, when the Hugging Face Hub cannot be reached: its client would
    retry for half a minute before saying so."""
    if switch := offline():
        raise Unavailable(f"offline: {switch} is set, so the Hugging Face dataset {hub.repo} cannot be fetched")
    if why := hub_unreachable():
        raise Unavailable(f"the Hugging Face dataset {hub.repo} cannot be fetched: {why}; run `python3 "
                          f"data/download.py {name}` where there is a network and copy its folder {name}/ into "
                          f"{root}")


def hub_commit(hub: Hub) -> str | None:
    """The commit that `hub.revision` (None: main) names now, so the rows and PROVENANCE.md agree; None for a
    local folder, or when the hub does not say."""
    if Path(hub.repo).exists() or offline():
        return None
    if hub.revision and re.fullmatch(r"[0-9a-f]{40}", hub.revision):
        return hub.revision
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(hub.repo, revision=hub.revision).sha
    except Exception:  # an unpinned download still works; its PROVENANCE.md says the commit is not recorded
        return None


# --- downloading a dataset ------------------------------------------------------------------------

def dataset(name: str) -> PublicDataset:
    """The dataset called `name`; an unknown name is an error that lists the known ones."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; the known ones are {', '.join(DATASETS)} (or all)")
    return DATASETS[name]


def is_complete(folder: Path) -> bool:
    """Whether `folder` is a finished download: its PROVENANCE.md is written last, into a folder that
    appears whole."""
    return (folder / PROVENANCE).is_file()


def download(which: str | PublicDataset, root: str | Path = PROJECT_DATA, *, progress: bool = True,
             fetch: Callable[..., None] | None = None, load: Callable[..., Any] | None = None) -> Path:
    """ROOT/NAME, fetched from the dataset's source unless it is complete there already.

    `fetch(url, path, progress)` and `load(hub, split, revision)` default to fetch_url and load_split.
    Raises Unavailable (offline, network), ChecksumMismatch, or ValueError for a folder in the way.
    """
    data = dataset(which) if isinstance(which, str) else which
    root = Path(root)
    folder = root / data.name
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if progress else (lambda line: None)
    clean_orphans(root)  # the temporary folders of downloads that were killed (a stop by Ctrl-C leaves none)
    if is_complete(folder):
        say(f"{data.name}: {folder} is complete already (delete it to fetch it again)")
        return folder
    if folder.exists():
        raise ValueError(f"{folder} exists but is not a finished download (it has no {PROVENANCE}): move it "
                         "away, or download into another folder with --out")
    origin = data.origin
    where = origin.base if isinstance(origin, Remote) else f"the Hugging Face dataset {origin.repo}"
    say(f"{data.name}: {data.title}, from {where} into {folder}")
    if isinstance(origin, Hub) and not Path(origin.repo).exists() and load is None:
        reachable(origin, data.name, root)
    cached: list[Path] = []
    with atomic_folder(folder) as temporary:
        if isinstance(origin, Remote):
            table = checksums()
            fetch = fetch or fetch_url
            for path, remote in tqdm(origin.files, unit="file", desc=data.name, disable=not progress or
                                     len(origin.files) < 2):
                key = f"{data.name}/{path}"
                if key not in table:
                    raise ValueError(f"{CHECKSUMS} has no sha256 for {key}: add it (sha256sum's format)")
                # one bytes bar for a lone file; a dataset of many files shows the files bar alone
                fetch_checked(origin.url(remote), table[key], temporary / path, root / CACHE, fetch,
                              progress and len(origin.files) == 1)
                cached.append(root / CACHE / table[key])
            rows = data.write(temporary, {}) if data.write else {}
            described = data.count(temporary) if data.count else ""
            revision = None
        else:
            revision = hub_commit(origin)
            load = load or load_split
            splits = {split: load(origin, split, revision or origin.revision) for split in origin.splits}
            rows = data.write(temporary, splits)
            described = "; ".join(f"{split} {len(rows_of):,}" for split, rows_of in splits.items()
                                  if hasattr(rows_of, "__len__"))
        differences = compare(data.name, temporary, rows)
        for line in differences:
            say(f"warning: {line}")
        (temporary / PROVENANCE).write_text(provenance(data, temporary, rows, described, revision, differences),
                                            encoding="utf-8")
    for file in cached:  # the folder is in place: the cache has served its purpose
        file.unlink(missing_ok=True)
    try:
        (root / CACHE).rmdir()  # when nothing else waits there
    except OSError:
        pass
    say(f"{data.name}: wrote {folder}")
    return folder


def compare(name: str, folder: Path, written: Mapping[str, int]) -> list[str]:
    """One line per written or derived file whose sha256 differs from the one in data/sources.sha256."""
    table = checksums()
    lines = []
    for path in written:
        expected = table.get(f"{name}/{path}")
        if expected and (actual := sha256_of(folder / path)) != expected:
            lines.append(f"{name}/{path} has sha256 {actual}, not {expected}: its rows differ from those the "
                         "results in docs/experiments.md were measured on")
    return lines


def provenance(data: PublicDataset, folder: Path, rows: Mapping[str, int], described: str, revision: str | None,
               differences: Sequence[str]) -> str:
    """PROVENANCE.md of a downloaded folder: source, revision or checksums, license, rows, and each file."""
    origin = data.origin
    today = datetime.date.today().isoformat()
    lines = [f"# {data.name}: {data.title}", "",
             f"Written by `python3 data/download.py {data.name}` on {today}.", ""]
    if isinstance(origin, Remote):
        lines += [f"- Source: {origin.base}" + (f" (commit `{origin.commit}`)" if origin.commit else ""),
                  "- Checksums: every fetched file's sha256 matched data/sources.sha256 (listed below)"]
    else:
        config = f", config `{origin.config}`" if origin.config else ""
        if Path(origin.repo).exists():
            pinned = "a local folder in the hub's layout"
        elif revision:
            pinned = f"commit `{revision}`"
        else:
            pinned = f"`{origin.revision or 'main'}` (its commit was not recorded)"
        lines += [(f"- Source: Hugging Face dataset `{origin.repo}`{config}, splits {', '.join(origin.splits)}; "
                   f"revision: {pinned}")]
    lines += [f"- License (as its source states it): {data.license}", f"- Column names and formats: {data.card}"]
    if described:
        lines.append(f"- Rows: {described}")
    if data.notes:
        lines.append(f"- How the rows became these files: {data.notes}")
    lines += ["", "## Files", ""]
    table = checksums()
    for path in sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()):
        digest = sha256_of(folder / path)
        count = f", {rows[path]:,} rows" if path in rows else ""
        same = ""
        if path in rows and f"{data.name}/{path}" in table:
            same = (", identical to the copy the experiments' results were measured on"
                    if table[f"{data.name}/{path}"] == digest else ", **differs** from the copy the results were "
                    "measured on")
        lines.append(f"- `{path}`: {(folder / path).stat().st_size:,} bytes{count}, sha256 `{digest}`{same}")
    if differences:
        lines += ["", *(f"Warning: {line}" for line in differences)]
    return "\n".join(lines) + "\n"


# --- how rows become our files: the hub datasets ----------------------------------------------------

def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]], ensure_ascii: bool = True) -> int:
    """Rows as JSON lines; returns how many."""
    count = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=ensure_ascii) + "\n")
            count += 1
    return count


def write_alpaca(folder: Path, splits: Mapping[str, Iterable[Mapping[str, Any]]]) -> dict[str, int]:
    """tatsu-lab/alpaca's rows (instruction, input, output, and `text`, the three in the Alpaca prompt: its
    card, https://huggingface.co/datasets/tatsu-lab/alpaca) as upstream's alpaca_data.json, serialized as
    tatsu-lab/stanford_alpaca wrote it (json.dumps, indent 4): the same bytes when the rows are the same."""
    rows = [{"instruction": row["instruction"], "input": row["input"], "output": row["output"]}
            for row in splits["train"]]
    (folder / "alpaca_data.json").write_text(json.dumps(rows, indent=4), encoding="utf-8")
    return {"alpaca_data.json": len(rows)}


COLA_FILES = ("raw/in_domain_train.tsv", "raw/in_domain_dev.tsv", "raw/out_of_domain_dev.tsv")
COLA_IN_DOMAIN_DEV = 527  # of GLUE's 1,043 validation sentences; the other 516 are out-of-domain


def write_cola(folder: Path, splits: Mapping[str, Iterable[Mapping[str, Any]]]) -> dict[str, int]:
    """GLUE's CoLA (nyu-mll/glue, config cola: sentence, label 0 unacceptable / 1 acceptable, idx; its card,
    https://huggingface.co/datasets/nyu-mll/glue) as the raw TSV files of CoLA's public release (source, label,
    author's mark, sentence; cola_public's README), the two columns GLUE does not ship left empty.

    GLUE's validation split is CoLA's in_domain_dev.tsv (527 sentences) followed by out_of_domain_dev.tsv
    (516): its first row is in_domain_dev's first sentence ("The sailors rode the breeze clear of the
    rocks.", idx 0) and its last out_of_domain_dev's last ("John talked to Bill about himself."), as published
    transcripts of load_dataset("glue", "cola") show (e.g. richarddwang/hugdatafast, docs/source/start.rst).
    """
    train, validation = list(splits["train"]), list(splits["validation"])
    if len(validation) != 1043:
        raise ValueError(f"GLUE's CoLA validation split has {len(validation):,} rows, not CoLA's 527 in-domain + "
                         "516 out-of-domain dev sentences: the hub's copy changed; use the raw files of "
                         "nyu-mll/CoLA-baselines instead (--data-dir)")
    parts = dict(zip(COLA_FILES, (train, validation[:COLA_IN_DOMAIN_DEV], validation[COLA_IN_DOMAIN_DEV:])))
    for path, rows in parts.items():
        lines = []
        for row in rows:
            if row["label"] not in (0, 1) or re.search(r"[\t\n]", row["sentence"]):
                raise ValueError(f"CoLA row {row['idx']} of {path} cannot be a TSV line: label {row['label']!r}, "
                                 f"sentence {row['sentence']!r}")
            lines.append(f"\t{row['label']}\t\t{row['sentence']}\n")
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text("".join(lines), encoding="utf-8")
    return {path: len(rows) for path, rows in parts.items()}


def write_tweets(folder: Path, splits: Mapping[str, Iterable[Mapping[str, Any]]]) -> dict[str, int]:
    """mteb/tweet_sentiment_extraction's rows (id, text, label 0/1/2, label_text: its create_data.py copies
    the competition CSVs' textID, text and sentiment unchanged) as the competition's CSV columns textID,
    text, sentiment, under the names of the project's copy: train_10fold.csv and test.csv."""
    counts = {}
    for split, path in (("train", "train_10fold.csv"), ("test", "test.csv")):
        out = io.StringIO(newline="")
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(["textID", "text", "sentiment"])
        rows = [[row["id"], row["text"], row["label_text"]] for row in splits[split]]
        writer.writerows(rows)
        (folder / path).write_bytes(out.getvalue().encode("utf-8"))
        counts[path] = len(rows)
    return counts


OASST1_MESSAGES = "oasst1_validation_en_messages.jsonl"
OASST1_THREADS = "oasst1_validation_en_top1_threads.jsonl"
OASST1_ROLES = {"prompter": "user", "assistant": "assistant"}


def top1_threads(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The best-ranked conversation of each message tree, as ../shared/data/oasst1_en_validation's
    PROVENANCE.md derives them: from each root prompt (in file order), skipping deleted messages, follow the
    child with the lowest rank (unranked last, ties in file order) to a leaf, drop trailing user turns; roles
    prompter -> user. A tree left with no assistant turn is left out."""
    children: dict[str | None, list[Mapping[str, Any]]] = {}
    for message in messages:
        children.setdefault(message["parent_id"], []).append(message)
    threads = []
    for root in children.get(None, []):
        if root["deleted"]:
            continue
        path = [root]
        while kids := [kid for kid in children.get(path[-1]["message_id"], []) if not kid["deleted"]]:
            path.append(min(kids, key=lambda kid: (kid["rank"] is None, kid["rank"] or 0)))  # min: the first of ties
        while path and path[-1]["role"] == "prompter":
            path.pop()
        if path:
            threads.append({"message_tree_id": root["message_tree_id"],
                            "messages": [{"role": OASST1_ROLES[m["role"]], "content": m["text"]} for m in path]})
    return threads


def write_oasst1(folder: Path, splits: Mapping[str, Iterable[Mapping[str, Any]]]) -> dict[str, int]:
    """OpenAssistant/oasst1's validation messages (message_id, parent_id, text, role, lang, deleted, rank,
    message_tree_id, ...: its card, https://huggingface.co/datasets/OpenAssistant/oasst1) in English, one per
    line, and their top-1 threads, the conversations experiments/chat_sft.py trains on."""
    messages = [dict(row) for row in splits["validation"] if row["lang"] == "en"]
    return {OASST1_MESSAGES: write_jsonl(folder / OASST1_MESSAGES, messages, ensure_ascii=False),
            OASST1_THREADS: write_jsonl(folder / OASST1_THREADS, top1_threads(messages), ensure_ascii=False)}


def write_spock(folder: Path, splits: Mapping[str, Iterable[Mapping[str, Any]]]) -> dict[str, int]:
    """omgbobbyg/spock, the Spock article's own lines (title, original_airdate, production_number, dialogue: its
    card, https://huggingface.co/datasets/omgbobbyg/spock), one row per line with the line as `text`, the
    field our Spock lines have, in the article's train (3,476) and validation (869) splits."""
    return {f"{split}.jsonl": write_jsonl(folder / f"{split}.jsonl", (
        {"title": row["title"], "original_airdate": row["original_airdate"],
         "production_number": row["production_number"], "text": row["dialogue"]} for row in rows))
        for split, rows in splits.items()}


def write_ultrachat(folder: Path, splits: Mapping[str, Iterable[Mapping[str, Any]]]) -> dict[str, int]:
    """HuggingFaceH4/ultrachat_200k (prompt, prompt_id, messages: a list of {content, role}; its card,
    https://huggingface.co/datasets/HuggingFaceH4/ultrachat_200k) as {"prompt_id", "messages": [{"role",
    "content"}]} per line, the conversation rows finetune.py --format chat reads."""
    return {f"{split}.jsonl": write_jsonl(folder / f"{split}.jsonl", (
        {"prompt_id": row["prompt_id"],
         "messages": [{"role": message["role"], "content": message["content"]} for message in row["messages"]]}
        for row in tqdm(rows, unit="conversation", desc=split, leave=False)), ensure_ascii=False)
        for split, rows in splits.items()}


def jsonl_splits(files: Mapping[str, str], columns: Sequence[str] | None = None) -> Writer:
    """A writer of each split's rows to its file (files: {split: path}), one JSON object a line in the hub's row
    order: every column of the hub's, in its order (or just `columns`), nested values (lists, dicts) as JSON.
    Serialized with json.dumps' defaults (", " and ": ", non-ASCII as \\u escapes), as the benchmarks' own
    releases are, so no line holds a character that str.splitlines would split at."""
    def write(folder: Path, splits: Mapping[str, Iterable[Mapping[str, Any]]]) -> dict[str, int]:
        return {path: write_jsonl(folder / path, (
            dict(row) if columns is None else {column: row[column] for column in columns} for row in splits[split]))
            for split, path in files.items()}
    return write


PIQA_FILES = {"train": "train", "validation": "valid"}  # hub split -> the release's file stem


def write_piqa(folder: Path, splits: Mapping[str, Iterable[Mapping[str, Any]]]) -> dict[str, int]:
    """baber/piqa's rows (goal, sol1, sol2, label 0/1: the columns of ybisk/piqa, whose card,
    https://huggingface.co/datasets/ybisk/piqa, describes them) in PIQA's own release layout
    (ybisk/ybisk.github.io, piqa/data): STEM.jsonl, one {"goal", "sol1", "sol2"} a line as json.dumps writes
    it, and STEM-labels.lst, the label of each line: the same bytes as ../shared/data/piqa when the rows are."""
    counts = {}
    for split, stem in PIQA_FILES.items():
        rows = list(splits[split])
        labels = []
        for number, row in enumerate(rows):
            if row["label"] not in (0, 1, "0", "1") or isinstance(row["label"], bool):
                raise ValueError(f"PIQA's {split} row {number} has label {row['label']!r}, not 0 or 1: the hub's "
                                 "copy changed; PIQA's release is ybisk/ybisk.github.io's piqa/data")
            labels.append(f"{int(row['label'])}\n")
        counts[f"{stem}.jsonl"] = write_jsonl(folder / f"{stem}.jsonl", (
            {"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"]} for row in rows))
        (folder / f"{stem}-labels.lst").write_text("".join(labels), encoding="utf-8")
        counts[f"{stem}-labels.lst"] = len(labels)
    return counts


# --- how files become our files: the fetched datasets ------------------------------------------------

SPOCK_LINES = "spock_lines_derived.jsonl"
_SPEECH = re.compile(r"([A-Z][A-Z0-9 .'\-]*?)((?:\s*\[[^\]}]*[\]}])*): (.*)")  # SPOCK [OC]: text (one typo: [OC})


def episode_order(path: Path) -> tuple[int, str]:
    """1.htm, 2.htm, ..., 16.htm, 16b.htm, 17.htm, ...: the episodes in production order."""
    number, suffix = re.fullmatch(r"(\d+)(\D*)", path.stem).groups()
    return int(number), suffix


def speeches(page: str) -> tuple[str, list[tuple[str, str]]]:
    """(title, [(speaker, text), ...]) of one chakoteya.net transcript page.

    Line breaks (<br/>) and paragraph ends (</p>) become newlines, tags go, entities are unescaped. A line
    `SPEAKER: text` or `SPEAKER [OC]: text` (and [on monitor], [on screen]) starts a speech; the lines after
    it continue it, up to a blank line; whitespace is collapsed. A line that starts no speech outside one
    (a stage direction, a scene name) is skipped.
    """
    page = page.replace("\r", "")
    title = re.search(r"<title>(.*?)</title>", page, re.DOTALL)
    if title is None:
        raise ValueError("no <title> in the page: give the transcripts of ComputerMachine/script-search")
    name = html.unescape(title[1]).removeprefix("The Star Trek Transcripts - ").strip()
    text = html.unescape(re.sub(r"<[^>]*>", "", re.sub(r"<br\s*/?>|</p>", "\n", page, flags=re.IGNORECASE)))
    found: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for line in text.split("\n"):
        if not line.strip():
            current = None
        elif match := _SPEECH.fullmatch(line.strip()):
            current = [match[3]]
            found.append((match[1], current))
        elif current is not None:
            current.append(line)
    return name, [(speaker, " ".join(" ".join(parts).split())) for speaker, parts in found]


def spock_lines(html_folder: Path) -> list[dict[str, str]]:
    """Every line Spock speaks in the transcripts (html/N.htm), in episode order: {episode_file, title,
    speaker, text}, the rows of ../shared/data's spock_lines_derived.jsonl."""
    rows = []
    for path in sorted(html_folder.glob("*.htm"), key=episode_order):
        try:
            title, spoken = speeches(path.read_bytes().decode("utf-8"))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        rows += [{"episode_file": path.name, "title": title, "speaker": "SPOCK", "text": text}
                 for speaker, text in spoken if speaker == "SPOCK"]
    return rows


def derive_spock_lines(folder: Path, splits: Mapping[str, Any]) -> dict[str, int]:
    """spock_lines_derived.jsonl from the fetched html/ pages, the lines experiments/spock.py trains on."""
    return {SPOCK_LINES: write_jsonl(folder / SPOCK_LINES, spock_lines(folder / "html"))}


def _count(pattern: str, what: str, paths: str) -> Callable[[Path], str]:
    """A PROVENANCE.md rows line: how often `pattern` occurs in the files matching `paths`."""
    def count(folder: Path) -> str:
        files = sorted(folder.glob(paths))
        found = sum(len(re.findall(pattern, file.read_text(encoding="utf-8"))) for file in files)
        return f"{found:,} {what} in {len(files)} file{'s' * (len(files) != 1)}"
    return count


def _json_rows(path: str) -> Callable[[Path], str]:
    return lambda folder: f"{len(json.loads((folder / path).read_text(encoding='utf-8'))):,}"


def _gzip_lines(path: str) -> Callable[[Path], str]:
    def count(folder: Path) -> str:
        import gzip

        with gzip.open(folder / path, "rt", encoding="utf-8") as file:
            return f"{sum(1 for line in file if line.strip()):,} preference pairs"
    return count


# --- the catalog ------------------------------------------------------------------------------------

def _github(owner_repo: str, commit: str, files: Iterable[tuple[str, str]]) -> Remote:
    return Remote(f"https://raw.githubusercontent.com/{owner_repo}/{commit}/", tuple(files), commit)


def _arc(name: str, config: str, questions: str, size: str) -> PublicDataset:
    """One of AI2 ARC's two sets (lm-evaluation-harness's arc_easy and arc_challenge), which differ only in config."""
    return PublicDataset(
        name, f"AI2 ARC {config.split('-')[1]}, grade-school science questions (lm-evaluation-harness `{name}`: "
        f"{questions} test questions)",
        Hub("allenai/ai2_arc", config, ("train", "test")), "CC BY-SA 4.0",
        "https://huggingface.co/datasets/allenai/ai2_arc",
        jsonl_splits({"train": "train.jsonl", "test": "test.jsonl"}), size=size,
        notes="each split's rows with all the hub's columns (id, question, choices: {text, label}, answerKey), one "
              "a line. lm-evaluation-harness scores test; its few-shot examples come from train")


TOS_EPISODES = [str(n) for n in range(1, 17)] + ["16b"] + [str(n) for n in range(17, 80)]

DATASETS: dict[str, PublicDataset] = {data.name: data for data in [
    PublicDataset(
        "alpaca", "Stanford Alpaca, 52,002 instructions with answers (experiments/instruction_sft.py)",
        Hub("tatsu-lab/alpaca"), "CC BY-NC 4.0 (non-commercial)",
        "https://huggingface.co/datasets/tatsu-lab/alpaca", write_alpaca, size="23 MB",
        notes="the `text` column (the other three in the Alpaca prompt) is dropped; the rows are written as "
              "tatsu-lab/stanford_alpaca's alpaca_data.json"),
    PublicDataset(
        "cola", "CoLA, the Corpus of Linguistic Acceptability, as GLUE ships it (experiments/cola.py)",
        Hub("nyu-mll/glue", "cola", ("train", "validation")),
        "none for the data (the corpus README: fair use, copyright stays with the works it quotes)",
        "https://huggingface.co/datasets/nyu-mll/glue; the TSV format of nyu-mll/CoLA-baselines' cola_public "
        "README", write_cola, size="1 MB",
        notes="train -> raw/in_domain_train.tsv; validation rows 0-526 -> raw/in_domain_dev.tsv, rows 527-1042 "
              "-> raw/out_of_domain_dev.tsv; columns 1 (the source's code) and 3 (the author's mark) are not in "
              "GLUE and are left empty"),
    PublicDataset(
        "tweet_sentiment_extraction", "Kaggle's Tweet Sentiment Extraction, 3 labels (experiments/tweet_sentiment.py)",
        Hub("mteb/tweet_sentiment_extraction", splits=("train", "test")),
        "none stated (the Kaggle competition's data)",
        "https://huggingface.co/datasets/mteb/tweet_sentiment_extraction (create_data.py)", write_tweets,
        size="4 MB",
        notes="columns id, text, label_text -> textID, text, sentiment; label (0/1/2) is label_text's index. "
              "train_10fold.csv keeps the name of the project's copy, which adds the competition's selected_text "
              "and a kfold column; neither is in the hub's copy. The train split's one empty tweet is kept (the "
              "experiment skips blank tweets)"),
    PublicDataset(
        "oasst1_en_validation", "OpenAssistant Conversations, English validation messages and top-1 threads "
        "(experiments/chat_sft.py)",
        Hub("OpenAssistant/oasst1", splits=("validation",)), "Apache-2.0",
        "https://huggingface.co/datasets/OpenAssistant/oasst1", write_oasst1, size="4 MB",
        notes="the validation messages with lang `en`, one per line; the top-1 thread of each message tree (from "
              "the root prompt, skip deleted messages, follow the lowest-ranked child, unranked last and ties in "
              "order, to a leaf, drop trailing user turns; prompter -> user)"),
    PublicDataset(
        "spock", "the Spock article's own Spock lines (omgbobbyg/spock, from a Kaggle set of TOS scripts)",
        Hub("omgbobbyg/spock", splits=("train", "validation")), "none stated (Star Trek scripts, (c) CBS)",
        "https://huggingface.co/datasets/omgbobbyg/spock", write_spock, size="1 MB",
        notes="dialogue -> text; title, original_airdate and production_number kept. experiments/spock.py trains "
              "on star_trek_tos_transcripts' lines instead, which come with the transcripts they were taken from"),
    PublicDataset(
        "ultrachat_200k", "UltraChat 200k, the Llama article's chat conversations (train_sft, test_sft)",
        Hub("HuggingFaceH4/ultrachat_200k", splits=("train_sft", "test_sft")), "MIT",
        "https://huggingface.co/datasets/HuggingFaceH4/ultrachat_200k", write_ultrachat, size="1.4 GB",
        in_all=False, notes="messages' {content, role} -> {role, content}; the prompt column is the first user "
                            "message and is dropped"),
    PublicDataset(
        "star_trek_tos_transcripts", "Star Trek TOS transcripts (chakoteya.net pages) and the Spock lines "
        "derived from them (experiments/spock.py)",
        _github("ComputerMachine/script-search", "5a3975723ea2e7e6c551e9a7823487c35af27e98",
                ((f"html/{n}.htm", f"transcripts/tos/{n}.htm") for n in TOS_EPISODES)),
        "none; (c) CBS Studios, pages for educational and entertainment use: do not redistribute",
        "the pages' own HTML (speeches as `SPEAKER: text <br/>`)", derive_spock_lines,
        _count(r'<span id="episode"', "episodes", "html/*.htm"), size="4 MB",
        notes="spock_lines_derived.jsonl: every speech of SPOCK (with the tags [OC], [on monitor] and [on "
              "screen]) in episode order, tags stripped, entities unescaped, wrapped lines joined, whitespace "
              "collapsed (data/sources.py: speeches)"),
    PublicDataset(
        "enwiki_wikiextractor_sample", "English Wikipedia plain text, 50 WikiExtractor files (experiments/"
        "pretraining.py)",
        _github("jason-feng/wikiVisual", "1c0fac92f29f17c1603bfffbe864e0dfdff66897",
                ((f"AA/wiki_{n:02d}", f"text/AA/wiki_{n:02d}") for n in range(50))),
        "Wikipedia's CC BY-SA 3.0 (the repository's GPL-3.0 covers its code)",
        "WikiExtractor's <doc> blocks", count=_count(r"<doc ", "articles", "AA/wiki_*"), size="51 MB"),
    PublicDataset(
        "tinystories_sample", "the first 2 MiB of TinyStories-train.txt (experiments/pretraining.py)",
        _github("gusjengis/toy-RNN", "e4c7ff8bba4ff7989e69a3a816ebe4b14813b41e",
                [("tinystories_sample.txt", "data/tinystories_sample.txt")]),
        "none stated there (TinyStories itself: CDLA-Sharing-1.0)", "stories separated by <|endoftext|> lines",
        count=_count(r"<\|endoftext\|>", "<|endoftext|> separators (the last story is cut off)",
                     "tinystories_sample.txt"), size="2 MB"),
    PublicDataset(
        "tinyshakespeare", "Tiny Shakespeare, char-rnn's 1 MB of plays (the README's pretraining example)",
        _github("karpathy/char-rnn", "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e",
                [("input.txt", "data/tinyshakespeare/input.txt")]),
        "MIT (the repository; the text is public domain)", "plain text",
        count=_count(r"\n", "lines", "input.txt"), size="1 MB"),
    PublicDataset(
        "rasbt_instruction_data", "LLMs-from-scratch ch07's 1,100 instructions (Alpaca's format)",
        _github("rasbt/LLMs-from-scratch", "28c65cdfbc3338e2e040016eea4b7fdf556e4d57",
                [("instruction-data.json", "ch07/01_main-chapter-code/instruction-data.json")]),
        "Apache-2.0", "a JSON array of {instruction, input, output}",
        count=_json_rows("instruction-data.json"), size="0.2 MB"),
    PublicDataset(
        "rasbt_preference_data", "LLMs-from-scratch ch07's 1,100 preference pairs (chosen / rejected answers)",
        _github("rasbt/LLMs-from-scratch", "28c65cdfbc3338e2e040016eea4b7fdf556e4d57",
                [("instruction-data-with-preference.json",
                  "ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json")]),
        "Apache-2.0", "a JSON array of {instruction, input, output, chosen, rejected}",
        count=_json_rows("instruction-data-with-preference.json"), size="0.4 MB"),
    PublicDataset(
        "hh_rlhf_harmless_base_test", "Anthropic HH-RLHF harmless-base test pairs (offensive content!)",
        _github("anthropics/hh-rlhf", "354e5c3cb8960630860dd5774a6ac2a58313bf4d",
                [("test.jsonl.gz", "harmless-base/test.jsonl.gz")]),
        "MIT", "gzip'd JSON lines of {chosen, rejected} dialogues", count=_gzip_lines("test.jsonl.gz"),
        size="0.7 MB"),
    # the benchmarks lm-evaluation-harness 0.4.13 scores, from the hub datasets its task YAMLs read
    PublicDataset(
        "piqa", "PIQA, physical commonsense, 2 choices (lm-evaluation-harness `piqa`: 1,838 validation items)",
        Hub("baber/piqa", splits=("train", "validation")), "AFL-3.0 (Academic Free License v. 3.0)",
        "https://huggingface.co/datasets/baber/piqa; the layout of PIQA's release, ybisk/ybisk.github.io piqa/data",
        write_piqa, size="5 MB",
        notes="validation -> valid.jsonl ({goal, sol1, sol2} a line) and valid-labels.lst (its label, 0 or 1, a "
              "line), train -> train.jsonl and train-labels.lst: PIQA's own files. lm-evaluation-harness scores "
              "validation; its few-shot examples come from train"),
    PublicDataset(
        "gsm8k", "GSM8K, grade-school math word problems (lm-evaluation-harness `gsm8k`: 1,319 test problems)",
        Hub("openai/gsm8k", "main", ("train", "test")), "MIT", "https://huggingface.co/datasets/openai/gsm8k",
        jsonl_splits({"train": "train.jsonl", "test": "test.jsonl"}, ("question", "answer")), size="5 MB",
        notes="each split's {question, answer} rows, one a line, as openai/grade-school-math's own files; answer "
              "ends in `#### N`. lm-evaluation-harness scores test; its few-shot examples (5) come from train"),
    PublicDataset(
        "hellaswag", "HellaSwag, commonsense sentence endings, 4 choices (lm-evaluation-harness `hellaswag`: 10,042 "
        "validation items)",
        Hub("Rowan/hellaswag", splits=("train", "validation")), "MIT",
        "https://huggingface.co/datasets/Rowan/hellaswag",
        jsonl_splits({"train": "train.jsonl", "validation": "validation.jsonl"}), size="50 MB",
        notes="each split's rows with all the hub's columns (ind, activity_label, ctx_a, ctx_b, ctx, endings, "
              "source_id, split, split_type, label), one a line. lm-evaluation-harness scores validation; its "
              "few-shot examples come from train (the test split, unlabeled, is not written)"),
    _arc("arc_easy", "ARC-Easy", "2,376", "2 MB"),
    _arc("arc_challenge", "ARC-Challenge", "1,172", "1 MB"),
    PublicDataset(
        "winogrande", "WinoGrande XL, pronoun resolution, 2 options (lm-evaluation-harness `winogrande`: 1,267 "
        "validation sentences)",
        Hub("allenai/winogrande", "winogrande_xl", ("train", "validation")), "CC-BY",
        "https://huggingface.co/datasets/allenai/winogrande",
        jsonl_splits({"train": "train.jsonl", "validation": "validation.jsonl"}), size="7 MB",
        notes="each split's rows with all the hub's columns (sentence, option1, option2, answer), one a line. "
              "lm-evaluation-harness scores validation (the test split's answers are hidden); its few-shot "
              "examples come from train"),
    PublicDataset(
        "lambada_openai", "LAMBADA, OpenAI's version: predict a passage's last word (lm-evaluation-harness "
        "`lambada_openai`: 5,153 test passages)",
        Hub("EleutherAI/lambada_openai", "default", ("test",)), "CC BY 4.0",
        "https://huggingface.co/datasets/EleutherAI/lambada_openai",
        jsonl_splits({"test": "test.jsonl"}), size="2 MB",
        notes="the test split's rows (text), one a line. lm-evaluation-harness scores test, zero-shot: there is "
              "no split for few-shot examples"),
    PublicDataset(
        "mmlu", "MMLU, 57 subjects, 4 choices (lm-evaluation-harness `mmlu`: 14,042 test questions)",
        Hub("cais/mmlu", "all", ("dev", "test")), "MIT", "https://huggingface.co/datasets/cais/mmlu",
        jsonl_splits({"dev": "dev.jsonl", "test": "test.jsonl"}), size="8 MB",
        notes="each split's rows with all the hub's columns (question, subject, choices, answer: the index of the "
              "right choice), one a line; the `all` config holds every subject's rows in one split. "
              "lm-evaluation-harness scores test (reading the same rows one subject config at a time); its few-shot "
              "examples (5 per subject) come from dev. Loading `all` also fetches its auxiliary_train split, which "
              "is not written"),
]}


def selected(names: Sequence[str]) -> list[PublicDataset]:
    """The datasets named, in order ("all": every one marked in_all); an unknown name lists the known ones."""
    chosen: list[PublicDataset] = []
    for name in names:
        for data in [d for d in DATASETS.values() if d.in_all] if name == "all" else [dataset(name)]:
            if data not in chosen:
                chosen.append(data)
    return chosen
