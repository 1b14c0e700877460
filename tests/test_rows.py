"""llama/rows.py's reading of --dataset: a folder whose files `datasets` cannot read as one table is said in one
line naming the file and the line or field (as data/prepare.py does), and a hub id without a network is refused
at once, not after the hub client's retries."""
import json
import socket
import time

import datasets
import pytest
import torch

from llama import Llama, LlamaConfig, Tokenizer, save_pretrained
from llama import rows as rows_module
from llama.cli import finetune
from llama.rows import load_rows

ALPACA = {"instruction": "Name a color.", "input": "", "output": "Red."}


@pytest.fixture(autouse=True)
def own_datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def folder_of(root, files: dict[str, str]):
    root.mkdir()
    for name, text in files.items():
        (root / name).write_text(text)
    return root


BAD_FOLDERS = {
    "other fields": ({"one.json": json.dumps([ALPACA]), "two.json": json.dumps([{"question": "a", "answer": "b"}])},
                     "{d}/two.json row 0 has the fields 'answer', 'question' but the rows of {d}/one.json have 'input', "
                     "'instruction', 'output': the files of one dataset must have the same fields; rename or drop "
                     "fields so that they match"),
    "a bad line": ({"rows.jsonl": json.dumps(ALPACA) + "\n\n" + '{"instruction": "x",\n'},
                   "{d}/rows.jsonl line 3 is not valid JSON: Expecting property name enclosed in double quotes at "
                   "column 21; each line of a JSON-lines file must be one JSON object"),
    "two types": ({"a.jsonl": json.dumps(ALPACA) + "\n", "b.jsonl": json.dumps(ALPACA | {"output": ["Red."]}) + "\n"},
                  "{d}/b.jsonl line 1: field 'output' holds a list, but {d}/a.jsonl line 1 holds a string there; give "
                  "the field one type in every row"),
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_a_folder_that_is_not_one_table_names_the_file_and_line(case, tmp_path):
    files, message = BAD_FOLDERS[case]
    folder = folder_of(tmp_path / "rows", files)
    with pytest.raises(ValueError) as error:
        load_rows(folder)
    assert str(error.value) == message.format(d=folder)


def test_a_folder_of_consistent_files_loads_its_train_split(tmp_path):
    folder = folder_of(tmp_path / "rows", {"train.jsonl": json.dumps(ALPACA) + "\n",
                                           "test.jsonl": json.dumps(ALPACA | {"output": "Blue."}) + "\n"})
    assert list(load_rows(folder)) == [ALPACA]
    assert list(load_rows(folder, split="test")) == [ALPACA | {"output": "Blue."}]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tokenizer = Tokenizer.train(["Name a color. Red."] * 20, vocab_size=280)
    torch.manual_seed(0)
    save_pretrained(Llama(LlamaConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size)), tokenizer, folder,
                    format="ours")
    return folder


@pytest.mark.parametrize("case", ["other fields", "a bad line"])
def test_finetune_on_such_a_folder_says_one_line(case, tiny_model, tmp_path, capsys):
    files, message = BAD_FOLDERS[case]
    folder = folder_of(tmp_path / "rows", files)
    before = {path: path.read_bytes() for path in folder.iterdir()}
    out = tmp_path / "run"
    assert finetune.main(["--model", str(tiny_model), "--dataset", str(folder), "--out", str(out),
                          "--max-steps", "1"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "error: " + message.format(d=folder)
    assert {path: path.read_bytes() for path in folder.iterdir()} == before
    assert not out.exists() or not any(out.rglob("*"))  # nothing written (the lead: no empty folder either)


def test_a_hub_id_without_a_network_is_refused_at_once(tmp_path, monkeypatch, capsys):
    def no_network(address, timeout):
        raise socket.gaierror(-2, "Name or service not known")

    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(rows_module.socket, "create_connection", no_network)
    monkeypatch.setattr(rows_module.urllib.request, "getproxies", lambda: {})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # nothing cached
    start = time.monotonic()
    with pytest.raises(ConnectionError) as error:
        load_rows("tatsu-lab/alpaca")
    assert time.monotonic() - start < 15  # the hub client's retries take half a minute
    assert str(error.value) == (
        "tatsu-lab/alpaca is not a local file or folder, and the Hugging Face dataset tatsu-lab/alpaca cannot be "
        "loaded: cannot connect to huggingface.co (Name or service not known: no network?), and it is not in the "
        "Hugging Face cache here; pass a local .json/.jsonl/.csv/.parquet file or folder (python3 data/download.py "
        "NAME writes the project's datasets into data/NAME/ where there is a network)")
    assert "Retrying" not in capsys.readouterr().err
    assert not datasets.config.HF_HUB_OFFLINE  # the offline mode was for that load alone


def test_with_the_offline_switch_a_hub_id_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(rows_module.socket, "create_connection", lambda *args: pytest.fail("probed the network"))
    with pytest.raises(ConnectionError, match=r"^tatsu-lab/alpaca is not a local file or folder, and the Hugging "
                                              r"Face dataset tatsu-lab/alpaca cannot be loaded: HF_HUB_OFFLINE is set, "
                                              r"and it is not in the Hugging Face cache here; "):
        load_rows("tatsu-lab/alpaca")
