"""llama/evaluation.py and evaluate.py: prompts, few-shot draws, filters and scores as lm-evaluation-harness makes
them (its own functions are the reference where it has them), the batched scorer against one forward per
request, and the command line's output and bad input.

tests/test_evaluation_parity.py runs lm-evaluation-harness itself on SmolLM2 and compares item by item."""
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch

from llama import Llama, LlamaConfig, Tokenizer
from llama import evaluation as E
from llama.cli import evaluate as cli
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the reference: pip install lm-eval")

TEXTS = ["Question: How do I open a jar?\nAnswer: Twist the lid.", "The cat sat on the mat and looked at the dog.",
         "Janet has 3 apples and buys 4 more, so she has 7.", "Answer: A B C D"] * 50


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(TEXTS, vocab_size=300)
    model = Llama(LlamaConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=48)).eval()
    return model, tokenizer


def one_forward_each(model, tokenizer, pairs):
    """The plain reference: each request alone, left-truncated as the harness does, full log-softmax."""
    out = []
    with torch.no_grad():
        for context, continuation in pairs:
            head, tail = E.encode_pair(tokenizer, context, continuation)
            ids = (head + tail)[-(model.config.max_seq_len + 1):]
            logprobs = torch.log_softmax(model(torch.tensor([ids[:-1]])).float(), -1)[0]
            tail = tail[-(len(ids) - 1):]
            rows = logprobs[-len(tail):]
            target = torch.tensor(tail)
            out.append((float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())))
    return out


def test_batched_scores_equal_one_forward_per_request(tiny, monkeypatch):
    """Shared contexts (a KV cache per context, extended by each choice), identical inputs scored once,
    one-token continuations, and inputs cut on the left: all equal a forward of each request alone."""
    model, tokenizer = tiny
    shared = []
    score_shared = E._score_shared_contexts
    monkeypatch.setattr(E, "_score_shared_contexts", lambda m, contexts, served: shared.append(len(contexts)) or
                        score_shared(m, contexts, served))
    pairs = [("Question: How do I open a jar?\nAnswer:", " Twist the lid."),
             ("Question: How do I open a jar?\nAnswer:", " Hit it hard with a hammer."),
             ("Question: How do I open a jar?\nAnswer:", " Ask."),
             ("The cat sat on the", " mat"), ("The cat sat on the", " dog"),  # one-token continuations
             ("Janet has 3 apples and buys 4 more, so she has 7. " * 6, " The cat sat on the mat."),  # truncated
             ("", " The cat sat."),  # no context: the end-of-text token stands in
             ("Answer: A B C ", "D"),  # the context's trailing space moves to the continuation
             ("The cat sat on the mat and looked at the dog. Janet has", " 3 apples."),  # shared contexts of
             ("The cat sat on the mat and looked at the dog. Janet has", " 7."),  # 24 and 26 tokens, in one
             ("Janet has 3 apples and buys 4 more, so she has", " 7."),  # batch, the longer one second (its
             ("Janet has 3 apples and buys 4 more, so she has", " 8.")]  # answers are shorter)
    reference = one_forward_each(model, tokenizer, pairs)
    for batch_size in (3, 16):
        ours = E.loglikelihoods(model, tokenizer, pairs, batch_size=batch_size)
        for score, (loglikelihood, greedy) in zip(ours, reference):
            assert score.loglikelihood == pytest.approx(loglikelihood, abs=1e-4)
            assert score.greedy == greedy
    assert [s.truncated for s in ours] == [False] * 5 + [True] + [False] * 6
    assert shared == [1, 1, 1, 3]  # each context, longer than its answers, ran once for all of them
    head, tail = E.encode_pair(tokenizer, "Answer: A B C ", "D")
    assert tokenizer.decode(tail) == " D" and tokenizer.decode(head) == "Answer: A B C"
    assert E.encode_pair(tokenizer, "", " The cat sat.")[0] == [tokenizer.eot_id]


