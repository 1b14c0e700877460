"""llama.evaluation equals lm-evaluation-harness item by item, on a few items of the real benchmarks.

The reference is lm-eval itself: its `hf` backend scores the same model (the bundled SmolLM2-135M-Instruct,
float32, written as a Hugging Face folder that stock transformers loads) on the CPU, through the installed
lm-eval's own piqa.yaml and gsm8k.yaml with only their data source pointed at the shared files. On PIQA's
first items every choice's log-likelihood agrees within 1e-4, and acc and acc_norm item by item; on
GSM8K's first problems (5-shot from the test split, the problem left out) the prompts, the greedy
generations and both filters' extracted answers are identical, with a shorter generation budget on both
sides to keep the test quick. benchmarks/evaluate.py runs the same comparison on whole splits, and times
both.
"""
import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="lm-eval's hf backend needs transformers: pip install -e .[test]")
pytest.importorskip("lm_eval", reason="the reference is lm-evaluation-harness: pip install lm-eval")

from llama.evaluation import TASKS  # noqa: E402
from llama.hub import load_pretrained  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PIQA_ITEMS = 40
GSM8K_PROBLEMS = 2
GSM8K_TOKENS = 24  # the generation budget, on both sides (the task's own is 256)
BATCH_SIZE = 16  # several batches on both sides


def benchmark_module():
    """benchmarks/evaluate.py, which writes lm-eval's task files and compares the two item by item."""
    spec = importlib.util.spec_from_file_location("benchmarks_evaluate", ROOT / "benchmarks" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """(the benchmark module, our model and tokenizer, lm-eval's HFLM, a TaskManager of the local tasks), on
    one thread: a model this small runs faster on one than on two cores that other work shares."""
    from llama.hub import bundled_smollm2

    for path in (DATA / "piqa" / "valid.jsonl", DATA / "piqa" / "valid-labels.lst", DATA / "gsm8k" / "test.jsonl"):
        if not path.is_file():
            pytest.skip(f"{path} is absent: the shared datasets are kept beside the project, not in it")
    try:
        bundled_smollm2()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    import datasets
    import transformers
    from lm_eval.tasks import TaskManager

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    bench = benchmark_module()
    folder = tmp_path_factory.mktemp("evaluation-parity")
    bench.write_hf_model(folder / "smollm2-hf")
    model, tokenizer = load_pretrained(folder / "smollm2-hf", dtype=torch.float32)
    tasks = bench.write_lm_eval_tasks(DATA, folder / "tasks", gsm8k_max_tokens=GSM8K_TOKENS)
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    lm = bench.lm_eval_model(folder / "smollm2-hf", BATCH_SIZE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield bench, model.eval(), tokenizer, lm, manager
    finally:
        torch.set_num_threads(threads)


def test_piqa_log_likelihoods_and_accuracies_equal_lm_eval(harness):
    bench, model, tokenizer, lm, manager = harness
    ours = bench.run_ours(model, tokenizer, TASKS["piqa"], DATA, PIQA_ITEMS, BATCH_SIZE)
    theirs = bench.run_lm_eval(lm, manager, bench.PIQA, PIQA_ITEMS)
    parity = bench.compare_choices(ours, theirs)
    report = "\n".join(parity.lines())
    assert parity.items == PIQA_ITEMS == len(theirs), report
    assert parity.prompts == [], report  # the same (context, continuation) requests
    assert parity.max_delta <= bench.TOLERANCE, report
    assert parity.acc == [] and parity.acc_norm == [], report
    for metric, (a, b) in parity.totals.items():
        assert a == b, f"{metric}: ours {a}, lm-eval {b}"
    # not a vacuous comparison: acc and acc_norm pick differently somewhere, and neither is all right or wrong
    assert any(r["prediction"] != r["prediction_norm"] for r in ours)
    assert 0 < parity.totals["acc"][0] < 1 and 0 < parity.totals["acc_norm"][0] < 1


def test_gsm8k_generations_and_extracted_answers_equal_lm_eval(harness):
    bench, model, tokenizer, lm, manager = harness
    gsm8k = dataclasses.replace(TASKS["gsm8k"], max_gen_tokens=GSM8K_TOKENS)
    ours = bench.run_ours(model, tokenizer, gsm8k, DATA, GSM8K_PROBLEMS, BATCH_SIZE)
    theirs = bench.run_lm_eval(lm, manager, bench.GSM8K, GSM8K_PROBLEMS)
    parity = bench.compare_generations(ours, theirs)
    report = "\n".join(parity.lines())
    assert parity.items == GSM8K_PROBLEMS, report
    assert parity.prompts == [], report  # the same five examples, drawn from the test split without the problem
    assert parity.texts == [], report
    assert parity.strict == [] and parity.flexible == [], report
    assert parity.scores == [], report
    assert all(r["prompt"].count("Question:") == 6 for r in ours)  # five shots and the problem
    assert all(r["generation"].strip() for r in ours)
    assert any(r["flexible"] != "[invalid]" for r in ours)  # an answer was extracted and compared
