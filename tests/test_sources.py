"""data/sources.py and data/download.py, offline: each hub dataset's adapter, fed rows of the project's own copy in
the hub's schema (a local folder in the hub repository's layout, loaded by the same datasets.load_dataset call),
writes files that our readers turn into the same rows as the copy; the fetched files' checksums; the Spock lines
and oasst1 threads derived exactly; and the downloads' failures: an unknown name, offline, a checksum mismatch,
Ctrl-C, a folder in the way."""
import csv
import dataclasses
import hashlib
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from datasets import ClassLabel, Features, List, Value

from data import download as download_cli
from data import sources
from experiments import cola, instruction_sft, tweet_sentiment

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def offline_here(tmp_path, monkeypatch):
    """Offline, whatever the machine's network: local stand-ins and file:// mirrors still load. And
    load_dataset's Arrow cache of the stand-ins in the test's folder, not the user's."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def shared(name: str):
    return pytest.mark.skipif(not (SHARED / name).is_dir(), reason=f"no {SHARED / name} here (the project's copy)")


def hub_repo(root: Path, splits: dict[str, datasets.Dataset], config: str = "default",
             pattern: str = "data/{split}-00000-of-00001.parquet") -> Path:
    """A local folder laid out as a hub dataset repository: parquet files per split and the README's configs."""
    lines = ["---", "configs:", f"- config_name: {config}", "  data_files:"]
    for split, rows in splits.items():
        path = pattern.format(config=config, split=split)
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        rows.to_parquet(str(root / path))
        lines += [f"  - split: {split}", f"    path: {path.replace('-00000-of-00001.parquet', '-*')}"]
    (root / "README.md").write_text("\n".join(lines + ["---", ""]))
    return root


def from_hub(name: str, repo: Path, out: Path) -> Path:
    """The dataset downloaded into out/NAME, with the local folder `repo` standing in for the hub's."""
    data = sources.DATASETS[name]
    return sources.download(dataclasses.replace(data, origin=dataclasses.replace(data.origin, repo=str(repo))),
                            out, progress=False)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- the hub datasets: their rows become ours ----------------------------------------------------------

@shared("alpaca")
def test_alpaca_from_the_hub_is_upstreams_alpaca_data_json(tmp_path):
    rows = [row for file in sorted((SHARED / "alpaca").glob("alpaca_data_part*.json")) for row in json.loads(
        file.read_text())]
    text = [f"Below is an instruction.\n\n### Instruction:\n{r['instruction']}\n\n### Response:\n{r['output']}"
            for r in rows]  # the card's `text` column: the other three in the prompt; the adapter drops it
    hub = datasets.Dataset.from_dict({key: [r[key] for r in rows] for key in ("instruction", "input", "output")}
                                     | {"text": text}, features=Features({k: Value("string") for k in (
                                         "instruction", "input", "output", "text")}))
    folder = from_hub("alpaca", hub_repo(tmp_path / "hub", {"train": hub}), tmp_path / "data")
    args = instruction_sft.parse_args(["--smoke", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "o")])
    assert instruction_sft.alpaca_rows(args) == rows
    # the very bytes of tatsu-lab/stanford_alpaca's alpaca_data.json (git blob 3779ddbc, see alpaca's PROVENANCE.md)
    data = (folder / "alpaca_data.json").read_bytes()
    assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == "3779ddbc040543ab1834ef216c983d6fcc06cc9a"
    provenance = (folder / "PROVENANCE.md").read_text()
    assert "52,002 rows, sha256 `2eddafc6" in provenance and "identical to the copy the experiments' results" in provenance
    assert "- Rows: train 52,002" in provenance and "- License (as its source states it): CC BY-NC 4.0" in provenance


@shared("cola")
def test_cola_from_glue_gives_the_raw_files_rows(tmp_path):
    def rows(path: Path, domain: str) -> list[dict]:
        return cola.read_cola(path, domain)

    local = {name: rows(SHARED / "cola" / name, domain) for name, domain in zip(
        sources.COLA_FILES, ("in-domain", "in-domain", "out-of-domain"))}
    glue = Features({"sentence": Value("string"), "label": ClassLabel(names=list(cola.LABELS)), "idx": Value("int32")})

    def split(parts: list[list[dict]]) -> datasets.Dataset:
        flat = [row for part in parts for row in part]
        return datasets.Dataset.from_dict({"sentence": [r["sentence"] for r in flat],
                                           "label": [cola.LABELS.index(r["label"]) for r in flat],
                                           "idx": list(range(len(flat)))}, features=glue)

    hub = hub_repo(tmp_path / "hub", {"train": split([local[sources.COLA_FILES[0]]]),
                                      "validation": split([local[name] for name in sources.COLA_FILES[1:]])},
                   config="cola", pattern="{config}/{split}-00000-of-00001.parquet")
    folder = from_hub("cola", hub, tmp_path / "data")
    domains = ("in-domain", "in-domain", "out-of-domain")
    assert {name: rows(folder / name, domain) for name, domain in zip(sources.COLA_FILES, domains)} == local
    assert "- Rows: train 8,551; validation 1,043" in (folder / "PROVENANCE.md").read_text()


