"""Sequence classification: pooling, loss, metrics, data errors, and finetune.py/generate.py end to end."""
import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama import (
    Llama,
    LlamaClassifier,
    LlamaConfig,
    Tokenizer,
    classify,
    load_classifier,
    load_pretrained,
    save_pretrained,
)
from llama.batch import collate
from llama.tasks.classify import (
    ClassificationDataset,
    accuracy,
    collect_labels,
    confusion_matrix,
    evaluate_classifier,
    macro_f1,
    matthews_corrcoef,
)
from llama.cli import finetune, generate
from llama.rows import split_rows
from llama.examples import PackedDataset

WORDS = {"positive": ["good", "great", "lovely", "wonderful", "happy", "nice"],
         "negative": ["bad", "awful", "sad", "terrible", "horrid"],
         "neutral": ["fine", "okay", "average", "normal", "plain"]}
THINGS = ["film", "meal", "trip", "game", "song", "book"]
ROWS = [{"text": f"the {THINGS[i % len(THINGS)]} was {word}", "sentiment": label}
        for label, words in WORDS.items() for i, word in enumerate(words)]  # 16 rows


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([row["text"] for row in ROWS] * 20, vocab_size=320)


@pytest.fixture(scope="module")
def classifier(tok):
    torch.manual_seed(0)
    backbone = Llama(LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size))
    return LlamaClassifier.from_backbone(backbone, ["negative", "neutral", "positive"]).eval()


def padded_batch(tok, texts, labels):
    dataset = ClassificationDataset([{"text": t, "label": l} for t, l in zip(texts, labels)], tok, max_len=64,
                                    labels=["negative", "neutral", "positive"])
    return collate([dataset[i] for i in range(len(dataset))], pad_id=dataset.pad_id), dataset


# --- the model ---------------------------------------------------------------------------------------

def test_from_backbone_shares_the_weights_and_adds_a_head(tok):
    backbone = Llama(LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size))
    model = LlamaClassifier.from_backbone(backbone, ["no", "yes"])
    assert model.embed_tokens.weight is backbone.embed_tokens.weight is model.lm_head.weight  # still tied
    names = [name for name, _ in model.named_parameters()]
    assert names == [name for name, _ in backbone.named_parameters()] + ["score.weight"]
    assert model.score.weight.shape == (2, 64) and model.labels == ["no", "yes"]
    untied = LlamaClassifier(LlamaConfig.from_preset("tiny", tie_word_embeddings=False), ["no", "yes"])
    assert not untied.lm_head.weight.requires_grad  # unused, so the optimizer and DDP skip it
    with pytest.raises(ValueError, match=r"^labels \['no'\] are given more than once in \['no', 'no'\]$"):
        LlamaClassifier.from_backbone(backbone, ["no", "no"])


def test_pooling_reads_the_last_real_token(tok, classifier):
    texts = ["the film was good", "the meal was awful and the trip was sad", "okay"]
    batch, dataset = padded_batch(tok, texts, ["positive", "negative", "neutral"])
    lengths = torch.tensor(dataset.lengths)
    assert len(set(dataset.lengths)) == 3 and (batch.input_ids[0, lengths[0]:] == dataset.pad_id).all()
    with torch.no_grad():
        together = classifier(batch.input_ids, lengths)
        for row in range(len(texts)):  # each row alone, unpadded: the same logits
            alone = classifier(dataset[row]["input_ids"][None])
            torch.testing.assert_close(together[row], alone[0], atol=1e-5, rtol=1e-5)
        # pooling at a pad instead would change the result
        assert not torch.allclose(classifier(batch.input_ids)[0], together[0], atol=1e-3)


