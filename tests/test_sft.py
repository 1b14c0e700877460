import json
import sys

import pytest
import torch
import torch.nn.functional as F
from test_templates import SMOLLM2_TEMPLATE, chatml_tokenizer

from llama import Llama, LlamaConfig, Tokenizer
from llama.batch import collate
from llama.rows import load_rows
from llama.examples import (
    FineTuningDataset,
    LengthGroupedSampler,
    PackedDataset,
    SFTBatches,
    detect_format,
    pack_examples,
)
from llama.templates import ALPACA_NO_INPUT, ALPACA_WITH_INPUT

THREE_TURNS = [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
               {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
               {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]
ALPACA_ROWS = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "Eat a balanced diet. Exercise regularly. Get enough sleep."},
    {"instruction": "Identify the odd one out.", "input": "Twitter, Instagram, Telegram", "output": "Telegram"},
    {"instruction": "What are the three primary colors?", "input": "",
     "output": "The three primary colors are red, blue, and yellow. Mixing them gives every other color."},
    {"instruction": "Translate to French.", "input": "Good morning, my friend.", "output": "Bonjour, mon ami."},
    {"instruction": "Name a fox.", "input": "", "output": "Red."},
]


@pytest.fixture(scope="module")
def tok():
    """Bytes only, no merges: one token per ASCII character, so positions can be counted by hand."""
    return Tokenizer.train([], vocab_size=259)


@pytest.fixture(scope="module")
def bpe():
    texts = [row[field] for row in ALPACA_ROWS for field in ("instruction", "input", "output")]
    return Tokenizer.train((texts + [ALPACA_NO_INPUT, ALPACA_WITH_INPUT]) * 20, vocab_size=400)


@pytest.fixture(scope="module")
def model(bpe):
    torch.manual_seed(0)
    return Llama(LlamaConfig.from_preset("tiny", vocab_size=bpe.vocab_size)).eval()


def counted(example) -> list[int]:
    return example["loss_mask"].nonzero().flatten().tolist()


def ids_of(example) -> list[int]:
    return [*example["input_ids"].tolist(), example["targets"][-1].item()]


# --- exactly which positions count -------------------------------------------------------------------

def test_alpaca_counts_the_response_and_eot_only(tok):
    row = {"instruction": "Say hi.", "input": "", "output": "Hi!"}
    example = FineTuningDataset([row], tok, template="alpaca", max_len=256)[0]
    prompt = ALPACA_NO_INPUT.format(instruction="Say hi.")
    # 46 "Below ... task." + 59 " Write ... request." + 2 "\n\n" + 17 "### Instruction:\n" + 7 "Say hi."
    # + 2 "\n\n" + 14 "### Response:\n" = 147 characters, one token each
    assert len(prompt) == len(tok.encode(prompt)) == 147
    assert ids_of(example) == [tok.bot_id] + tok.encode(prompt) + tok.encode("Hi!") + [tok.eot_id]
    # ids: BOT 0, prompt 1..147, "H" "i" "!" 148..150, EOT 151; position t predicts id t + 1
    assert counted(example) == [147, 148, 149, 150]
    assert example["targets"][150] == tok.eot_id


def test_alpaca_with_input_uses_the_long_variant(tok):
    row = {"instruction": "Add.", "input": "2, 3", "output": "5"}
    example = FineTuningDataset([row], tok, template="alpaca", max_len=256)[0]
    prompt = ALPACA_WITH_INPUT.format(instruction="Add.", input="2, 3")
    assert ids_of(example) == [tok.bot_id] + tok.encode(prompt) + tok.encode("5") + [tok.eot_id]
    assert counted(example) == [len(prompt), len(prompt) + 1]  # "5", EOT


