"""experiments/cola.py and experiments/tweet_sentiment.py in their --smoke setting: a tiny data folder with the
shared data's layout (CoLA's header-less TSVs, the competition's CSVs), a tiny model in place of SmolLM2."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_experiments import (  # the results page's checks, shared with the other experiments
    check_outputs,
    smoke,
)

from experiments import cola, tweet_sentiment
from llama import Llama, LlamaConfig, Tokenizer, save_pretrained

WORDS = "the ship sails home captain sees a hill on top sea I this lovely day awful rain so".split()


def sentence(i: int, length: int = 6) -> str:
    return " ".join(WORDS[(i * 5 + j * 3) % len(WORDS)] for j in range(length)).capitalize() + "."


def cola_lines(count: int, start: int) -> str:
    return "".join(f"gj04\t{int(i % 3 != 0)}\t{'' if i % 3 else '*'}\t{sentence(start + i)}\n" for i in range(count))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The shared data's cola/raw and tweet_sentiment_extraction files, with a few rows each."""
    root = tmp_path_factory.mktemp("shared_data")
    (root / "cola" / "raw").mkdir(parents=True)
    (root / "cola" / "raw" / "in_domain_train.tsv").write_text(cola_lines(30, 0))
    (root / "cola" / "raw" / "in_domain_dev.tsv").write_text(cola_lines(10, 100))
    (root / "cola" / "raw" / "out_of_domain_dev.tsv").write_text(cola_lines(8, 200).rstrip("\n"))  # as the real one
    tweets = root / "tweet_sentiment_extraction"
    tweets.mkdir()
    sentiments = tweet_sentiment.LABELS
    (tweets / "train_10fold.csv").write_text("textID,text,selected_text,sentiment,kfold\n" + "".join(
        f'id{i}," {sentence(i)}","{sentence(i)}",{sentiments[i % 3]},{i % 10}\n' for i in range(30)))
    (tweets / "test.csv").write_bytes(("textID,text,sentiment\r\n" + "".join(
        f't{i},"{sentence(i, 4)}, ""quoted"", {sentence(i + 1, 3)}",{sentiments[i % 3]}\r\n' for i in range(15))
        + "blank, ,neutral\r\n").encode())  # a blank tweet: left out
    return root


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random tiny language model standing in for SmolLM2: the experiments give it a label head."""
    tokenizer = Tokenizer.train([sentence(i, 12) for i in range(200)], vocab_size=300)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_pretrained(Llama(LlamaConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size)), tokenizer, folder,
                    format="ours")
    return folder


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cola(data_dir, tiny_model, tmp_path):
    assert cola.main(smoke(data_dir, tmp_path, "--model", tiny_model)) == 0
    results = check_outputs(tmp_path, "cola")
    assert f"`python3 experiments/cola.py --size cpu --smoke --data-dir {data_dir} --model {tiny_model}`" in results
    assert ("| training sentences | 8,551, 3 epochs, batch 8, lr 5e-5, linear decay | 24 (a seeded subset), 2 steps, "
            "batch 4, lr 5e-5, cosine decay |") in results
    assert ("| scored on | GLUE's validation set, 1,043 sentences | 18: 10 in-domain and 8 out-of-domain dev "
            "sentences |") in results
    assert "| **MCC** | not reported | **" in results
    assert ("| MCC / accuracy / macro-F1 of always \"acceptable\", the training sentences' most common label |  | "
            "0.000 / 0.611 / 0.379 |") in results  # 11 of the 18 dev sentences are acceptable
    assert "| goal: MCC at least 0.454 (GPT-1, 117M: 45.4 on GLUE's test set, Radford et al. 2018) |  | **" in results
    assert "| sea I hill this top | not acceptable | " in results and "| See a hill on top | acceptable | " in results
    assert "on a seeded 8 of the 18 dev sentences" in results
    predictions = lines(tmp_path / "out" / "dev_predictions.jsonl")
    assert len(predictions) == 18 and {row["predicted"] for row in predictions} <= set(cola.LABELS)
    assert [row["domain"] for row in predictions] == ["in-domain"] * 10 + ["out-of-domain"] * 8
    assert predictions[0]["sentence"] == sentence(100) and predictions[0]["label"] == "unacceptable"
    assert len(lines(tmp_path / "out" / "cola_train.jsonl")) == 24


def test_tweet_sentiment(data_dir, tiny_model, tmp_path):
    assert tweet_sentiment.main(smoke(data_dir, tmp_path, "--model", tiny_model)) == 0
    results = check_outputs(tmp_path, "tweet-sentiment")
    assert ("|  | article: GPT-2 small (124M) | ours: the 1,000-tweet subset, SmolLM2-135M-Instruct | ours: all "
            "tweets, SmolLM2-135M-Instruct |") in results
    assert ("| training / test tweets | 1,000 / 1,000 (shuffled with seed 42), batch 1 | 16 / 12 (our seeded shuffle, "
            "seed 42), 2 steps, batch 4, lr 5e-5 | 30 / 15 (our seeded shuffle, seed 42), 2 steps, batch 4, lr 5e-5 |"
            ) in results  # the smoke's full part takes at most 64 / 32: here all 30 / 15
    assert "| **accuracy** | not reported | **" in results
    assert ("| accuracy / macro-F1 of always the training tweets' most common label |  | " in results
            and '| 0.333 / 0.167 ("negative") |' in results)  # all 15 test tweets: 5 of each label
    assert ("| goal: accuracy at least 0.73 (GPT-2 small in the model card of pranavsethi01/yps1382-allin) |  | **"
            in results)
    assert "(subset: a seeded 6 of the 12; full: all 15)" in results
    full = lines(tmp_path / "out" / "full_test_predictions.jsonl")
    assert len(full) == 15 and full[0]["text"] == f'{sentence(0, 4)}, "quoted", {sentence(1, 3)}'
    assert {row["predicted"] for row in full} <= set(tweet_sentiment.LABELS)
    assert len(lines(tmp_path / "out" / "subset_test_predictions.jsonl")) == 12
    assert lines(tmp_path / "out" / "full_train.jsonl")[0] == {"text": f" {sentence(0)}", "sentiment": "negative"}


def test_tweet_sentiment_runs_one_part_into_a_block_of_its_own(data_dir, tiny_model, tmp_path, capsys):
    assert tweet_sentiment.main(smoke(data_dir, tmp_path, "--model", tiny_model, "--parts", "subset")) == 0
    results = check_outputs(tmp_path, "tweet-sentiment-subset")
    assert "| ours: the 1,000-tweet subset, SmolLM2-135M-Instruct |\n" in results and "all tweets" not in results
    assert " --parts subset`" in results
    assert not (tmp_path / "out" / "full").exists()
    assert tweet_sentiment.main(["--size", "cpu", "--parts", "full", "--out", str(tmp_path / "cpu")]) == 2
    assert capsys.readouterr().err.endswith(
        "error: --parts full: not a part of the cpu size, whose parts are subset\n")


@pytest.mark.parametrize("experiment, file, broken, error", [
    (cola, "cola/raw/in_domain_train.tsv", lambda text: text.replace("\t1\t", "\t2\t", 1),
     "line 2: unknown label '2'; CoLA's labels are 0 (unacceptable) and 1 (acceptable): correct the line, or "
     "restore the file from the source in its PROVENANCE.md"),
    (tweet_sentiment, "tweet_sentiment_extraction/test.csv",  # t0's text now spans lines 2-3, so t2 is on line 5
     lambda text: text.replace('t0,"', 't0,"two\r\nlines ', 1).replace(",positive\r\n", ",happy\r\n", 1),
     "line 5: unknown sentiment 'happy'; the labels are negative, neutral, positive: correct the line, or restore "
     "the file from the source in its PROVENANCE.md"),
])
def test_an_unknown_label_is_one_line_naming_its_line(data_dir, tiny_model, tmp_path, capsys, experiment, file,
                                                      broken, error):
    broken_dir = tmp_path / "data"
    shutil.copytree(data_dir, broken_dir)
    path = broken_dir / file
    path.write_bytes(broken(path.read_bytes().decode()).encode())
    assert experiment.main(smoke(broken_dir, tmp_path, "--model", tiny_model)) == 2
    assert capsys.readouterr().err == f"error: {path} {error}\n"