def test_loss_is_cross_entropy_of_the_label_logits(tok, classifier):
    texts = ["the film was good", "the meal was awful and the trip was sad", "okay"]
    batch, dataset = padded_batch(tok, texts, ["positive", "negative", "neutral"])
    assert batch.num_counted == 3 and batch.targets[batch.loss_mask].tolist() == [2, 0, 1]
    with torch.no_grad():
        logits = classifier(batch.input_ids, torch.tensor(dataset.lengths))
        expected = -logits.log_softmax(dim=-1)[torch.arange(3), torch.tensor([2, 0, 1])]
        mean = classifier.loss(batch.input_ids, batch.targets, batch.loss_mask)
        total = classifier.loss(batch.input_ids, batch.targets, batch.loss_mask, reduction="sum")
        torch.testing.assert_close(mean, expected.mean())
        torch.testing.assert_close(total, F.cross_entropy(logits, torch.tensor([2, 0, 1]), reduction="sum"))
        one = dataset[0]  # loss_mask None: the last position of every (unpadded) row
        torch.testing.assert_close(classifier.loss(one["input_ids"][None], one["targets"][None]), expected[0])
    with pytest.raises(ValueError, match=r"^target id 3 is out of range for num_labels 3$"):
        classifier.loss(batch.input_ids, batch.targets.masked_fill(batch.loss_mask, 3), batch.loss_mask)


def test_packed_rows_give_the_same_loss(tok, classifier):
    dataset = ClassificationDataset(ROWS[::3], tok, max_len=64, label_field="sentiment")
    padded = collate([dataset[i] for i in range(len(dataset))], pad_id=dataset.pad_id)
    packed = collate([PackedDataset(dataset)[i] for i in range(len(PackedDataset(dataset)))], pad_id=dataset.pad_id)
    assert len(packed.input_ids) == 1 and packed.num_counted == 6 == len(dataset)  # every text's last token counts
    with torch.no_grad():
        torch.testing.assert_close(
            classifier.loss(packed.input_ids, packed.targets, packed.loss_mask, attn_mask=packed.attn_mask(),
                            reduction="sum"),
            classifier.loss(padded.input_ids, padded.targets, padded.loss_mask, reduction="sum"))


def test_a_saved_classifier_loads_as_one(tok, classifier, tmp_path):
    save_pretrained(classifier, tok, tmp_path / "model", format="ours")
    assert json.loads((tmp_path / "model" / "classifier.json").read_text()) == {"labels": classifier.labels}
    loaded, _ = load_pretrained(tmp_path / "model")
    assert isinstance(loaded, LlamaClassifier) and loaded.labels == classifier.labels
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    ids = torch.tensor([[tok.bot_id] + tok.encode("the film was good")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), classifier(ids))
    with pytest.raises(ValueError, match=r"^a LlamaClassifier exports only in our format for now; pass format='ours'$"):
        save_pretrained(classifier, tok, tmp_path / "hf")
    (tmp_path / "model" / "classifier.json").write_text('{"labels": ["only"]}')
    with pytest.raises(ValueError, match=r"classifier.json: a classifier needs two or more labels, none of them empty, "
                                         r"got \['only'\]$"):
        load_pretrained(tmp_path / "model")


# --- metrics -----------------------------------------------------------------------------------------