def test_chat_counts_each_answer_and_its_eot(tok):
    example = FineTuningDataset([{"messages": THREE_TURNS}], tok, template="chat", max_len=256)[0]
    # BOT 0 | "<|system|>\n" 1-11 "Be brief.\n" 12-21 EOT 22 | "<|user|>\n" 23-31 "Hi\n" 32-34 EOT 35 |
    # "<|assistant|>\n" 36-49 "Hello!\n" 50-56 EOT 57 | "<|user|>\n" 58-66 "2+2?\n" 67-71 EOT 72 |
    # "<|assistant|>\n" 73-86 "4\n" 87-88 EOT 89 | "<|user|>\n" 90-98 "Bye\n" 99-102 EOT 103 |
    # "<|assistant|>\n" 104-117 "Bye!\n" 118-122 EOT 123
    ids = ids_of(example)
    assert len(ids) == 124 and ids[0] == tok.bot_id
    assert [i for i, t in enumerate(ids) if t == tok.eot_id] == [22, 35, 57, 72, 89, 103, 123]
    assert ids[50:57] == tok.encode("Hello!\n") and ids[87:89] == tok.encode("4\n")
    assert counted(example) == [*range(49, 57), *range(86, 89), *range(117, 123)]


def test_model_template_counts_the_answer_through_im_end():
    tokenizer = chatml_tokenizer()
    messages = THREE_TURNS[:3]
    example = FineTuningDataset([{"messages": messages}], tokenizer, template="model", max_len=256)[0]
    start, end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
    # <|im_start|> 0 "system\n" 1-7 "Be brief." 8-16 <|im_end|> 17 "\n" 18 | <|im_start|> 19 "user\n" 20-24
    # "Hi" 25-26 <|im_end|> 27 "\n" 28 | <|im_start|> 29 "assistant\n" 30-39 "Hello!" 40-45 <|im_end|> 46 "\n" 47
    ids = ids_of(example)
    assert len(ids) == 48 and [i for i, t in enumerate(ids) if t == start] == [0, 19, 29]
    assert ids[40:48] == tokenizer.encode("Hello!") + [end, tokenizer.encode("\n")[0]]
    assert counted(example) == list(range(39, 46))  # predicting "Hello!" and <|im_end|>, not the "\n" after


def test_train_on_prompt_counts_every_position(tok):
    rows = [{"messages": THREE_TURNS}]
    default = FineTuningDataset(rows, tok, template="chat", max_len=256)[0]
    everything = FineTuningDataset(rows, tok, template="chat", max_len=256, train_on_prompt=True)[0]
    assert torch.equal(default["input_ids"], everything["input_ids"])
    assert counted(everything) == list(range(123))
    prompt_positions = sorted(set(range(123)) - set(counted(default)))
    assert prompt_positions == [*range(0, 49), *range(57, 86), *range(89, 117)]


def test_alpaca_rows_in_chat_and_model_templates(tok):
    row = {"instruction": "Add.", "input": "2, 3", "output": "5"}
    chat = FineTuningDataset([row], tok, template="chat", max_len=256)[0]
    messages = [{"role": "user", "content": "Add.\n\n2, 3"}, {"role": "assistant", "content": "5"}]
    assert torch.equal(chat["input_ids"], FineTuningDataset([{"messages": messages}], tok, template="chat",
                                                            max_len=256)[0]["input_ids"])
    chatml = chatml_tokenizer()
    model = FineTuningDataset([{"instruction": "Add.", "output": "5"}], chatml, template="model", max_len=256)[0]
    ids = ids_of(model)
    assert ids[-9:] == chatml.encode("Add.<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n", allow_special=True)[-9:]
    assert counted(model) == [len(ids) - 4, len(ids) - 3]  # "5", <|im_end|>


def test_format_string_template(tok):
    rows = [{"q": "2+2?", "a": "4"}]
    example = FineTuningDataset(rows, tok, template="Q: {q}\nA: {a}", max_len=64, output_field="a")[0]
    assert ids_of(example) == [tok.bot_id] + tok.encode("Q: 2+2?\nA: ") + tok.encode("4") + [tok.eot_id]
    assert counted(example) == [11, 12]  # BOT 0, "Q: 2+2?\nA: " 1-11, "4" 12, EOT 13