def greedy_alone(model, tokenizer, prompt, stop, max_tokens):
    """The plain reference: one prompt, a full forward per token, cut at an end-of-text id or a stop string."""
    ids, produced = tokenizer.encode(prompt)[-(model.config.max_seq_len - max_tokens):], []
    with torch.no_grad():
        while len(produced) < max_tokens:
            token = int(model(torch.tensor([ids + produced]))[0, -1].argmax())
            if token in tokenizer.stop_ids:
                break
            produced.append(token)
            if any(s in tokenizer.decode(produced) for s in stop):
                break
    text = tokenizer.decode(produced)
    for s in stop:
        text = text.split(s)[0]
    return text


def test_generation_equals_each_prompt_alone_however_rows_are_shared(tiny):
    """Prompts of different lengths whose answers end at different steps (a stop string, or max_tokens):
    rows freed by short answers are taken by later prompts, and every text equals greedy decoding alone."""
    model, tokenizer = tiny
    prompts = [TEXTS[i % 4][:n] for i, n in enumerate((5, 30, 12, 44, 8, 20, 3))]
    stop = ["e", "\n\n"]
    reference = [greedy_alone(model, tokenizer, p, stop, 12) for p in prompts]
    assert len({len(text) for text in reference}) > 2  # the answers end at different steps
    for batch_size in (1, 2, 16):
        texts, truncated = E.generate_until(model, tokenizer, prompts, stop, max_tokens=12, batch_size=batch_size)
        assert texts == reference and truncated == [False] * len(prompts)
    long = "The cat sat on the mat and looked at the dog. " * 3  # more than the 36 tokens left before 12 new ones
    texts, truncated = E.generate_until(model, tokenizer, [long, "The"], stop, max_tokens=12, batch_size=2)
    assert truncated == [True, False] and texts == [greedy_alone(model, tokenizer, p, stop, 12) for p in (long, "The")]


def test_prompts_are_the_harness_prompts():
    """HellaSwag's and WinoGrande's preprocessing against lm-evaluation-harness's own functions."""
    from lm_eval.tasks.hellaswag import utils as hellaswag
    from lm_eval.tasks.winogrande import preprocess_winogrande as winogrande

    doc = {"activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering the window "
           "of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then", "endings": [
               ", the man adds wax to the windshield and cuts it.", " [title] a person board a ski lift, while two men "
               "supporting the head of the person wearing winter clothes snow as the we girls sled.", "the man puts "
               "on a christmas coat, knitted with netting.", "the man continues removing the snow on his car."],
           "label": "3"}
    processed = hellaswag.process_docs(__import__("datasets").Dataset.from_list([doc]))[0]
    hs = E.TASKS["hellaswag"]
    assert hs.prompt(doc) == processed["query"] and hs.choices(doc) == processed["choices"]
    assert hs.target(doc) == processed["gold"] == 3
    wino = {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
            "option1": "Sarah", "option2": "Maria", "answer": "1"}
    wg = E.TASKS["winogrande"]
    assert wg.choices(wino) == winogrande.doc_to_choice(wino)
    assert wg.target(wino) == winogrande.doc_to_target(wino)
    assert E.requests(wg, wino, []) == [(c, " always got the harder cases.") for c in winogrande.doc_to_choice(wino)]
    arc = {"question": "Which is a gas?", "choices": {"text": ["ice", "steam", "rock"], "label": ["A", "B", "C"]},
           "answerKey": "B"}
    assert E.requests(E.TASKS["arc_easy"], arc, []) == [("Question: Which is a gas?\nAnswer:", " ice"),
                                                       ("Question: Which is a gas?\nAnswer:", " steam"),
                                                       ("Question: Which is a gas?\nAnswer:", " rock")]
    mmlu = {"question": " What is 2+2? ", "subject": "elementary_mathematics", "choices": ["1", "2", "3", "4"], "answer": 3}
    shot = {"question": "What is 1+1?", "subject": "elementary_mathematics", "choices": ["2", "3", "4", "5"], "answer": 0}
    (context, continuation), *_ = E.requests(E.TASKS["mmlu"], mmlu, [shot])
    assert context == ("The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
                       "What is 1+1?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer: A\n\n"
                       "What is 2+2?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:") and continuation == " A"
    lambada = {"text": "He opened the door and saw his old friend"}
    assert E.requests(E.TASKS["lambada_openai"], lambada, []) == [("He opened the door and saw his old", " friend")]