@shared("tweet_sentiment_extraction")
def test_tweets_from_mteb_give_the_competitions_rows(tmp_path):
    hub = tmp_path / "hub"  # mteb's repository: train.jsonl and test.jsonl, written by its create_data.py
    hub.mkdir()
    for split, name in (("train", "train_10fold.csv"), ("test", "test.csv")):
        with open(SHARED / "tweet_sentiment_extraction" / name, newline="", encoding="utf-8") as file:
            rows = list(csv.DictReader(file))
        if split == "train":  # the competition's one empty tweet, which the project's copy lacks
            rows.insert(314, {"textID": "fdb77c3752", "text": "", "sentiment": "neutral"})
        (hub / f"{split}.jsonl").write_text("".join(json.dumps(
            {"id": r["textID"], "text": r["text"], "label": tweet_sentiment.LABELS.index(r["sentiment"]),
             "label_text": r["sentiment"]}) + "\n" for r in rows))
    folder = from_hub("tweet_sentiment_extraction", hub, tmp_path / "data")
    for name in ("train_10fold.csv", "test.csv"):
        assert (tweet_sentiment.read_tweets(folder / name)
                == tweet_sentiment.read_tweets(SHARED / "tweet_sentiment_extraction" / name))
    assert "- Rows: train 27,481; test 3,534" in (folder / "PROVENANCE.md").read_text()


OASST1 = Features({
    "message_id": Value("string"), "parent_id": Value("string"), "user_id": Value("string"),
    "created_date": Value("string"), "text": Value("string"), "role": Value("string"), "lang": Value("string"),
    "review_count": Value("int32"), "review_result": Value("bool"), "deleted": Value("bool"), "rank": Value("int32"),
    "synthetic": Value("bool"), "model_name": Value("string"),
    "detoxify": {name: Value("float64") for name in ("toxicity", "severe_toxicity", "obscene", "identity_attack",
                                                      "insult", "threat", "sexual_explicit")},
    "message_tree_id": Value("string"), "tree_state": Value("string"),
    "emojis": {"name": List(Value("string")), "count": List(Value("int32"))},
    "labels": {"name": List(Value("string")), "value": List(Value("float64")), "count": List(Value("int32"))}})


@shared("oasst1_en_validation")
def test_oasst1_from_the_hub_gives_the_same_top1_threads(tmp_path):
    messages = jsonl(SHARED / "oasst1_en_validation" / sources.OASST1_MESSAGES)
    tree = messages[0]["message_tree_id"]  # the hub's validation split has every language: a German copy of one tree
    german = [{**m, "lang": "de", "message_id": "de-" + m["message_id"], "message_tree_id": "de-" + tree,
               "parent_id": m["parent_id"] and "de-" + m["parent_id"]} for m in messages if m["message_tree_id"] == tree]
    hub = hub_repo(tmp_path / "hub", {"validation": datasets.Dataset.from_list(german + messages, features=OASST1)})
    folder = from_hub("oasst1_en_validation", hub, tmp_path / "data")
    assert (folder / sources.OASST1_THREADS).read_bytes() == (
        SHARED / "oasst1_en_validation" / sources.OASST1_THREADS).read_bytes()
    assert [m["message_id"] for m in jsonl(folder / sources.OASST1_MESSAGES)] == [m["message_id"] for m in messages]


def test_top1_threads_follow_the_best_rank_and_skip_deleted_messages():
    def message(id, parent, role, rank=None, deleted=False):
        return {"message_id": id, "parent_id": parent, "role": role, "rank": rank, "deleted": deleted,
                "text": f"text {id}", "message_tree_id": "t" if parent or id == "t" else id}

    messages = [message("t", None, "prompter"), message("a1", "t", "assistant", 1),
                message("a0", "t", "assistant", 0, deleted=True), message("a2", "t", "assistant", 0),
                message("u", "a2", "prompter"), message("gone", None, "prompter", deleted=True),
                message("alone", None, "prompter")]
    assert sources.top1_threads(messages) == [{"message_tree_id": "t", "messages": [
        {"role": "user", "content": "text t"}, {"role": "assistant", "content": "text a2"}]}]


@shared("star_trek_tos_transcripts")
def test_spock_article_dataset_gives_rows_with_our_text_field(tmp_path):
    lines = jsonl(SHARED / "star_trek_tos_transcripts" / sources.SPOCK_LINES)
    meta = {}
    for page in (SHARED / "star_trek_tos_transcripts" / "html").glob("*.htm"):
        spans = dict(re.findall(r'<span id="(\w+)" value="([^"]*)">', page.read_text()))
        meta[page.name] = (None if spans["airdate"] == "unaired" else spans["airdate"], int(spans["production"]))

    def split(rows: list[dict]) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {"title": [r["title"] for r in rows], "original_airdate": [meta[r["episode_file"]][0] for r in rows],
             "production_number": [meta[r["episode_file"]][1] for r in rows], "dialogue": [r["text"] for r in rows]},
            features=Features({"title": Value("string"), "original_airdate": Value("string"),
                               "production_number": Value("int64"), "dialogue": Value("string")}))

    cut = len(lines) * 4 // 5
    folder = from_hub("spock", hub_repo(tmp_path / "hub", {"train": split(lines[:cut]),
                                                           "validation": split(lines[cut:])}), tmp_path / "data")
    written = jsonl(folder / "train.jsonl") + jsonl(folder / "validation.jsonl")
    assert [row["text"] for row in written] == [row["text"] for row in lines]
    assert written[0] == {"title": "The Cage", "original_airdate": None, "production_number": 1,
                          "text": "Check the circuit."}