def test_plain_text_without_special_tokens_counts_every_token_after_the_first(tok):
    rows = [{"text": "Fascinating."}, {"text": "I"}, {"text": "Logical, Captain."}]
    data = FineTuningDataset(rows, Tokenizer(tok.backend, eot_token=None), template="{text}", max_len=64,
                             output_field="text", special_tokens=False)
    assert [ids_of(example) for example in data] == [tok.encode("Fascinating."), tok.encode("Logical, Captain.")]
    assert counted(data[0]) == list(range(11))  # 12 characters: each one after the first is predicted
    assert data.stats.empty == [1]  # a one-token text has nothing after its first token to learn
    with pytest.raises(ValueError, match="^template 'chat' marks its turns with special tokens; plain text without "
                                         "them takes 'alpaca' or a format string such as '{text}'$"):
        FineTuningDataset([{"messages": THREE_TURNS}], tok, template="chat", max_len=64, special_tokens=False)


# --- shapes of rows ----------------------------------------------------------------------------------

def test_sharegpt_and_messages_give_identical_ids(tok):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"from": names[m["role"]], "value": m["content"]} for m in THREE_TURNS]
    for template, tokenizer in (("chat", tok), ("model", chatml_tokenizer())):
        a = FineTuningDataset([{"messages": THREE_TURNS}], tokenizer, template=template, max_len=256)
        b = FineTuningDataset([{"conversations": sharegpt}], tokenizer, template=template, max_len=256)
        assert (a.format, b.format) == ("chat", "sharegpt")
        for key in ("input_ids", "targets", "loss_mask"):
            assert torch.equal(a[0][key], b[0][key])


def test_auto_format_detection_and_field_names(tok):
    assert detect_format({"messages": []}) == "chat"
    assert detect_format({"conversations": [], "id": 3}) == "sharegpt"
    assert detect_format({"instruction": "", "output": ""}) == "alpaca"
    assert detect_format({"prompt": "", "completion": ""}, instruction_field="prompt") == "alpaca"
    rows = [{"prompt": "Add.", "context": "2, 3", "completion": "5"}]
    renamed = FineTuningDataset(rows, tok, template="alpaca", max_len=256, instruction_field="prompt",
                                input_field="context", output_field="completion")
    standard = FineTuningDataset([{"instruction": "Add.", "input": "2, 3", "output": "5"}], tok,
                                 template="alpaca", max_len=256)
    assert torch.equal(renamed[0]["input_ids"], standard[0]["input_ids"])
    dialog = FineTuningDataset([{"dialog": THREE_TURNS}], tok, template="chat", max_len=256, format="chat",
                               messages_field="dialog")
    assert torch.equal(dialog[0]["input_ids"], FineTuningDataset([{"messages": THREE_TURNS}], tok, template="chat",
                                                                 max_len=256)[0]["input_ids"])


def test_load_rows_from_lists_and_local_files(tmp_path):
    rows = ALPACA_ROWS[:3]
    assert load_rows(rows) is rows
    (tmp_path / "a.json").write_text(json.dumps(rows[:2]))
    (tmp_path / "b.jsonl").write_text(json.dumps(rows[2]) + "\n")
    loaded = load_rows([tmp_path / "a.json", tmp_path / "b.jsonl"])
    assert [dict(row) for row in loaded] == rows
    import datasets
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    parquet = load_rows(str(tmp_path / "c.parquet"))
    assert list(parquet) == rows and load_rows(parquet) is parquet
    assert list(load_rows(str(tmp_path / "*.json"))) == rows[:2]
    with pytest.raises(ValueError) as error:
        load_rows([tmp_path / "a.json", tmp_path / "c.parquet"])
    assert str(error.value) == (f"cannot load {[str(tmp_path / 'a.json'), str(tmp_path / 'c.parquet')]}: give "
                                ".json/.jsonl/.csv/.parquet files of one kind, one hub id or dataset folder, or a list "
                                "of dicts")


# --- over-long and empty rows ------------------------------------------------------------------------