def test_metrics_match_hand_computed_values():
    actual, predicted = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    assert confusion_matrix(predicted, actual).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert accuracy(predicted, actual) == pytest.approx(4 / 6)
    # F1 per label: 2TP / (2TP + FP + FN) = 2/4, 4/5, 2/3
    assert macro_f1(predicted, actual) == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    # Gorodkin: c = 4 correct of s = 6, actual counts t = (2, 2, 2), predicted p = (2, 3, 1):
    # (c s - p.t) / sqrt((s^2 - p.p)(s^2 - t.t)) = (24 - 12) / sqrt((36 - 14)(36 - 12))
    assert matthews_corrcoef(predicted, actual) == pytest.approx(12 / math.sqrt(22 * 24))
    # binary: TP 2, FN 1, TN 2, FP 1 -> (TP TN - FP FN) / sqrt(3 * 3 * 3 * 3) = 1/3
    assert matthews_corrcoef([1, 1, 0, 0, 0, 1], [1, 1, 1, 0, 0, 0]) == pytest.approx(1 / 3)
    assert matthews_corrcoef([1, 0, 1], [1, 0, 1]) == pytest.approx(1.0)
    assert matthews_corrcoef([0, 1], [1, 0]) == pytest.approx(-1.0)
    # undefined (a constant prediction, or a single actual label) scores 0, as in scikit-learn
    assert matthews_corrcoef([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0
    assert matthews_corrcoef([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0
    # a label that is neither actual nor predicted does not count in the macro average
    assert macro_f1([0, 0, 1], [0, 1, 1], num_labels=5) == pytest.approx((2 / 3 + 2 / 3) / 2)
    with pytest.raises(ValueError, match=r"^label ids must be in \[0, 1\] for 2 labels$"):
        macro_f1([0, 2], [0, 1], num_labels=2)


def test_metrics_match_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is an optional cross-check")
    generator = torch.Generator().manual_seed(0)
    for num_labels in (2, 3, 5):
        actual = torch.randint(0, num_labels, (200,), generator=generator)
        predicted = torch.where(torch.rand(200, generator=generator) < 0.6, actual,
                                torch.randint(0, num_labels, (200,), generator=generator))
        a, p = actual.tolist(), predicted.tolist()
        assert confusion_matrix(p, a, num_labels).tolist() == metrics.confusion_matrix(a, p).tolist()
        assert accuracy(p, a) == pytest.approx(metrics.accuracy_score(a, p))
        assert macro_f1(p, a) == pytest.approx(metrics.f1_score(a, p, average="macro"))
        assert matthews_corrcoef(p, a) == pytest.approx(metrics.matthews_corrcoef(a, p))


# --- data --------------------------------------------------------------------------------------------

def test_labels_are_collected_sorted_or_taken_as_given(tok):
    assert collect_labels([{"label": 10}, {"label": 2}, {"label": 1}, {"label": 2}]) == ["1", "2", "10"]
    assert collect_labels(ROWS, "sentiment") == ["negative", "neutral", "positive"]
    given = ClassificationDataset(ROWS, tok, max_len=64, label_field="sentiment",
                                  labels=["positive", "neutral", "negative"])
    assert given.labels == ["positive", "neutral", "negative"] and given[0]["targets"][-1] == 0
    with pytest.raises(ValueError, match=r"^the rows have 1 label \(\['x'\]\) in field 'label'; a classifier needs "
                                         r"two or more, or name them with --labels$"):
        collect_labels([{"label": "x"}, {"label": "x"}])


def test_an_unknown_label_names_the_row_and_the_known_labels(tok):
    rows = [{"text": "a", "label": "yes"}, {"text": "b", "label": "no"}, {"text": "c", "label": "maybe"}]
    with pytest.raises(ValueError) as error:
        ClassificationDataset(rows, tok, max_len=64, labels=["no", "yes"], row_numbers=[4, 7, 9])
    assert str(error.value) == ("row 9: unknown label 'maybe' in field 'label'; the known labels are no, yes "
                                "(name them all with --labels)")
    with pytest.raises(ValueError, match=r"^row 1: unknown label 0 in field 'label'; the known labels are no, yes"):
        ClassificationDataset([{"text": "a", "label": "yes"}, {"text": "b", "label": 0}], tok, max_len=64,
                              labels=["no", "yes"])
    with pytest.raises(ValueError, match=r"^row 0: labels must be strings or integers, got 0.5 \(float\)$"):
        ClassificationDataset([{"text": "a", "label": 0.5}], tok, max_len=64, labels=["no", "yes"])


def test_missing_fields_are_named_with_the_fields_present(tok):
    rows = [{"sentence": "a", "label": 0}, {"sentence": "b", "label": 1}]
    with pytest.raises(ValueError) as error:
        ClassificationDataset(rows, tok, max_len=64)
    assert str(error.value) == "row 0: missing field 'text' (fields present: 'sentence', 'label')"
    assert ClassificationDataset(rows, tok, max_len=64, text_field="sentence").labels == ["0", "1"]
    with pytest.raises(ValueError, match=r"^row 1: missing field 'label' \(fields present: 'text'\)$"):
        ClassificationDataset([{"text": "a", "label": 0}, {"text": "b"}], tok, max_len=64)
    with pytest.raises(ValueError, match=r"^row 0: missing field 'hypothesis' \(fields present: 'premise', 'label'\)"):
        ClassificationDataset([{"premise": "a", "label": 0}, {"premise": "b", "label": 1}], tok, max_len=64,
                              text_field="premise", text_pair_field="hypothesis")


def test_empty_texts_are_skipped_and_long_ones_truncated(tok):
    rows = [{"text": "the film was good " * 20, "label": "a"}, {"text": " ", "label": "b"},
            {"text": None, "label": "b"}, {"text": "okay", "label": "b"}]
    dataset = ClassificationDataset(rows, tok, max_len=8)
    assert str(dataset.stats) == "2 of 4 rows kept; 1 truncated to max_len, 2 skipped for an empty text"
    assert dataset.stats.truncated == [0] and dataset.stats.empty == [1, 2] and dataset.lengths[0] == 8
    first = dataset[0]
    assert first["input_ids"][0] == tok.bot_id and first["loss_mask"].tolist() == [False] * 7 + [True]
    pair = ClassificationDataset([{"q": "okay", "a": "good", "label": 0}, {"q": "x", "a": "y", "label": 1}], tok,
                                 max_len=64, text_field="q", text_pair_field="a")
    assert pair[0]["input_ids"].tolist() == [tok.bot_id] + tok.encode("okay\ngood")


def test_classify_returns_a_label_and_its_probability(tok, classifier):
    results = classify(classifier, tok, ["the film was good", ("okay", "fine")], batch_size=1)
    with torch.no_grad():
        probabilities = classifier(torch.tensor([[tok.bot_id] + tok.encode("the film was good")])).softmax(-1)[0]
    assert results[0] == (classifier.labels[int(probabilities.argmax())], pytest.approx(float(probabilities.max())))
    assert len(results) == 2 and classify(classifier, tok, "okay")[0][0] in classifier.labels
    with pytest.raises(ValueError, match=r"^text 1 is empty; give some text to classify$"):
        classify(classifier, tok, ["okay", "  "])


# --- finetune.py and generate.py ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory, tok):
    """A tiny 'pretrained' model, and the rows as a CSV file."""
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    save_pretrained(Llama(LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size)), tok, folder / "model",
                    format="ours")
    with open(folder / "rows.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "sentiment"])
        writer.writeheader()
        writer.writerows(ROWS)
    return folder


def args(base, out, *extra):
    return ["--task", "classify", "--model", str(base / "model"), "--dataset", str(base / "rows.csv"),
            "--label-field", "sentiment", "--out", str(out), "--batch-size", "4", "--lr", "3e-3",
            "--warmup-steps", "5", "--val-fraction", "0.25", "--max-steps", "40", "--eval-every", "20",
            "--save-every", "20", *extra]


def records(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """An overfitting run on all 16 rows (validated on 4 of them), checkpointed at steps 20 and 40."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert finetune.main(args(base, out, "--keep-last", "3")) == 0
    return out


def test_finetune_classify_overfits_and_the_checkpoint_classifies(trained):
    checkpoint = trained / "step_0000040"
    assert json.loads((checkpoint / "classifier.json").read_text()) == {"labels": ["negative", "neutral", "positive"]}
    evaluations = [r for r in records(trained) if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [0, 20, 40] and not any("sample" in r for r in evaluations)
    assert {"val_accuracy", "val_macro_f1", "val_mcc"} <= set(evaluations[-1])
    model, tokenizer = load_classifier(trained)
    assert model.labels == ["negative", "neutral", "positive"]
    train_numbers, val_numbers = split_rows(len(ROWS), 0.25, 0)
    predictions = classify(model, tokenizer, [ROWS[i]["text"] for i in train_numbers])
    assert [label for label, _ in predictions] == [ROWS[i]["sentiment"] for i in train_numbers]  # 100% train accuracy
    assert all(0.5 < probability <= 1 for _, probability in predictions)
    # the trainer's validation numbers are evaluate_classifier's on the validation rows
    val = ClassificationDataset([ROWS[i] for i in val_numbers], tokenizer, max_len=256, label_field="sentiment",
                                labels=model.labels)
    batches = [collate([val[i] for i in range(len(val))], pad_id=val.pad_id)]
    scores = evaluate_classifier(model, batches)
    assert scores["val_accuracy"] == pytest.approx(evaluations[-1]["val_accuracy"])
    assert scores["val_loss"] == pytest.approx(evaluations[-1]["val_loss"], rel=1e-5)
    # its one-pass loss is the training loss's masked cross-entropy, computed by other code
    batch = batches[0]
    with torch.no_grad():
        loss = model.loss(batch.input_ids, batch.targets, batch.loss_mask, attn_mask=batch.attn_mask())
    assert scores["val_loss"] == pytest.approx(loss.item(), rel=1e-5)


def test_generate_classify_prints_label_and_probability(trained, tmp_path, capsys):
    texts = [ROWS[i]["text"] for i in split_rows(len(ROWS), 0.25, 0)[0][:3]]
    expected = [f"{label}\t{probability:.4f}" for label, probability in classify(*load_classifier(trained), texts)]
    file = tmp_path / "texts.txt"
    file.write_text(f"{texts[0]}\n\n{texts[1]}\n")  # blank lines are skipped
    assert generate.main(["--model", str(trained), "--classify", "--prompt-file", str(file)]) == 0
    assert capsys.readouterr().out.splitlines() == expected[:2]
    assert generate.main(["--model", str(trained), "--classify", "--prompt", texts[2]]) == 0
    assert capsys.readouterr().out == expected[2] + "\n"


def test_resuming_a_classify_run_continues_exactly(base, trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    (copy / "latest").write_text("step_0000020\n")  # as if the run had died after step 20
    assert finetune.main(args(base, copy, "--keep-last", "3", "--resume")) == 0

    def losses(run):
        return [(r["step"], r.get("loss"), r.get("val_accuracy")) for r in records(run)]
    assert losses(copy) == losses(trained)


def test_lora_trains_the_new_head_whole(base, tmp_path):
    out = tmp_path / "lora"
    assert finetune.main(args(base, out, "--max-steps", "2", "--lora-rank", "2", "--val-fraction", "0")) == 0
    model, _ = load_classifier(out)
    original, _ = load_pretrained(base / "model")
    assert torch.equal(model.embed_tokens.weight, original.embed_tokens.weight)
    torch.manual_seed(0)  # the head a run with --seed 0 starts from
    start = LlamaClassifier.from_backbone(original, model.labels).score.weight
    assert not torch.equal(model.score.weight, start)


def test_val_dataset_validates_on_its_rows_and_every_dataset_row_trains(base, tmp_path, capsys):
    dev = [{"text": "the song was lovely", "sentiment": "positive"},
           {"text": "the trip was bad", "sentiment": "negative"}, {"text": "the game was plain", "sentiment": "neutral"}]
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(row) + "\n" for row in dev))
    argv = ["--task", "classify", "--model", str(base / "model"), "--dataset", str(base / "rows.csv"),
            "--label-field", "sentiment", "--val-dataset", str(tmp_path / "dev.jsonl"), "--out", str(tmp_path / "run"),
            "--batch-size", "4", "--max-steps", "2"]
    assert finetune.main(argv) == 0
    assert f"training rows: {len(ROWS)} of {len(ROWS)} rows kept" in capsys.readouterr().err
    final = [r for r in records(tmp_path / "run") if "val_loss" in r][-1]
    predicted = classify(*load_classifier(tmp_path / "run"), [row["text"] for row in dev])
    right = sum(label == row["sentiment"] for (label, _), row in zip(predicted, dev))
    assert final["val_accuracy"] == pytest.approx(right / len(dev))  # validated on the dev rows

    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "so so", "sentiment": "mixed"}) + "\n")
    assert finetune.main([*argv, "--val-dataset", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: --val-dataset {tmp_path / 'bad.jsonl'} row 0: unknown label 'mixed' in field 'sentiment'; the known "
        "labels are negative, neutral, positive (name them all with --labels)")
    assert finetune.main([*argv, "--val-fraction", "0.25"]) == 2
    assert capsys.readouterr().err == ("error: --val-fraction and --val-dataset both choose the validation rows; give "
                                       "one of them\n")


def test_bad_input_gets_one_line(base, trained, tmp_path, capsys):
    (tmp_path / "rows.json").write_text(json.dumps([{"text": "a", "label": "x"}, {"text": "b", "label": "y"},
                                                    {"text": "c", "label": "z"}]))
    bad = ["--task", "classify", "--model", str(base / "model"), "--dataset", str(tmp_path / "rows.json"),
           "--labels", "x,y", "--out", str(tmp_path / "run"), "--val-fraction", "0"]
    assert finetune.main(bad) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"error: --dataset {tmp_path / 'rows.json'} row 2: unknown "
                                                        "label 'z' in field 'label'; the known labels are x, y (name "
                                                        "them all with --labels)")
    sft = ["--model", str(trained), "--dataset", str(tmp_path / "rows.json"), "--out", str(tmp_path / "sft")]
    assert finetune.main(sft) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"error: {trained} is a sequence classifier (labels "
                                                               "negative, neutral, positive); SFT needs a language model")
    assert finetune.main(args(base, tmp_path / "x", "--lora-rank", "2", "--save-adapter-only")) == 2
    assert capsys.readouterr().err.startswith("error: --save-adapter-only would leave the trained label head out")

    assert generate.main(["--model", str(base / "model"), "--classify", "--prompt", "okay"]) == 2
    assert capsys.readouterr().err == (f"error: {base / 'model'} holds a language model, not a classifier (it has no "
                                       "classifier.json); train one with finetune.py --task classify\n")
    assert generate.main(["--model", str(trained), "--prompt", "okay"]) == 2
    assert capsys.readouterr().err == (f"error: {trained} is a sequence classifier (labels negative, neutral, "
                                       "positive), which does not generate text; pass --classify to classify texts "
                                       "with it\n")
    assert generate.main(["--model", str(trained), "--classify", "--chat"]) == 2
    assert capsys.readouterr().err == ("error: --classify reads its texts from --prompt or --prompt-file; leave out "
                                       "--chat\n")


def test_a_classifier_run_reports_no_perplexity_and_plots_a_per_example_loss(base, tmp_path, capsys):
    out = tmp_path / "run"
    assert finetune.main(args(base, out, "--max-steps", "2", "--eval-every", "1", "--warmup-steps", "0")) == 0
    evaluations = [r for r in records(out) if "val_loss" in r]
    assert len(evaluations) == 3 and all("val_ppl" not in r and "val_accuracy" in r for r in evaluations)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert len(lines) == 3 and all(", accuracy " in line and "perplexity" not in line for line in lines)

    from conftest import plotted_axes

    panels = plotted_axes([out], tmp_path / "loss.png", metrics=["val_accuracy"])
    assert [(panel["ylabel"], panel["title"]) for panel in panels] == [
        ("loss (cross-entropy per example)", "loss: run"), ("accuracy", "on the validation rows: run")]