@shared("oasst1_en_validation")
def test_ultrachat_gives_conversation_rows(tmp_path):
    threads = jsonl(SHARED / "oasst1_en_validation" / sources.OASST1_THREADS)
    ultrachat = Features({"prompt": Value("string"), "prompt_id": Value("string"),
                          "messages": List({"content": Value("string"), "role": Value("string")})})

    def split(rows: list[dict]) -> datasets.Dataset:
        return datasets.Dataset.from_list([{
            "prompt": row["messages"][0]["content"], "prompt_id": hashlib.sha256(row["messages"][0]["content"].encode())
            .hexdigest(), "messages": [{"content": m["content"], "role": m["role"]} for m in row["messages"]]}
            for row in rows], features=ultrachat)

    folder = from_hub("ultrachat_200k", hub_repo(tmp_path / "hub", {"train_sft": split(threads[:150]),
                                                                    "test_sft": split(threads[150:])}), tmp_path / "data")
    written = jsonl(folder / "train_sft.jsonl") + jsonl(folder / "test_sft.jsonl")
    assert [row["messages"] for row in written] == [row["messages"] for row in threads]


# --- the benchmarks lm-evaluation-harness scores: the same hub datasets, one JSON row a line ---------------

PIQA = Features({"goal": Value("string"), "sol1": Value("string"), "sol2": Value("string"),
                 "label": ClassLabel(names=["0", "1"])})
GSM8K = Features({"question": Value("string"), "answer": Value("string")})


def piqa_split(rows: list[dict], labels: list[int]) -> datasets.Dataset:
    return datasets.Dataset.from_list([{**row, "label": label} for row, label in zip(rows, labels)], features=PIQA)


def test_piqa_is_written_as_piqas_own_files(tmp_path):
    train = [{"goal": "Keep bread fresh", "sol1": "Store it in a sealed bag.", "sol2": "Store it in a wet towel."},
             {"goal": "Dry wet shoes", "sol1": "Bake them at 200\u00b0C.", "sol2": "Stuff them with newspaper."}]
    validation = [{"goal": "Open a jar that\u2019s stuck", "sol1": "Run the lid under hot water, then twist.",
                   "sol2": "Run the lid under cold water, then twist."}]
    test = [{"goal": "Cut a cake \"evenly\"", "sol1": "Use a knife.", "sol2": "Use a spoon."}]  # unlabeled: -1
    hub = hub_repo(tmp_path / "hub", {"train": piqa_split(train, [0, 1]), "validation": piqa_split(validation, [0]),
                                      "test": piqa_split(test, [-1])})
    folder = from_hub("piqa", hub, tmp_path / "data")
    assert sorted(p.name for p in folder.iterdir()) == ["PROVENANCE.md", "train-labels.lst", "train.jsonl",
                                                        "valid-labels.lst", "valid.jsonl"]
    assert (folder / "train.jsonl").read_bytes() == (
        b'{"goal": "Keep bread fresh", "sol1": "Store it in a sealed bag.", "sol2": "Store it in a wet towel."}\n'
        b'{"goal": "Dry wet shoes", "sol1": "Bake them at 200\\u00b0C.", "sol2": "Stuff them with newspaper."}\n')
    assert (folder / "train-labels.lst").read_bytes() == b"0\n1\n"
    assert (folder / "valid.jsonl").read_bytes() == (
        b'{"goal": "Open a jar that\\u2019s stuck", "sol1": "Run the lid under hot water, then twist.", '
        b'"sol2": "Run the lid under cold water, then twist."}\n')
    assert (folder / "valid-labels.lst").read_bytes() == b"0\n"
    provenance = (folder / "PROVENANCE.md").read_text()
    assert "- Rows: train 2; validation 1" in provenance
    assert "- License (as its source states it): AFL-3.0" in provenance
    assert "**differs**" in provenance  # one row is not the 1,838 the results were measured on


def test_piqa_refuses_a_label_that_is_not_0_or_1(tmp_path):
    row = {"goal": "g", "sol1": "a", "sol2": "b"}
    with pytest.raises(ValueError, match=r"PIQA's validation row 1 has label -1, not 0 or 1"):
        sources.write_piqa(tmp_path, {"train": [], "validation": [{**row, "label": 1}, {**row, "label": -1}]})