def test_truncation_drop_and_empty_counts(tok):
    rows = [{"instruction": "ab", "output": "cd"},  # 1 + 2 + 2 + 1 ids: 5 positions
            {"instruction": "abcdef", "output": "ghijklmn"},  # 16 ids: 15 positions > 10
            {"instruction": "a" * 12, "output": "b"},  # the answer starts after position 10
            {"instruction": "x", "output": ""},
            {"instruction": "x", "output": " \n"}]
    data = FineTuningDataset(rows, tok, template="{instruction}{output}", max_len=10)
    assert (data.stats.rows, data.stats.truncated, data.stats.dropped, data.stats.empty) == (5, [1], [2], [3, 4])
    assert str(data.stats) == ("2 of 5 rows kept; 1 truncated to max_len, 1 dropped as too long, "
                               "2 skipped for an empty response")
    assert data.lengths == [5, 10]
    assert ids_of(data[1]) == ([tok.bot_id] + tok.encode("abcdefghijklmn") + [tok.eot_id])[:11]
    assert counted(data[1]) == [6, 7, 8, 9]  # "g" is id 7, predicted at position 6; EOT was cut off

    dropping = FineTuningDataset(rows, tok, template="{instruction}{output}", max_len=10, drop_long=True)
    assert (dropping.stats.truncated, dropping.stats.dropped, dropping.lengths) == ([], [1, 2], [5])


def test_conversations_with_an_empty_or_missing_answer_are_skipped(tok):
    rows = [{"messages": THREE_TURNS},
            {"messages": THREE_TURNS[:2]},  # no answer at all
            {"messages": THREE_TURNS[:2] + [{"role": "assistant", "content": "  "}]}]
    data = FineTuningDataset(rows, tok, template="chat", max_len=256)
    assert (len(data), data.stats.empty) == (1, [1, 2])


# --- collation, loss and packing ---------------------------------------------------------------------

def test_collate_pads_right_and_pads_never_count(bpe):
    data = FineTuningDataset(ALPACA_ROWS, bpe, template="alpaca", max_len=256)
    batch = collate([data[i] for i in range(len(data))], pad_id=data.pad_id)
    lengths = data.lengths
    assert batch.input_ids.shape == (5, max(lengths)) and batch.doc_ids is None
    for row, length in enumerate(lengths):
        assert batch.input_ids[row, 0] == bpe.bot_id
        assert batch.targets[row, length - 1] == bpe.eot_id and batch.loss_mask[row, length - 1]
        assert (batch.input_ids[row, length:] == bpe.pad_id).all() and not batch.loss_mask[row, length:].any()
    assert batch.num_counted == sum(int(data[i]["loss_mask"].sum()) for i in range(len(data)))


def test_eot_counts_even_when_it_is_also_the_pad(bpe):
    """The article's bug: with pad == EOT and the pad ignored, the model never learns to stop."""
    pad_is_eot = Tokenizer(bpe.backend, pad_token="[EOT]")  # like SmolLM2, whose pad is <|im_end|>
    data = FineTuningDataset(ALPACA_ROWS, pad_is_eot, template="alpaca", max_len=256)
    batch = collate([data[i] for i in range(len(data))], pad_id=data.pad_id)
    is_eot = batch.targets == bpe.eot_id
    assert (batch.loss_mask & is_eot).sum() == len(data)  # each example's own EOT, and no pad
    assert is_eot.sum() > len(data)


def test_pad_id_falls_back_to_zero_when_the_tokenizer_has_none(bpe):
    no_pad = Tokenizer(bpe.backend, pad_token=None)
    assert FineTuningDataset(ALPACA_ROWS, no_pad, template="alpaca", max_len=256).pad_id == 0


def masked_ce(logits, targets, mask):
    """Per-row (sum of counted cross-entropies, count), computed independently of Llama.loss."""
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    return (ce * mask).sum(dim=1), mask.sum(dim=1)


@torch.no_grad()
def test_loss_equals_hand_computed_masked_cross_entropy(bpe, model):
    data = FineTuningDataset(ALPACA_ROWS, bpe, template="alpaca", max_len=256)
    batch = collate([data[i] for i in range(len(data))], pad_id=data.pad_id)
    sums, counts = masked_ce(model(batch.input_ids), batch.targets, batch.loss_mask)
    expected = sums.sum() / counts.sum()
    assert torch.allclose(model.loss(batch.input_ids, batch.targets, batch.loss_mask), expected, atol=1e-5)
    everything = masked_ce(model(batch.input_ids), batch.targets, torch.ones_like(batch.loss_mask))
    assert not torch.allclose(everything[0].sum() / everything[1].sum(), expected, atol=1e-3)