def test_few_shot_draws_are_the_harness_draws():
    """One Random(1234) drawn from in document order, k from the few-shot split, or k + 1 from the scored split
    with the document itself left out; MMLU takes the first k of its subject's dev examples."""
    from lm_eval.api.samplers import ContextSampler, FirstNSampler

    docs = [{"question": f"q{i}", "answer": f"a {i}\n#### {i}"} for i in range(30)]
    train = [{"question": f"t{i}", "answer": f"b {i}\n#### {i}"} for i in range(12)]
    gsm8k = E.TASKS["gsm8k"]
    ours, theirs = E.FewShot(gsm8k, docs, train, 5), ContextSampler(train, rnd=1234)
    assert [ours.examples(d) for d in docs[:10]] == [theirs.sample(5) for _ in docs[:10]]
    ours, theirs = E.FewShot(gsm8k, docs, None, 5), ContextSampler(docs, rnd=1234)
    drawn = [ours.examples(d) for d in docs[:10]]
    assert drawn == [theirs.sample(5, eval_doc=d) for d in docs[:10]]
    assert all(d not in shots for d, shots in zip(docs, drawn))
    subjects = [{"question": f"m{i}", "subject": "anatomy" if i % 2 else "virology", "choices": list("abcd"),
                 "answer": 0} for i in range(12)]
    first_n = E.FewShot(E.TASKS["mmlu"], subjects, subjects, 3)
    anatomy = [d for d in subjects if d["subject"] == "anatomy"]
    assert first_n.examples(subjects[1]) == FirstNSampler(anatomy).sample(3)
    prompt = E.contexts(gsm8k, docs[0], train[:2])[0]
    assert prompt == "Question: t0\nAnswer: b 0\n#### 0\n\nQuestion: t1\nAnswer: b 1\n#### 1\n\nQuestion: q0\nAnswer:"


@pytest.mark.parametrize("text", [
    "She has 3 + 4 = 7 apples.\n#### 7", "The answer is $1,234.50.", "#### -12\nThen 99", "no number here",
    "It costs 5 dollars, then 10.", "#### 3.0\n\n", "1. First, 2. second: 45"])
def test_gsm8k_extraction_and_exact_match_are_the_harness_filters(text):
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    strict = RegexFilter(r"#### (\-?[0-9\.\,]+)").apply([[text]], [{}])[0][0]
    flexible = RegexFilter(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1).apply([[text]], [{}])[0][0]
    assert E.extract(E.STRICT, text, last=False) == strict
    assert E.extract(E.FLEXIBLE, text, last=True) == flexible
    for extracted in (strict, flexible):
        for reference in ("Work.\n#### 7", "#### 1234.50", "#### -12", "#### 45"):
            expected = exact_match_hf_evaluate([extracted], [reference], regexes_to_ignore=list(E._IGNORED),
                                               ignore_case=True)["exact_match"]
            assert E.exact_match(extracted, reference) == bool(expected)