@shared("piqa")
def test_piqa_from_the_hub_is_the_projects_copy_byte_for_byte(tmp_path):
    lines = (SHARED / "piqa" / "valid.jsonl").read_bytes().splitlines(keepends=True)
    labels = (SHARED / "piqa" / "valid-labels.lst").read_bytes().splitlines(keepends=True)
    rows, numbers = [json.loads(line) for line in lines], [int(label) for label in labels]
    hub = hub_repo(tmp_path / "hub", {"train": piqa_split(rows[:25], numbers[:25]),
                                      "validation": piqa_split(rows, numbers)})
    folder = from_hub("piqa", hub, tmp_path / "data")
    assert (folder / "train.jsonl").read_bytes() == b"".join(lines[:25])  # the first rows: the first lines
    assert (folder / "train-labels.lst").read_bytes() == b"".join(labels[:25])
    for name in ("valid.jsonl", "valid-labels.lst"):
        assert (folder / name).read_bytes() == (SHARED / "piqa" / name).read_bytes()
        assert sources.checksums()[f"piqa/{name}"] == sources.sha256_of(folder / name)
    provenance = (folder / "PROVENANCE.md").read_text()
    assert provenance.count("identical to the copy the experiments' results were measured on") == 2
    assert "Warning" not in provenance


def test_gsm8k_is_written_as_openais_own_files(tmp_path):
    train = [{"question": "Ann has 3 apples and buys 2 more. How many does she have?",
              "answer": "She has 3 + 2 = <<3+2=5>>5 apples.\n#### 5"}]
    test = [{"question": "A pen costs $2. Bo\u2019s class buys 12 pens. What do they pay?",
             "answer": "They pay 12 * 2 = $<<12*2=24>>24.\n#### 24"},
            {"question": "Half of 10?", "answer": "10 / 2 = <<10/2=5>>5\n#### 5"}]
    hub = hub_repo(tmp_path / "hub", {split: datasets.Dataset.from_list(rows, features=GSM8K)
                                      for split, rows in (("train", train), ("test", test))},
                   config="main", pattern="{config}/{split}-00000-of-00001.parquet")
    folder = from_hub("gsm8k", hub, tmp_path / "data")
    assert sorted(p.name for p in folder.iterdir()) == ["PROVENANCE.md", "test.jsonl", "train.jsonl"]
    assert (folder / "train.jsonl").read_bytes() == (
        b'{"question": "Ann has 3 apples and buys 2 more. How many does she have?", '
        b'"answer": "She has 3 + 2 = <<3+2=5>>5 apples.\\n#### 5"}\n')
    assert (folder / "test.jsonl").read_bytes() == (
        b'{"question": "A pen costs $2. Bo\\u2019s class buys 12 pens. What do they pay?", '
        b'"answer": "They pay 12 * 2 = $<<12*2=24>>24.\\n#### 24"}\n'
        b'{"question": "Half of 10?", "answer": "10 / 2 = <<10/2=5>>5\\n#### 5"}\n')
    assert "- Rows: train 1; test 2" in (folder / "PROVENANCE.md").read_text()


@shared("gsm8k")
def test_gsm8k_from_the_hub_is_the_projects_copy_byte_for_byte(tmp_path):
    lines = (SHARED / "gsm8k" / "test.jsonl").read_bytes().splitlines(keepends=True)
    rows = [json.loads(line) for line in lines]
    hub = hub_repo(tmp_path / "hub", {"train": datasets.Dataset.from_list(rows[:25], features=GSM8K),
                                      "test": datasets.Dataset.from_list(rows, features=GSM8K)},
                   config="main", pattern="{config}/{split}-00000-of-00001.parquet")
    folder = from_hub("gsm8k", hub, tmp_path / "data")
    assert (folder / "train.jsonl").read_bytes() == b"".join(lines[:25])  # the first rows: the first lines
    assert (folder / "test.jsonl").read_bytes() == (SHARED / "gsm8k" / "test.jsonl").read_bytes()
    assert sources.checksums()["gsm8k/test.jsonl"] == sources.sha256_of(folder / "test.jsonl")
    provenance = (folder / "PROVENANCE.md").read_text()
    assert "identical to the copy the experiments' results were measured on" in provenance
    assert "Warning" not in provenance


ARC = Features({"id": Value("string"), "question": Value("string"),
                "choices": {"text": List(Value("string")), "label": List(Value("string"))},
                "answerKey": Value("string")})
ARC_ROWS = {
    "train": [{"id": "Sample_1", "question": "Which gas do plants take in?",
               "choices": {"text": ["oxygen", "carbon dioxide", "helium"], "label": ["A", "B", "C"]},
               "answerKey": "B"}],
    "validation": [{"id": "Sample_2", "question": "What melts ice?",
                    "choices": {"text": ["heat", "cold"], "label": ["A", "B"]}, "answerKey": "A"}],
    "test": [{"id": "Sample_3", "question": "How many legs has an insect?",
              "choices": {"text": ["4", "6", "8", "10"], "label": ["1", "2", "3", "4"]}, "answerKey": "2"},
             {"id": "Sample_4", "question": "Which is a mammal?",
              "choices": {"text": ["trout", "whale", "frog", "crab"], "label": ["A", "B", "C", "D"]},
              "answerKey": "B"}]}