@torch.no_grad()
def test_padding_does_not_change_any_examples_loss(bpe, model):
    data = FineTuningDataset(ALPACA_ROWS, bpe, template="alpaca", max_len=256)
    batch = collate([data[i] for i in range(len(data))], pad_id=data.pad_id)
    assert len(set(data.lengths)) == len(data)  # every row padded by a different amount (one by none)
    sums, counts = masked_ce(model(batch.input_ids), batch.targets, batch.loss_mask)
    for i in range(len(data)):
        alone = data[i]
        total = model.loss(alone["input_ids"][None], alone["targets"][None], alone["loss_mask"][None],
                           reduction="sum")
        count = alone["loss_mask"].sum()
        assert counts[i] == count
        assert torch.allclose(sums[i] / counts[i], total / count, atol=1e-5)


@torch.no_grad()
def test_packed_and_unpacked_give_the_same_loss(bpe, model):
    data = FineTuningDataset(ALPACA_ROWS * 2, bpe, template="alpaca", max_len=128)
    packed_data = PackedDataset(data)
    assert len(packed_data) < len(data)
    packed = collate([packed_data[i] for i in range(len(packed_data))], pad_id=data.pad_id)
    unpacked = collate([data[i] for i in range(len(data))], pad_id=data.pad_id)
    assert packed.num_counted == unpacked.num_counted
    expected = model.loss(unpacked.input_ids, unpacked.targets, unpacked.loss_mask, reduction="sum")
    total = model.loss(packed.input_ids, packed.targets, packed.loss_mask, attn_mask=packed.attn_mask(),
                       reduction="sum")
    assert torch.allclose(total / packed.num_counted, expected / unpacked.num_counted, atol=1e-5)
    sums, _ = masked_ce(model(packed.input_ids, attn_mask=packed.attn_mask()), packed.targets, packed.loss_mask)
    assert torch.allclose(sums.sum() / packed.num_counted, expected / unpacked.num_counted, atol=1e-5)
    leaky = model.loss(packed.input_ids, packed.targets, packed.loss_mask, reduction="sum")
    assert not torch.allclose(leaky / packed.num_counted, expected / unpacked.num_counted, atol=1e-4)


def test_packed_rows_concatenate_examples_with_doc_ids(tok):
    rows = [{"instruction": "a" * n, "output": "b"} for n in (4, 3, 2, 1)]  # 1 + n + 1 + 1 ids: n + 2 positions
    data = FineTuningDataset(rows, tok, template="{instruction}{output}", max_len=8)
    packed = PackedDataset(data)
    assert data.lengths == [6, 5, 4, 3] and packed.rows == [[0], [1, 3], [2]]
    row = packed[1]
    assert torch.equal(row["input_ids"], torch.cat([data[1]["input_ids"], data[3]["input_ids"]]))
    assert torch.equal(row["loss_mask"], torch.cat([data[1]["loss_mask"], data[3]["loss_mask"]]))
    assert row["doc_ids"].tolist() == [0] * 5 + [1] * 3
    batch = collate([packed[0], packed[1]], pad_id=0)
    assert batch.doc_ids.tolist() == [[0] * 6 + [-1] * 2, [0] * 5 + [1] * 3]
    assert not batch.loss_mask[0, 6:].any()


def test_pack_examples_is_best_fit_decreasing():
    assert pack_examples([6, 5, 4, 3, 2, 2], 8) == [[0, 4], [1, 3], [2, 5]]
    assert pack_examples([3, 8, 1], 8) == [[1], [0, 2]]
    with pytest.raises(ValueError, match=r"^example 1 has 9 positions; packing needs 1 to max_len=8$"):
        pack_examples([3, 9], 8)


# --- batch order -------------------------------------------------------------------------------------

def test_length_grouped_sampler_is_a_seeded_permutation_of_similar_lengths():
    lengths = [(i * 37) % 103 + 1 for i in range(103)]  # 1..103, shuffled
    sampler = LengthGroupedSampler(lengths, 4, seed=3, mega_batch=100)  # one mega-batch holds everything
    batches = list(sampler)
    assert len(batches) == len(sampler) == 26 and sorted(i for b in batches for i in b) == list(range(103))
    assert sum(len(b) < 4 for b in batches) == 1
    assert max(lengths) == lengths[batches[0][0]]  # the longest batch goes first
    ordered = sorted(lengths, reverse=True)
    for batch in batches:  # sorted within the mega-batch: each batch is a run of neighbouring lengths
        start = ordered.index(max(lengths[i] for i in batch))
        assert sorted((lengths[i] for i in batch), reverse=True) == ordered[start:start + len(batch)]
    assert batches == LengthGroupedSampler(lengths, 4, seed=3, mega_batch=100).batches(0)
    assert batches != sampler.batches(1) and batches != LengthGroupedSampler(lengths, 4, seed=4).batches(0)