def test_metrics_stderr_and_centered_accuracy():
    mean, stderr = E.mean_and_stderr([1.0, 0.0, 1.0, 1.0])
    assert mean == 0.75 and stderr == pytest.approx(math.sqrt(0.25 / 4))
    results = {"piqa": {"acc": 0.7, "acc_norm": 0.75}, "mmlu": {"acc": 0.4}, "lambada_openai": {"acc": 0.3}}
    assert E.centered_accuracy(results) == pytest.approx(((0.75 - 0.5) / 0.5 + (0.4 - 0.25) / 0.75) / 2)
    assert E.centered_accuracy({"gsm8k": {"exact_match,strict-match": 0.1}}) is None


def piqa_folder(tmp_path: Path, rows: int = 6) -> Path:
    folder = tmp_path / "data" / "piqa"
    folder.mkdir(parents=True)
    docs = [{"goal": f"How do I open jar {i}?", "sol1": "Twist the lid.", "sol2": "Hit it with a hammer."}
            for i in range(rows)]
    (folder / "valid.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "valid-labels.lst").write_text("".join(f"{i % 2}\n" for i in range(rows)))
    return folder.parent


def test_run_task_records_every_item(tiny, tmp_path):
    model, tokenizer = tiny
    data = piqa_folder(tmp_path)
    records = []
    result = E.run_task(model, tokenizer, E.TASKS["piqa"], data, limit=5, items=records.append, progress=False)
    assert result["items"] == len(records) == 5 and result["num_fewshot"] == 0 and result["truncated"] == 0
    assert result["acc"] == pytest.approx(sum(r["acc"] for r in records) / 5)
    first = records[0]
    assert first["prompt"] == "Question: How do I open jar 0?\nAnswer:" and first["gold"] == 0
    assert [c["text"] for c in first["choices"]] == ["Twist the lid.", "Hit it with a hammer."]
    lls = [c["loglikelihood"] for c in first["choices"]]
    assert first["prediction"] == max(range(2), key=lambda j: lls[j])
    assert first["prediction_norm"] == max(range(2), key=lambda j: lls[j] / len(first["choices"][j]["text"]))


def run_cli(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "piqa,bogus"], "error: unknown task 'bogus'; the tasks are piqa, hellaswag, arc_easy, arc_challenge, "
                                "winogrande, lambada_openai, mmlu, gsm8k"),
    (["--tasks", "piqa", "--limit", "0"], "error: --limit must be at least 1, got 0"),
    (["--tasks", "piqa", "--num-fewshot", "-1"], "error: --num-fewshot must be 0 or more, got -1"),
    (["--tasks", "piqa", "--num-fewshot", "6"], "error: --num-fewshot 6 is more than the 5 examples piqa's scored "
                                                "split holds"),
    (["--tasks", "hellaswag"], "error: no hellaswag data in DATA/hellaswag: python3 data/download.py hellaswag (or "
                               "--data-dir DIR, a folder holding hellaswag/)"),
    (["--tasks", "piqa", "--batch-size", "0"], "error: --batch-size must be at least 1, got 0"),
    (["--tasks", "piqa", "--out", "OUT"], "error: --out OUT is not empty; nothing there is replaced: choose a new or "
                                          "empty folder"),
])
def test_bad_input_is_one_line_and_writes_nothing(argv, message, tmp_path, capsys):
    data = piqa_folder(tmp_path)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = [a.replace("OUT", str(out)) for a in argv] + ["--data-dir", str(data), "--model", "unused"]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, stdout, stderr = run_cli(argv, capsys)
    assert code == 2 and stdout == ""
    assert stderr == message.replace("DATA", str(data)).replace("OUT", str(out)) + "\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == before and (out / "notes.txt").read_text() == "mine"