BENCHMARKS = {  # name: (config, the hub's path of a split's parquet file, its features, its rows, what is written)
    "hellaswag": (
        "default", "data/{split}-00000-of-00001.parquet",
        Features({"ind": Value("int32"), "activity_label": Value("string"), "ctx_a": Value("string"),
                  "ctx_b": Value("string"), "ctx": Value("string"), "endings": List(Value("string")),
                  "source_id": Value("string"), "split": Value("string"), "split_type": Value("string"),
                  "label": Value("string")}),
        {"train": [{"ind": 4, "activity_label": "Washing dishes", "ctx_a": "A man fills a sink with water.",
                    "ctx_b": "he", "ctx": "A man fills a sink with water. he",
                    "endings": ["adds soap.", "drives away.", "sings.", "climbs a tree."],
                    "source_id": "activitynet~v_sample", "split": "train", "split_type": "indomain", "label": "0"}],
         "validation": [{"ind": 24, "activity_label": "Caf\u00e9 work", "ctx_a": "A barista steams milk.", "ctx_b": "",
                         "ctx": "A barista steams milk.",
                         "endings": ["She pours it.", "She eats it.", "She paints it.", "She mails it."],
                         "source_id": "wikihow~1", "split": "val", "split_type": "zeroshot", "label": "0"}],
         "test": [{"ind": 9, "activity_label": "Running", "ctx_a": "A man runs.", "ctx_b": "", "ctx": "A man runs.",
                   "endings": ["a", "b", "c", "d"], "source_id": "wikihow~2", "split": "test",
                   "split_type": "indomain", "label": ""}]},
        {"train": "train.jsonl", "validation": "validation.jsonl"},
        '{"ind": 24, "activity_label": "Caf\\u00e9 work", "ctx_a": "A barista steams milk.", "ctx_b": "", '
        '"ctx": "A barista steams milk.", "endings": ["She pours it.", "She eats it.", "She paints it.", '
        '"She mails it."], "source_id": "wikihow~1", "split": "val", "split_type": "zeroshot", "label": "0"}'),
    "arc_easy": (
        "ARC-Easy", "{config}/{split}-00000-of-00001.parquet", ARC, ARC_ROWS,
        {"train": "train.jsonl", "test": "test.jsonl"},
        '{"id": "Sample_3", "question": "How many legs has an insect?", "choices": {"text": ["4", "6", "8", "10"], '
        '"label": ["1", "2", "3", "4"]}, "answerKey": "2"}'),
    "arc_challenge": (
        "ARC-Challenge", "{config}/{split}-00000-of-00001.parquet", ARC, ARC_ROWS,
        {"train": "train.jsonl", "test": "test.jsonl"},
        '{"id": "Sample_3", "question": "How many legs has an insect?", "choices": {"text": ["4", "6", "8", "10"], '
        '"label": ["1", "2", "3", "4"]}, "answerKey": "2"}'),
    "winogrande": (
        "winogrande_xl", "{config}/{split}-00000-of-00001.parquet",
        Features({"sentence": Value("string"), "option1": Value("string"), "option2": Value("string"),
                  "answer": Value("string")}),
        {"train": [{"sentence": "The cup fit in the box because the _ was small.", "option1": "cup", "option2": "box",
                    "answer": "1"}],
         "validation": [{"sentence": "Sam thanked Lee because _ had helped.", "option1": "Sam", "option2": "Lee",
                         "answer": "2"}, {"sentence": "x _ y", "option1": "a", "option2": "b", "answer": "1"}],
         "test": [{"sentence": "hidden _", "option1": "a", "option2": "b", "answer": ""}]},
        {"train": "train.jsonl", "validation": "validation.jsonl"},
        '{"sentence": "Sam thanked Lee because _ had helped.", "option1": "Sam", "option2": "Lee", "answer": "2"}'),
    "lambada_openai": (
        "default", "{config}/{split}-00000-of-00001.parquet", Features({"text": Value("string")}),
        {"test": [{"text": "She opened the door and called out to her dog. \u201cCome here,\u201d she said to Max"},
                  {"text": "one two three"}]},
        {"test": "test.jsonl"},
        '{"text": "She opened the door and called out to her dog. \\u201cCome here,\\u201d she said to Max"}'),
    "mmlu": (
        "all", "{config}/{split}-00000-of-00001.parquet",
        Features({"question": Value("string"), "subject": Value("string"), "choices": List(Value("string")),
                  "answer": ClassLabel(names=["A", "B", "C", "D"])}),
        {"auxiliary_train": [{"question": "aux", "subject": "", "choices": ["a", "b", "c", "d"], "answer": 0}],
         "dev": [{"question": "2 + 2 = ?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"],
                  "answer": 1}],
         "test": [{"question": "Which organ pumps blood?", "subject": "anatomy",
                   "choices": ["lung", "liver", "heart", "kidney"], "answer": 2},
                  {"question": "x?", "subject": "virology", "choices": ["a", "b", "c", "d"], "answer": 3}],
         "validation": [{"question": "v?", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 0}]},
        {"dev": "dev.jsonl", "test": "test.jsonl"},
        '{"question": "Which organ pumps blood?", "subject": "anatomy", "choices": ["lung", "liver", "heart", '
        '"kidney"], "answer": 2}'),
}


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_a_benchmark_from_the_hub_is_one_json_row_a_line(name, tmp_path):
    config, pattern, features, splits, files, scored_first_line = BENCHMARKS[name]
    data = sources.DATASETS[name]
    assert (data.origin.config or "default") == config and data.origin.splits == tuple(files)
    hub = hub_repo(tmp_path / "hub", {split: datasets.Dataset.from_list(rows, features=features)
                                      for split, rows in splits.items()}, config=config, pattern=pattern)
    folder = from_hub(name, hub, tmp_path / "data")
    assert sorted(p.name for p in folder.iterdir()) == sorted([*files.values(), "PROVENANCE.md"])
    for split, path in files.items():  # every column, in the hub's order, every row in its order; nothing else
        assert (folder / path).read_bytes() == "".join(json.dumps(row) + "\n" for row in splits[split]).encode()
    scored = {"hellaswag": "validation", "winogrande": "validation"}.get(name, "test")
    assert (folder / files[scored]).read_text().splitlines()[0] == scored_first_line
    provenance = (folder / "PROVENANCE.md").read_text()
    assert "- Rows: " + "; ".join(f"{split} {len(splits[split])}" for split in files) in provenance
    assert f"- License (as its source states it): {data.license}" in provenance
    assert "lm-evaluation-harness scores " + scored in provenance