def test_length_grouped_sampler_resumes_from_a_batch_position():
    lengths = list(range(1, 51))
    sampler = LengthGroupedSampler(lengths, 4, seed=0, mega_batch=3, drop_last=True)
    epoch2 = sampler.batches(2)
    assert len(epoch2) == 12 and all(len(b) == 4 for b in epoch2)
    sampler.set_epoch(2, start=5)
    assert list(sampler) == epoch2[5:] and len(sampler) == 7


def test_sft_batches_cover_an_epoch_resume_and_split_between_ranks(bpe):
    data = FineTuningDataset(ALPACA_ROWS * 3, bpe, template="alpaca", max_len=128)
    batches = SFTBatches(data, 2, seed=1)
    epoch = [next(batches) for _ in range(batches.batches_per_epoch)]
    assert all(b.doc_ids is None for b in epoch)
    assert sum(b.num_counted for b in epoch) == sum(int(data[i]["loss_mask"].sum()) for i in range(len(data)))
    state = batches.state_dict()
    following = [next(batches) for _ in range(3)]  # into the next epoch, in another order
    assert batches.epoch == 1 and state == {"epoch": 0, "position": batches.batches_per_epoch}
    resumed = SFTBatches(data, 2, seed=1)
    resumed.load_state_dict(state)
    assert [b.input_ids.tolist() for b in (next(resumed) for _ in range(3))] == [b.input_ids.tolist() for b in following]
    ranks = [SFTBatches(data, 1, seed=1, rank=r, world_size=2) for r in (0, 1)]
    single = SFTBatches(data, 1, seed=1)
    assert ranks[0].batches_per_epoch == len(data) // 2
    for _ in range(ranks[0].batches_per_epoch):
        assert next(ranks[0]).input_ids.tolist() == next(single).input_ids.tolist()
        assert next(ranks[1]).input_ids.tolist() == next(single).input_ids.tolist()
    packed = next(SFTBatches(data, 2, pack=True))
    assert packed.doc_ids is not None and packed.input_ids.shape[1] <= 128
    with pytest.raises(ValueError, match=rf"^{len(data)} examples make fewer than one batch for each of "
                                         rf"{len(data) + 1} processes; lower the batch size or add data$"):
        SFTBatches(data, 1, world_size=len(data) + 1)


