"""benchmarks/gpu_suite.sh --dry-run: the GPU suite's steps, in tiny settings on the CPU, from `prepare` (here,
with the shared data's layout) to the results a later session copies into docs/."""
import json
import os
import subprocess
import sys
from pathlib import Path

from test_experiments import data_dir  # noqa: F401 (a fixture: the shared data's layout, a few rows per file)

ROOT = Path(__file__).resolve().parents[1]


def suite(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SUITE": str(tmp_path / "suite"), "BUILD": str(tmp_path / "build"),
           "RESULTS": str(tmp_path / "results"), "WORK": str(tmp_path / "work"), "PYTHON": sys.executable}
    env.pop("OUT", None)
    return subprocess.run(["bash", "benchmarks/gpu_suite.sh", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def test_the_gpu_suite_prepares_what_it_carries_and_runs_every_step(data_dir, tmp_path):  # noqa: F811
    prepared = suite(tmp_path, "prepare", "--dry-run", str(data_dir))
    assert prepared.returncode == 0, prepared.stderr
    assert "MiB travel (the device tool carries 64)" in prepared.stdout
    carried = tmp_path / "suite"
    assert (carried / "pretraining" / "data" / "meta.json").is_file()
    assert (carried / "pretraining" / "data" / "corpus.txt").read_text().startswith("20 Wikipedia articles")
    assert [p.name for p in (carried / "data" / "alpaca").iterdir()] == ["alpaca_data_part00_00000-00024.json"]
    assert not list(carried.rglob("corpus.jsonl"))  # the corpus file stays behind: only the shards travel

    ran = suite(tmp_path, "run", "--dry-run")
    results = tmp_path / "results"
    log = (results / "suite.log").read_text()
    assert ran.returncode == 0, log[-4000:]
    for step in ("step-benchmark-eager", "step-benchmark-compiled", "compiled-training", "pretraining",
                 "instruction-sft"):
        assert f"\n== {step}: ok, " in log, step
    assert "tweet-subset: skipped (no SMOLLM2 file)" in log
    for name in ("train_step_eager", "train_step_compiled", "compiled_training"):
        figures = json.loads((results / f"{name}.json").read_text())
        assert figures["trained_alike"] and figures["tokens_per_s"], name
    assert json.loads((results / "train_step_compiled.json").read_text())["compiled"]

    # experiments.md is docs/experiments.md with the blocks that ran rewritten in place, the plots beside it
    page, docs = (results / "experiments.md").read_text(), (ROOT / "docs" / "experiments.md").read_text()
    blocks = ("pretraining-gpu", "instruction-sft-ours-gpu")
    for block in blocks:
        assert f"<!-- begin {block} -->\n" in docs, f"docs/experiments.md has no {block} block for the suite to fill"
        assert inside(page, block).startswith("#### Smoke run (a pipeline check, not a result), ")
        assert (results / "img" / f"exp_{block.replace('-', '_')}.png").stat().st_size > 1000
    every = (*blocks, "tweet-sentiment-subset-gpu")  # skipped here: the suite leaves it to say so
    assert emptied(page, every) == emptied(docs, every)
    assert "`python3 experiments/instruction_sft.py --size gpu --smoke --data-dir " in page
    assert " --parts ours --pretrained " in inside(page, "instruction-sft-ours-gpu")


def inside(page: str, block: str) -> str:
    return page.split(f"<!-- begin {block} -->\n")[1].split(f"<!-- end {block} -->")[0]


def emptied(page: str, blocks) -> str:
    """The page with these blocks' contents taken out."""
    for block in blocks:
        page = page.replace(inside(page, block), "")
    return page


def test_the_gpu_suite_refuses_to_run_without_its_data(tmp_path):
    ran = suite(tmp_path, "run", "--dry-run")
    assert ran.returncode == 2
    assert ran.stderr == (f"error: {tmp_path / 'suite'} holds no prepared data: run benchmarks/gpu_suite.sh prepare "
                          f"first, where the data is, and carry {tmp_path / 'suite'}\n")
    prepared = suite(tmp_path, "prepare", str(tmp_path / "nowhere"))
    assert prepared.returncode == 2
    assert prepared.stderr == (f"error: data folder {tmp_path / 'nowhere'} not found; run data/download.py or pass "
                               "a data folder\n")
    assert suite(tmp_path, "again").returncode == 2
