import pytest

from llama import Tokenizer
from llama.templates import (
    ALPACA_NO_INPUT,
    ALPACA_WITH_INPUT,
    alpaca_prompt,
    chat_segments,
    conversation_ids,
    encode_segments,
    format_fields,
    model_segments,
    prompt_text,
    render_model_template,
)

# SmolLM2-135M-Instruct's chat template (ChatML, with a default system message).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


@pytest.fixture(scope="module")
def tok():
    """Bytes only, no merges: one token per ASCII character, so lengths can be counted by hand."""
    return Tokenizer.train([], vocab_size=259)


def chatml_tokenizer(template: str = SMOLLM2_TEMPLATE, eot_token: str | None = "<|im_end|>") -> Tokenizer:
    backend = Tokenizer.train([], vocab_size=259).backend
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tokenizer = Tokenizer(backend, eot_token=eot_token)
    tokenizer.chat_template = template
    return tokenizer


def test_alpaca_prompt_uses_the_no_input_variant_for_an_empty_input():
    assert alpaca_prompt("Add.", "") == alpaca_prompt("Add.", "  \n") == ALPACA_NO_INPUT.format(instruction="Add.")
    assert alpaca_prompt("Add.", "2, 3") == ALPACA_WITH_INPUT.format(instruction="Add.", input="2, 3")
    assert alpaca_prompt("Add.").endswith("### Instruction:\nAdd.\n\n### Response:\n")


def test_prompt_text():
    assert prompt_text("Add.", "alpaca") == alpaca_prompt("Add.")
    assert prompt_text("Add.", "none") == "Add."
    with pytest.raises(ValueError, match="^unknown template 'chat' for a single prompt; choose one of "
                                         "alpaca, chat, model, none$"):
        prompt_text("Add.", "chat")


def test_prompt_text_in_a_format_string():
    assert prompt_text("Add.", "Q: {instruction}\nContext: {input}\nA: {output}") == "Q: Add.\nContext: \nA: "
    assert prompt_text("Fascinating.", "{text}", response="text") == "Fascinating."  # plain text: the start
    with pytest.raises(ValueError, match="has no response slot {output}"):
        prompt_text("Add.", "Q: {instruction}")


def test_format_fields_returns_the_prompt_fields():
    assert format_fields("Q: {instruction}\nContext: {input}\nA: {output}") == ["instruction", "input"]
    assert format_fields("{question} => {answer}", response="answer") == ["question"]
    assert format_fields("{{literal}} {output}") == []


@pytest.mark.parametrize("template, message", [
    ("Q: {instruction}\nA:", "template 'Q: {instruction}\\nA:' has no response slot {output}; give 'alpaca', "
     "'chat', 'model' or a format string that ends with {output}, e.g. 'Q: {instruction}\\nA: {output}'"),
    ("chatml", "template 'chatml' has no response slot {output}; give 'alpaca', 'chat', 'model' or a format "
     "string that ends with {output}, e.g. 'Q: {instruction}\\nA: {output}'"),
    ("{output} then {output}", "template '{output} then {output}' has 2 response slots {output}; it needs "
     "exactly one, at the end"),
    ("Q: {instruction}\nA: {output}\n", "template 'Q: {instruction}\\nA: {output}\\n' must end with its "
     "response slot {output}: everything after it would be trained as part of the response"),
    ("Q: {}\nA: {output}", "template 'Q: {}\\nA: {output}' has a positional slot; name every slot after a "
     "field, e.g. {instruction}"),
    ("A: }{output}", "template 'A: }{output}' is not a valid format string (Single '}' encountered in format "
     "string); write fields as {name} and literal braces as {{ and }}"),
])
def test_format_fields_errors(template, message):
    with pytest.raises(ValueError) as error:
        format_fields(template)
    assert str(error.value) == message


def test_chat_conversation_ids_are_the_segments_then_the_cue(tok):
    expected = ([tok.bot_id] + tok.encode("<|user|>\n") + tok.encode("Hi\n") + [tok.eot_id]
                + tok.encode("<|assistant|>\n"))
    assert conversation_ids(tok, CHAT[:1], "chat") == expected
    with pytest.raises(ValueError, match="^template 'alpaca' cannot hold a conversation; use 'chat' or 'model'$"):
        conversation_ids(tok, CHAT[:1], "alpaca")


@pytest.mark.parametrize("template", ["chat", "model"])
def test_training_ids_continue_the_generation_prompt(template):
    """What generation feeds the model is exactly the training example cut where the answer starts."""
    tokenizer = chatml_tokenizer()
    segments = chat_segments if template == "chat" else model_segments
    [(ids, is_response)] = encode_segments(tokenizer, [segments(tokenizer, CHAT)], allow_special=template == "model")
    for turn in (1, 3):  # the two assistant messages
        prompt = conversation_ids(tokenizer, CHAT[:turn], template)
        assert ids[:len(prompt)] == prompt
        assert not is_response[len(prompt) - 1] and is_response[len(prompt)]


def test_model_segments_split_chatml_at_the_cue_and_after_the_end_of_turn():
    tokenizer = chatml_tokenizer()
    assert model_segments(tokenizer, CHAT) == [
        (DEFAULT_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False), ("Hello!<|im_end|>", True), ("\n", False),
        ("<|im_start|>user\n2+2?<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False), ("4<|im_end|>", True), ("\n", False),
    ]
    [(ids, is_response)] = encode_segments(tokenizer, [model_segments(tokenizer, CHAT[:2])], allow_special=True)
    assert ids == tokenizer.encode(render_model_template(tokenizer, CHAT[:2], False), allow_special=True)
    im_end = tokenizer.token_to_id("<|im_end|>")
    assert [i for i, flag in enumerate(is_response) if flag] == list(range(len(ids) - 8, len(ids) - 1))
    assert ids[-2:] == [im_end, tokenizer.encode("\n")[0]]


def test_model_template_that_is_not_prefix_stable_is_rejected():
    counting = "{{ messages | length }}{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
    with pytest.raises(ValueError) as error:
        model_segments(chatml_tokenizer(counting), CHAT)
    assert str(error.value) == (
        "the model's chat template is not prefix-stable: rendering the first 2 messages does not start with "
        "the rendering of the messages before them, so the assistant's tokens "
        "cannot be located; use template 'chat', or a chat template that only appends")


def test_model_template_whose_turns_lack_the_eot_token_is_rejected():
    with pytest.raises(ValueError) as error:
        model_segments(chatml_tokenizer(eot_token="[EOT]"), CHAT[:2])
    assert str(error.value) == (
        "the chat template's assistant turn 'Hello!<|im_end|>\\n' does not contain the tokenizer's eot_token "
        "'[EOT]', so the model could never learn to stop; load the tokenizer with eot_token set to the "
        "template's end-of-turn token (e.g. '<|im_end|>')")


def test_render_needs_a_chat_template(tok):
    with pytest.raises(ValueError, match="^this tokenizer has no chat template; use template 'chat' or 'alpaca' "
                                         "instead of 'model'$"):
        render_model_template(tok, CHAT)


def test_template_can_reject_a_conversation():
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}{% endif %}x"
    with pytest.raises(ValueError, match="^the chat template rejected the conversation: must start with user$"):
        render_model_template(chatml_tokenizer(strict), CHAT[1:])