# --- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows, options, message", [
    ([ALPACA_ROWS[0], {"instruction": "x", "input": ""}], {},
     "row 1: missing field 'output' (fields present: 'instruction', 'input')"),
    ([{"instruction": "x", "output": 3}], {}, "row 0: field 'output' must be a string, got int"),
    ([{"q": "x", "a": "y"}], {"format": "alpaca"}, "row 0: missing field 'output' (fields present: 'q', 'a')"),
    ([{"messages": THREE_TURNS[:1] + [{"role": "bot", "content": "hi"}]}], {"template": "chat"},
     "row 0: message 1: unknown role 'bot'; accepted: system, user, assistant"),
    ([{"conversations": [{"from": "user", "value": "hi"}]}], {"template": "chat"},
     "row 0: message 0: unknown role 'user'; accepted: human, gpt, system"),
    ([{"messages": [{"role": "user", "text": "hi"}]}], {"template": "chat"},
     "row 0: message 0: missing field 'content' (fields present: 'role', 'text'); chat messages need 'role' "
     "and 'content'"),
    ([{"messages": ["hi"]}], {"template": "chat"},
     "row 0: message 0 must be a dict with 'role' and 'content', got str"),
    ([{"messages": THREE_TURNS}, {"text": "hi"}], {"template": "chat"},
     "row 1: missing field 'messages' (fields present: 'text'); name the conversation field with messages_field="),
    ([{"messages": "hi"}], {"template": "chat"}, "row 0: field 'messages' must be a list of messages, got str"),
    ([{"text": "hi"}], {}, "row 0: cannot detect the format from its fields ('text'); expected 'messages' "
     "(chat), 'conversations' (sharegpt) or 'instruction' (alpaca), or pass format= and the *_field options"),
    ([{"messages": THREE_TURNS}], {}, "template 'alpaca' takes alpaca rows, but these rows are chat "
     "conversations; use template 'chat' or 'model'"),
    (ALPACA_ROWS, {"template": "Q: {instruction}"}, "template 'Q: {instruction}' has no response slot {output}; "
     "give 'alpaca', 'chat', 'model' or a format string that ends with {output}, e.g. 'Q: {instruction}\\nA: "
     "{output}'"),
    (ALPACA_ROWS, {"template": "model"}, "template 'model' needs the tokenizer's chat template, and this "
     "tokenizer has none; use template 'chat' or 'alpaca', or load a tokenizer that has one"),
    (ALPACA_ROWS, {"format": "csv"}, "unknown format 'csv'; choose one of auto, alpaca, chat, sharegpt"),
    (ALPACA_ROWS, {"max_len": 0}, "max_len=0 must be at least 1"),
    ([], {}, "no rows to fine-tune on"),
    ([{"instruction": "x", "output": ""}], {}, "no usable rows: 0 of 1 rows kept; 0 truncated to max_len, "
     "0 dropped as too long, 1 skipped for an empty response"),
])
def test_bad_input_errors(tok, rows, options, message):
    options = {"template": "alpaca", "max_len": 64, **options}
    with pytest.raises(ValueError) as error:
        FineTuningDataset(rows, tok, **options)
    assert str(error.value) == message


def test_tokenizer_without_eot_is_rejected(tok):
    with pytest.raises(ValueError) as error:
        FineTuningDataset(ALPACA_ROWS, Tokenizer(tok.backend, eot_token=None), template="alpaca", max_len=64)
    assert str(error.value) == ("the tokenizer has no eot_token, so the model could never learn to stop; load it "
                                "with eot_token set to the token that ends an answer (e.g. '[EOT]' or '<|im_end|>')")


def test_model_template_errors_name_the_row():
    counting = "{{ messages | length }}" + SMOLLM2_TEMPLATE
    with pytest.raises(ValueError, match="^row 1: the model's chat template is not prefix-stable: "):
        FineTuningDataset([{"instruction": "x", "output": ""}, {"instruction": "x", "output": "y"}],
                          chatml_tokenizer(counting), template="model", max_len=64)


def test_json_rows_load_without_the_datasets_package(tmp_path, monkeypatch):
    """GPU machines may lack `datasets`: JSON, JSON-lines and CSV files still load."""
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    rows = [{"instruction": "Say hi.", "input": "", "output": "Hi!"}, {"instruction": "Count.", "output": "1 2"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert load_rows(tmp_path / "a.json") == rows
    assert load_rows([tmp_path / "a.json", tmp_path / "b.jsonl"]) == rows + rows
    (tmp_path / "c.csv").write_text('text,label\n"Hello, world",1\nBye,0\n')
    assert load_rows(tmp_path / "c.csv") == [{"text": "Hello, world", "label": "1"}, {"text": "Bye", "label": "0"}]
    with pytest.raises(ImportError):
        load_rows(tmp_path / "c.parquet")


def test_sft_batches_plan_each_epoch_once(bpe, monkeypatch):
    """The epoch's order is computed when the epoch starts, not at every step (for 52K Alpaca rows that cost
    about 0.1 s a step)."""
    planned = []
    original = LengthGroupedSampler.batches
    monkeypatch.setattr(LengthGroupedSampler, "batches",
                        lambda self, epoch: planned.append(epoch) or original(self, epoch))
    data = FineTuningDataset(ALPACA_ROWS * 6, bpe, template="alpaca", max_len=128)
    batches = SFTBatches(data, 2, seed=1)
    assert planned == [0] and batches.batches_per_epoch == 15
    for _ in range(2 * batches.batches_per_epoch + 1):  # all of epochs 0 and 1, the first batch of epoch 2
        next(batches)
    assert planned == [0, 1, 2]
