"""Shared test fixtures: the Llama article's own model, an independent reference kept outside the project."""
import sys
from pathlib import Path

import pytest

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


@pytest.fixture(scope="session")
def article_llama():
    """shared/reference/article_llama.py as a module; the test skips with a reason where it is absent."""
    if not (REFERENCE / "article_llama.py").is_file():
        pytest.skip(f"{REFERENCE / 'article_llama.py'} is absent: the article's model is a reference kept "
                    "beside the project, not in it")
    sys.path.insert(0, str(REFERENCE))
    import article_llama

    return article_llama


def copy_of_checkout(target: Path) -> Path:
    """This checkout's files as a fresh clone would have them (git's tracked files and the untracked ones it
    does not ignore, as they are in the working tree), copied to `target`; skips the test outside git."""
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[1]
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=False)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.decode().strip()}")
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (root / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, target / name)
    return target


def plotted_axes(runs, out, **options) -> list[dict]:
    """Draw llama.plot's figure of `runs` into `out` and return what each panel shows: title, y-label, the
    colour of each line by its label, and any x tick that is not a whole step."""
    import matplotlib.pyplot as plt

    from llama.plot import plot_runs

    drawn = []
    real_savefig = plt.Figure.savefig

    def savefig(figure, path, *args, **kwargs):
        drawn.extend({"title": ax.get_title(), "ylabel": ax.get_ylabel(),
                      "colors": {line.get_label(): line.get_color() for line in ax.get_lines()},
                      "fractional_ticks": [tick for tick in ax.get_xticks() if tick != int(tick)]}
                     for ax in figure.axes)
        return real_savefig(figure, path, *args, **kwargs)

    plt.Figure.savefig = savefig
    try:
        plot_runs(list(runs), out, **options)
    finally:
        plt.Figure.savefig = real_savefig
    return drawn


# --- a tiny chat model, trained in seconds ---------------------------------------------------------

CHAT_ANSWERS = {  # question -> the answer the tiny chat model learns by heart
    "What color is the sky?": "The sky is blue on a clear day.",
    "What do cows drink?": "Cows drink water, not milk.",
    "Name a large animal.": "The whale is the largest animal of all.",
    "Tell me a story.": "Once upon a time, a little robot found a red ball in the woods and kept it.",
    "Count to ten.": "One, two, three, four, five, six, seven, eight, nine, ten.",
    "Where do foxes live?": "Foxes live in the woods and in the fields.",
    "What is two plus two?": "Two plus two is four.",
    "Say hello.": "Hello! How can I help you today?",
}


@pytest.fixture(scope="session")
def tiny_chat():
    """(model, tokenizer): the tiny preset trained to answer CHAT_ANSWERS in the "chat" template, as a
    first message or after another exchange.

    Its greedy answers to those questions are decided by wide logit margins, so they do not depend on
    how a batch rounds, and it attends to its context (unlike an untrained model, which mostly repeats
    its last token): what a scheduler test needs. 150 full-batch AdamW steps, a few seconds on one thread.
    """
    import torch

    from llama import Llama, LlamaConfig, Tokenizer
    from llama.templates import chat_segments, encode_segments

    tokenizer = Tokenizer.train([f"{q} {a}" for q, a in CHAT_ANSWERS.items()] * 20, vocab_size=300)
    turns = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in CHAT_ANSWERS.items()]
    conversations = turns + [turns[i] + turns[(i + 1) % len(turns)] for i in range(len(turns))]  # and second turns
    encoded = encode_segments(tokenizer, [chat_segments(tokenizer, c) for c in conversations])
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.zeros(len(encoded), width, dtype=torch.long)
    mask = torch.zeros(len(encoded), width)
    for row, (row_ids, flags) in enumerate(encoded):
        ids[row, :len(row_ids)] = torch.tensor(row_ids)
        mask[row, :len(row_ids)] = torch.tensor(flags, dtype=torch.float)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains faster on one thread than on two busy ones
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = Llama(LlamaConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(150):
            loss = model.loss(ids[:, :-1], ids[:, 1:], mask[:, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.05, f"the tiny chat model did not learn its answers (loss {loss.item():.3f})"
    return model.eval().requires_grad_(False), tokenizer


@pytest.fixture(scope="session")
def chat_answers():
    """The questions and answers tiny_chat knows."""
    return dict(CHAT_ANSWERS)


WORDS = "the a fox dog cat bird runs jumps sleeps eats over under near big small red green quick lazy".split()


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """What the fault suite and the bad-input table train on, made once: a corpus of random words and its
    token shards (shards/), a tiny model of ours with their tokenizer (model/), instruction rows
    (sft.jsonl) and labelled texts (classify.csv)."""
    import csv
    import json

    import torch

    from llama import Llama, LlamaConfig, Tokenizer, save_pretrained
    from llama.data import prepare

    folder = tmp_path_factory.mktemp("tiny-world")
    generator = torch.Generator().manual_seed(0)

    def sentence(length):
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=generator))

    (folder / "corpus.txt").write_text("\n\n".join(sentence(40) + "." for _ in range(300)))
    prepare(str(folder / "corpus.txt"), folder / "shards", vocab_size=300, val_docs=20)
    tokenizer = Tokenizer.load(folder / "shards")
    torch.manual_seed(0)
    save_pretrained(Llama(LlamaConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size)), tokenizer,
                    folder / "model", format="ours")
    rows = [{"instruction": f"say {sentence(3)}", "input": "", "output": sentence(6)} for _ in range(40)]
    (folder / "sft.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with open(folder / "classify.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(40):
            writer.writerow([sentence(8), "big" if i % 2 else "small"])
    return folder
