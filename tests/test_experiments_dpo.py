"""experiments/dpo.py in its --smoke setting: a tiny data folder with the shared data's preference files (Raschka's
pairs, HH-RLHF's gzipped transcripts), a tiny chat model in place of SmolLM2."""
import gzip
import json
from pathlib import Path

import pytest
import torch
from test_experiments import CHAT_TEMPLATE, check_outputs, sentence, smoke  # the results page's checks, shared

from experiments import dpo
from llama import Llama, LlamaConfig, Tokenizer, save_pretrained

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shared_data")
    (root / "rasbt_preference_data").mkdir()
    (root / "rasbt_preference_data" / "instruction-data-with-preference.json").write_text(json.dumps(
        [{"instruction": f"Answer question {i}.", "input": "" if i % 2 else sentence(i, 3), "output": sentence(i),
          "chosen": sentence(i), "rejected": sentence(i + 7)} for i in range(40)]))
    (root / "hh_rlhf_harmless_base_test").mkdir()
    with gzip.open(root / "hh_rlhf_harmless_base_test" / "test.jsonl.gz", "wt") as f:
        for i in range(14):
            dialogue = f"\n\nHuman: {sentence(i, 4)}\n\nAssistant: {sentence(i + 1)}\n\nHuman: {sentence(i + 2, 3)}"
            last = "" if i == 3 else sentence(i + 9)  # an empty last turn: not a pair, left out
            f.write(json.dumps({"chosen": f"{dialogue}\n\nAssistant: {sentence(i + 4)}",
                                "rejected": f"{dialogue}\n\nAssistant: {last}"}) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    tokenizer = Tokenizer(Tokenizer.train([sentence(i, 12) for i in range(200)], vocab_size=300).backend,
                          chat_template=CHAT_TEMPLATE)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_pretrained(Llama(LlamaConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size)), tokenizer, folder,
                    format="ours")
    return folder


def test_dpo(data_dir, tiny_model, tmp_path):
    assert dpo.main(smoke(data_dir, tmp_path, "--model", tiny_model)) == 0
    results = check_outputs(tmp_path, "dpo")
    assert "| validation reward margin, before -> after (2 pairs) | 0.006 -> 1.576 | 0.000 -> **" in results
    assert "held-out test pairs: reward accuracy / margin (4 pairs)" in results
    # the answered instructions are the test pairs' (rows 34 to 37 of 40), never a training pair's
    assert all(f"| Answer question {i}" in results for i in (34, 35, 36, 37)) and "question 33" not in results
    assert "HH-RLHF harmless-base pairs (11 training, 1 validation" in results
    assert (tmp_path / "out" / "smollm2-hh" / "reference_logps.json").is_file()


def test_the_book_split_is_in_file_order():
    train, val, test = dpo.book_split(list(range(1100)))
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert train[-1] == 934 and test == list(range(935, 1045)) and val == list(range(1045, 1100))
