"""Where the experiments find their data: --data-dir if given, else data/ when a download finished there, else
../shared/data, else a download into data/; offline, one line that names the dataset, the download command and
--data-dir. Every experiment's --smoke both ways: with no data and offline it prints that line (a fresh clone
too), and with --data-dir ../shared/data it runs."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_experiments import data_dir, tiny_model  # noqa: F401  (fixtures: a tiny model standing in for SmolLM2)
from test_sources import mirror  # noqa: F401  (a fixture: a file:// mirror of star_trek_tos_transcripts)

from data import sources
from experiments import chat_sft, cola, common, instruction_sft, pretraining, spock, tweet_sentiment

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
FIRST_DATASET = {spock: "star_trek_tos_transcripts", pretraining: "enwiki_wikiextractor_sample",
                 instruction_sft: "alpaca", chat_sft: "oasst1_en_validation", cola: "cola",
                 tweet_sentiment: "tweet_sentiment_extraction"}
IDS = [module.__name__.split(".")[-1] for module in FIRST_DATASET]


def offline_line(name: str, downloads: Path, shared: Path) -> str:
    return (f"error: {name} is in neither {downloads} nor {shared}, and HF_HUB_OFFLINE is set, so it cannot be "
            f"downloaded: run python3 data/download.py {name} once online, or pass --data-dir DIR, a folder that "
            f"holds {name}/\n")


@pytest.fixture
def nowhere(tmp_path, monkeypatch) -> Path:
    """No finished download in data/ and no ../shared/data: both point into an empty folder."""
    monkeypatch.setattr(common, "DOWNLOADS", tmp_path / "downloads")
    monkeypatch.setattr(common, "SHARED_DATA", tmp_path / "shared")
    return tmp_path


def given(folder: Path | None = None) -> argparse.Namespace:
    return argparse.Namespace(data_dir=folder)


def test_data_dir_first_then_a_finished_download_then_the_shared_copy(nowhere):
    for folder in ("downloads", "shared", "mine"):
        (nowhere / folder / "cola").mkdir(parents=True)
    assert common.data_folder(given(), "cola") == nowhere / "shared" / "cola"  # data/cola has no PROVENANCE.md yet
    (nowhere / "downloads" / "cola" / sources.PROVENANCE).write_text("finished")
    assert common.data_folder(given(), "cola") == nowhere / "downloads" / "cola"
    assert common.data_folder(given(nowhere / "mine"), "cola") == nowhere / "mine" / "cola"


def test_a_dataset_in_neither_is_downloaded_into_data(nowhere, mirror, monkeypatch):  # noqa: F811
    folder = common.data_folder(given(), "star_trek_tos_transcripts")
    assert folder == nowhere / "downloads" / "star_trek_tos_transcripts" and sources.is_complete(folder)
    monkeypatch.setattr(sources, "fetch_url", lambda *args: pytest.fail("fetched a finished download again"))
    assert common.data_file(given(), "star_trek_tos_transcripts", sources.SPOCK_LINES) == folder / sources.SPOCK_LINES


def test_a_failed_download_is_one_line_with_its_reason(nowhere, monkeypatch):
    def unreachable(url, path, progress):
        raise sources.Unavailable(f"cannot fetch {url}: [Errno -2] Name or service not known")

    monkeypatch.setattr(sources, "fetch_url", unreachable)
    with pytest.raises(common.ExperimentError) as error:
        common.data_folder(given(), "tinyshakespeare")
    url = "https://raw.githubusercontent.com/karpathy/char-rnn/6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/data/" \
          "tinyshakespeare/input.txt"
    assert str(error.value) == (
        f"tinyshakespeare is in neither {nowhere / 'downloads'} nor {nowhere / 'shared'}, and downloading it failed "
        f"(cannot fetch {url}: [Errno -2] Name or service not known): run python3 data/download.py tinyshakespeare "
        "once online, or pass --data-dir DIR, a folder that holds tinyshakespeare/")
    assert not (nowhere / "downloads" / "tinyshakespeare").exists()


def test_a_dataset_the_downloader_does_not_know_is_named(nowhere):
    with pytest.raises(common.ExperimentError) as error:
        common.data_folder(given(), "lima_llamafactory")
    assert str(error.value) == (
        f"lima_llamafactory is in neither {nowhere / 'downloads'} nor {nowhere / 'shared'}, and data/download.py does "
        "not know it: put it there, or pass --data-dir DIR, a folder that holds lima_llamafactory/")


@pytest.mark.parametrize("experiment", FIRST_DATASET, ids=IDS)
def test_offline_with_no_data_the_smoke_run_is_one_line(experiment, nowhere, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert experiment.main(["--smoke", "--out", str(nowhere / "out")]) == 2
    assert capsys.readouterr().err == offline_line(FIRST_DATASET[experiment], nowhere / "downloads",
                                                   nowhere / "shared")


def test_a_fresh_clone_without_shared_data_prints_the_offline_line(tmp_path):
    """`python3 experiments/cola.py --smoke` in a copy of the working tree with nothing beside it."""
    from conftest import copy_of_checkout

    clone = copy_of_checkout(tmp_path / "clone")
    env = {**os.environ, "PYTHONPATH": str(clone), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "experiments/cola.py", "--smoke", "--out", str(tmp_path / "out")],
                            cwd=clone, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == offline_line("cola", clone / "data", tmp_path / "shared" / "data")


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"no {SHARED} here (the project's copies of the data)")
@pytest.mark.filterwarnings("ignore:prompt of .* left-truncated")  # the tiny model's context is short
@pytest.mark.parametrize("experiment", FIRST_DATASET, ids=IDS)
def test_smoke_run_on_the_projects_copy(experiment, tiny_model, tmp_path):  # noqa: F811
    model = [] if experiment is pretraining else ["--model", str(tiny_model)]
    if experiment is instruction_sft:  # its pretraining step is the pretraining experiment's, run above
        model += ["--pretrained", str(tiny_model)]
    assert experiment.main(["--smoke", "--data-dir", str(SHARED), "--out", str(tmp_path / "out"), "--docs",
                            str(tmp_path / "docs" / "experiments.md"), *model]) == 0
    assert (tmp_path / "out" / "results.md").read_text().startswith("#### Smoke run (a pipeline check, not a result)")