def test_download_help_lists_the_benchmarks():
    root = Path(__file__).resolve().parents[1]
    shown = subprocess.run([sys.executable, "data/download.py", "--help"], cwd=root, capture_output=True, text=True,
                           check=True).stdout
    listed = {line.split()[0] for line in shown.split("datasets:\n", 1)[1].splitlines() if line.strip()}
    assert {"piqa", "gsm8k", "hellaswag", "arc_easy", "arc_challenge", "winogrande", "lambada_openai",
            "mmlu"} <= listed


def test_a_written_file_that_differs_from_the_projects_copy_is_reported(tmp_path, monkeypatch, capsys):
    # offline (offline_here): no look-up of the hub's commit; `load` stands in for the hub
    rows = [{"instruction": "Say hi.", "input": "", "output": "Hi.", "text": "..."}]
    folder = sources.download("alpaca", tmp_path, load=lambda hub, split, revision: rows)
    digest = sources.sha256_of(folder / "alpaca_data.json")
    warning = (f"alpaca/alpaca_data.json has sha256 {digest}, not {sources.checksums()['alpaca/alpaca_data.json']}: "
               "its rows differ from those the results in docs/experiments.md were measured on")
    assert f"warning: {warning}\n" in capsys.readouterr().err
    provenance = (folder / "PROVENANCE.md").read_text()
    assert f"1 rows, sha256 `{digest}`, **differs** from the copy the results were measured on" in provenance
    assert provenance.endswith(f"\nWarning: {warning}\n")
    assert json.loads((folder / "alpaca_data.json").read_text()) == [{"instruction": "Say hi.", "input": "",
                                                                       "output": "Hi."}]


# --- the fetched datasets ---------------------------------------------------------------------------

@shared("star_trek_tos_transcripts")
def test_spock_lines_are_derived_exactly_from_the_transcripts():
    derived = "".join(json.dumps(row) + "\n" for row in sources.spock_lines(SHARED / "star_trek_tos_transcripts" / "html"))
    assert derived.encode() == (SHARED / "star_trek_tos_transcripts" / sources.SPOCK_LINES).read_bytes()


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"no {SHARED} here (the project's copies)")
def test_every_fetched_files_checksum_is_that_of_the_projects_copy():
    table = sources.checksums()
    fetched = [f"{data.name}/{path}" for data in sources.DATASETS.values() if isinstance(data.origin, sources.Remote)
               for path, _ in data.origin.files]
    assert len(fetched) == 80 + 50 + 5 and set(fetched) <= set(table)
    assert {key: sources.sha256_of(SHARED / key) for key in table if (SHARED / key).is_file()} == {
        key: digest for key, digest in table.items() if (SHARED / key).is_file()}


PAGE = """<html><head><title>The Star Trek Transcripts - {title}</title></head><body>
<p><font><b>[Bridge]</b>\r\r
SPOCK: Fascinating. The readings are\r\r
quite clear, Captain. <br/>\r\r
KIRK: Explain. <br/>\r\r
(Spock looks up) <br/>\r\r
SPOCK [OC]: Logic &amp; reason {n}.<br/>\r\r
</font></p><span id="episode" value="{n}"></span></body></html>"""


@pytest.fixture
def mirror(tmp_path, monkeypatch) -> Path:
    """A file:// mirror of star_trek_tos_transcripts with two pages of our own, their sha256 in a checksums file."""
    remote = tmp_path / "remote" / "transcripts" / "tos"
    remote.mkdir(parents=True)
    table = tmp_path / "sources.sha256"
    lines = []
    for n, title in (("1", "The Cage"), ("16b", "The Menagerie, Part II")):
        (remote / f"{n}.htm").write_bytes(PAGE.format(title=title, n=n).encode())
        lines.append(f"{sources.sha256_of(remote / f'{n}.htm')}  star_trek_tos_transcripts/html/{n}.htm")
    table.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(sources, "CHECKSUMS", table)
    data = sources.DATASETS["star_trek_tos_transcripts"]
    monkeypatch.setitem(sources.DATASETS, data.name, dataclasses.replace(data, origin=sources.Remote(
        (tmp_path / "remote").as_uri() + "/", (("html/1.htm", "transcripts/tos/1.htm"),
                                               ("html/16b.htm", "transcripts/tos/16b.htm")))))
    return remote