def test_cli_prints_the_table_and_writes_results_and_items(tiny, tmp_path, capsys, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setattr("llama.hub.load_pretrained", lambda *args, **kwargs: (model, tokenizer))
    data = piqa_folder(tmp_path)
    code, stdout, stderr = run_cli(["--model", "tiny", "--tasks", "piqa", "--limit", "4", "--data-dir", str(data),
                                    "--out", str(tmp_path / "eval")], capsys)
    assert code == 0, stderr
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    piqa = results["results"]["piqa"]
    assert stdout.splitlines()[:4] == [
        "| task | metric | value | stderr | items | truncated |", "|---|---|---|---|---|---|",
        f"| piqa | acc | {piqa['acc']:.4f} | {piqa['acc_stderr']:.4f} | 4 | 0 |",
        f"| piqa | acc_norm | {piqa['acc_norm']:.4f} | {piqa['acc_norm_stderr']:.4f} | 4 | 0 |"]
    assert stdout.splitlines()[-1] == f"mean centered accuracy (multiple-choice tasks): {results['centered_accuracy']:.4f}"
    items = [json.loads(line) for line in (tmp_path / "eval" / "piqa.jsonl").read_text().splitlines()]
    assert len(items) == 4 and sum(i["acc"] for i in items) / 4 == piqa["acc"]
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["piqa.jsonl", "results.json"]


@pytest.mark.skipif(not (SHARED_DATA / "piqa").is_dir(), reason="needs ../shared/data/piqa (the maintainers' copy)")
def test_a_copy_of_the_shared_folders_reads_as_a_download(tmp_path):
    """data/download.py writes PIQA's and GSM8K's own files; the shared copies read the same."""
    for name in ("piqa", "gsm8k"):
        shutil.copytree(SHARED_DATA / name, tmp_path / name)
    docs, fewshot = E.load_docs(E.TASKS["piqa"], tmp_path)
    assert len(docs) == 1838 and fewshot is None and docs[0]["label"] == 0
    docs, fewshot = E.load_docs(E.TASKS["gsm8k"], tmp_path)
    assert len(docs) == 1319 and fewshot is None and docs[0]["answer"].endswith("#### 18")


def test_winogrande_scores_one_continuation_under_each_option(tiny, tmp_path):
    """Partial scoring: the sentence after the blank is the continuation, under the two filled-in contexts."""
    model, tokenizer = tiny
    folder = tmp_path / "winogrande"
    folder.mkdir()
    rows = [{"sentence": "The cat sat on the _ and looked at the dog.", "option1": "mat", "option2": "dog", "answer": "1"},
            {"sentence": "Janet has _ apples and buys 4 more.", "option1": "3", "option2": "7", "answer": "2"}]
    (folder / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = []
    result = E.run_task(model, tokenizer, E.TASKS["winogrande"], tmp_path, items=records.append, progress=False)
    assert result["items"] == 2 and set(result) >= {"acc", "acc_stderr"} and "acc_norm" not in result
    first = records[0]
    assert first["continuation"] == " and looked at the dog."
    assert [c["context"] for c in first["choices"]] == ["The cat sat on the mat", "The cat sat on the dog"]
    reference = one_forward_each(model, tokenizer, [(c, " and looked at the dog.") for c in
                                                    ["The cat sat on the mat", "The cat sat on the dog"]])
    assert [c["loglikelihood"] for c in first["choices"]] == pytest.approx([r[0] for r in reference], abs=1e-4)
    assert records[1]["gold"] == 1 and first["gold"] == 0


def test_a_classifier_is_refused_in_one_line_naming_it(tiny, tmp_path, capsys, monkeypatch):
    """A model whose fine-tuning task writes no text (the run's record says so) scores no benchmark."""
    from llama.tasks.classify import LlamaClassifier

    model, tokenizer = tiny
    classifier = LlamaClassifier.from_backbone(model, ["no", "yes"])
    monkeypatch.setattr("llama.hub.load_pretrained", lambda *args, **kwargs: (classifier, tokenizer))
    code, stdout, stderr = run_cli(["--model", "runs/tweets", "--tasks", "piqa", "--data-dir",
                                    str(piqa_folder(tmp_path))], capsys)
    assert code == 2 and stderr == ("error: runs/tweets is not a language model (a sequence classifier (labels no, "
                                    "yes) scores no benchmark)\n")