def test_download_fetches_checks_and_derives_into_a_complete_folder(mirror, tmp_path, capsys):
    assert download_cli.main(["star_trek_tos_transcripts", "--out", str(tmp_path / "data")]) == 0
    folder = tmp_path / "data" / "star_trek_tos_transcripts"
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        "PROVENANCE.md", "html/1.htm", "html/16b.htm", sources.SPOCK_LINES]
    assert jsonl(folder / sources.SPOCK_LINES) == [
        {"episode_file": page, "title": title, "speaker": "SPOCK", "text": text}
        for page, title, n in (("1.htm", "The Cage", "1"), ("16b.htm", "The Menagerie, Part II", "16b"))
        for text in ("Fascinating. The readings are quite clear, Captain.", f"Logic & reason {n}.")]
    provenance = (folder / "PROVENANCE.md").read_text()
    assert "- Rows: 2 episodes in 2 files" in provenance
    assert f"- `html/1.htm`: {(mirror / '1.htm').stat().st_size:,} bytes, sha256 `{sources.sha256_of(mirror / '1.htm')}`" \
        in provenance
    assert not (tmp_path / "data" / sources.CACHE).exists()  # the cache is emptied once the folder is in place
    capsys.readouterr()
    assert download_cli.main(["star_trek_tos_transcripts", "--out", str(tmp_path / "data")]) == 0  # not again
    assert capsys.readouterr().err == (f"star_trek_tos_transcripts: {folder} is complete already (delete it to fetch "
                                       "it again)\n")


def test_a_checksum_mismatch_deletes_the_file_and_says_so_in_one_line(mirror, tmp_path, capsys):
    (mirror / "16b.htm").write_text("changed upstream")
    assert download_cli.main(["star_trek_tos_transcripts", "--out", str(tmp_path / "data")]) == 2
    url = (mirror / "16b.htm").as_uri()
    expected = sources.checksums()["star_trek_tos_transcripts/html/16b.htm"]
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"checksum mismatch: star_trek_tos_transcripts: {url} has sha256 {sources.sha256_of(mirror / '16b.htm')}, not "
        f"the expected {expected}: deleted the download; the source changed or the transfer was corrupted, so try "
        "again, or report it")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [sources.CACHE]  # no folder, no temporary one
    assert [p.name for p in (tmp_path / "data" / sources.CACHE).iterdir()] == [
        sources.checksums()["star_trek_tos_transcripts/html/1.htm"]]  # the good file waits; the bad one is gone


def test_ctrl_c_leaves_no_folder_and_the_next_run_fetches_only_what_is_missing(mirror, tmp_path, monkeypatch, capsys):
    fetched, real = [], sources.fetch_url

    def fetch(url, path, progress):
        if len(fetched) == 1 and not interrupted:
            interrupted.append(url)
            path.write_bytes(b"half a page")
            raise KeyboardInterrupt
        fetched.append(url)
        real(url, path, progress)

    interrupted: list[str] = []
    monkeypatch.setattr(sources, "fetch_url", fetch)
    out = tmp_path / "data"
    assert download_cli.main(["star_trek_tos_transcripts", "--out", str(out)]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"interrupted: {out / 'star_trek_tos_transcripts'} was not written; run the command again to fetch what is "
        "still missing")
    assert sorted(p.name for p in out.iterdir()) == [sources.CACHE]  # no half-written folder, no temporary one
    assert len(list((out / sources.CACHE).iterdir())) == 1  # the finished page; not the partial one
    assert download_cli.main(["star_trek_tos_transcripts", "--out", str(out)]) == 0
    assert [url.rsplit("/", 1)[1] for url in fetched] == ["1.htm", "16b.htm"]  # 1.htm once, 16b.htm after the stop
    assert sources.is_complete(out / "star_trek_tos_transcripts")


def test_an_unknown_name_lists_the_known_ones(capsys):
    assert download_cli.main(["tos"]) == 2
    assert capsys.readouterr().err == f"error: unknown dataset 'tos'; the known ones are {', '.join(sources.DATASETS)} (or all)\n"


def test_all_is_every_dataset_but_ultrachat():
    assert [data.name for data in sources.selected(["cola", "all"])] == ["cola"] + [
        name for name in sources.DATASETS if name not in ("cola", "ultrachat_200k")]


@pytest.mark.parametrize("name, what", [
    ("tinyshakespeare", ("https://raw.githubusercontent.com/karpathy/char-rnn/6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/"
                         "data/tinyshakespeare/input.txt")),
    ("cola", "the Hugging Face dataset nyu-mll/glue")])
def test_offline_nothing_is_fetched_and_the_error_is_one_line(name, what, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sources, "fetch_url", lambda *args: pytest.fail("fetched while offline"))
    assert download_cli.main([name, "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {name}: offline: HF_HUB_OFFLINE is set, so {what} cannot be fetched")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_is_not_a_finished_download_is_left_alone(mirror, tmp_path, capsys):
    mine = tmp_path / "data" / "star_trek_tos_transcripts"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    assert download_cli.main(["star_trek_tos_transcripts", "--out", str(tmp_path / "data")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: star_trek_tos_transcripts: {mine} exists but is not a finished download (it has no PROVENANCE.md): "
        "move it away, or download into another folder with --out")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_a_cached_file_is_used_only_when_its_content_has_its_sha256(mirror, tmp_path, capsys):
    out = tmp_path / "data"
    good = sources.checksums()["star_trek_tos_transcripts/html/1.htm"]
    (out / sources.CACHE).mkdir(parents=True)
    (out / sources.CACHE / good).write_text("not the page")  # named as the page, holding something else
    assert download_cli.main(["star_trek_tos_transcripts", "--out", str(out)]) == 0
    folder = out / "star_trek_tos_transcripts"
    assert (folder / "html" / "1.htm").read_bytes() == (mirror / "1.htm").read_bytes()  # fetched again
    assert sources.sha256_of(folder / "html" / "1.htm") == good
    assert f"sha256 `{good}`" in (folder / "PROVENANCE.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["star_trek_tos_transcripts"]


def test_a_bad_cached_file_that_cannot_be_fetched_again_is_refused_in_one_line(mirror, tmp_path, monkeypatch, capsys):
    out = tmp_path / "data"
    good = sources.checksums()["star_trek_tos_transcripts/html/1.htm"]
    (out / sources.CACHE).mkdir(parents=True)
    (out / sources.CACHE / good).write_text("not the page")

    def no_network(url, path, progress):
        raise sources.Unavailable(f"cannot fetch {url}: [Errno -2] Name or service not known")

    monkeypatch.setattr(sources, "fetch_url", no_network)
    assert download_cli.main(["star_trek_tos_transcripts", "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: star_trek_tos_transcripts: cannot fetch {(mirror / '1.htm').as_uri()}: [Errno -2] Name or service "
        "not known")
    assert sorted(p.name for p in out.iterdir()) == [sources.CACHE]  # no folder, no temporary one
    assert list((out / sources.CACHE).iterdir()) == []  # the file that was not what its name said is gone


KILLED = """
import dataclasses, sys, time
from pathlib import Path
from data import sources
tmp = Path(sys.argv[1])
sources.CHECKSUMS = tmp / "sources.sha256"
data = sources.DATASETS["star_trek_tos_transcripts"]
data = dataclasses.replace(data, origin=sources.Remote((tmp / "remote").as_uri() + "/", (
    ("html/1.htm", "transcripts/tos/1.htm"), ("html/16b.htm", "transcripts/tos/16b.htm"))))
def fetch(url, path, progress):
    if url.endswith("16b.htm"):
        path.write_bytes(b"half a page")
        print("fetching", flush=True)
        time.sleep(600)
    sources.fetch_url(url, path, progress)
sources.download(data, tmp / "data", progress=False, fetch=fetch)
"""


def test_a_killed_download_leaves_nothing_after_the_next_one(mirror, tmp_path):
    root = Path(__file__).resolve().parents[1]
    child = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path)], cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "fetching\n"
    finally:
        child.kill()  # SIGKILL: no handler runs
        child.wait()
    out = tmp_path / "data"
    left = sorted(p.name for p in out.iterdir())
    assert left[0] == sources.CACHE and re.fullmatch(rf"\.star_trek_tos_transcripts\.tmp-{child.pid}-[0-9a-f]{{8}}",
                                                     left[1]) and len(left) == 2  # the half page is in there
    assert (out / left[1] / "html" / "16b.htm").read_bytes() == b"half a page"
    assert download_cli.main(["star_trek_tos_transcripts", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["star_trek_tos_transcripts"]  # no temporary folder, no cache
    assert sources.sha256_of(out / "star_trek_tos_transcripts" / "html" / "16b.htm") == sources.sha256_of(
        mirror / "16b.htm")


def test_without_a_network_a_hub_dataset_is_refused_at_once(tmp_path, monkeypatch, capsys):
    from llama import rows

    def no_network(address, timeout):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(rows.socket, "create_connection", no_network)
    monkeypatch.setattr(rows.urllib.request, "getproxies", lambda: {})
    monkeypatch.setattr(sources, "load_split", lambda *args: pytest.fail("the hub's client was asked"))
    monkeypatch.setattr(sources, "hub_commit", lambda *args: pytest.fail("the hub's client was asked"))
    assert download_cli.main(["cola", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: cola: the Hugging Face dataset nyu-mll/glue cannot be fetched: cannot connect to huggingface.co (Name "
        "or service not known: no network?); run `python3 data/download.py cola` where there is a network and copy "
        f"its folder cola/ into {tmp_path}")
    assert list(tmp_path.iterdir()) == []
