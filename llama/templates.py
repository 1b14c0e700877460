"""Prompt templates: Alpaca's, a plain chat format of <|role|> turns, a pretrained model's own chat
template, and user format strings such as "Q: {instruction}\\nA: {output}".

Every template turns an example into segments: a piece of text or a token id (BOT, EOT), each marked
True when it belongs to a response. Fine-tuning (llama/sft.py) encodes the segments one at a time and
counts the response tokens in the loss; generation encodes the same segments up to the assistant's cue.
One definition for both means the model is trained on exactly the ids it is later prompted with, and
encoding segment by segment means a response never shares a token with the prompt before it.

A conversation is a list of {"role", "content"} messages with roles in ROLES.
"""
from __future__ import annotations

import functools
import string
from collections.abc import Mapping, Sequence

from .tokenizer import Tokenizer

TEMPLATES = ("alpaca", "chat", "model", "none")
ROLES = ("system", "user", "assistant")

# (text to encode, or a token id inserted as is, None where the tokenizer lacks it; part of a response?)
Segment = tuple[str | int | None, bool]

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The standard Alpaca prompt, up to and including "### Response:\\n"; no input uses the short variant."""
    if input.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def format_fields(template: str, response: str = "output") -> list[str]:
    """The prompt fields of a format string, after checking that it ends with its one response slot."""
    slot = "{" + response + "}"
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"template {template!r} is not a valid format string ({e}); "
                         f"write fields as {{name}} and literal braces as {{{{ and }}}}") from None
    fields = [field for _, field, _, _ in parsed if field is not None]
    if response not in fields:
        raise ValueError(f"template {template!r} has no response slot {slot}; give 'alpaca', 'chat', 'model' or "
                         f"a format string that ends with {slot}, e.g. 'Q: {{instruction}}\\nA: {slot}'")
    if fields.count(response) > 1:
        raise ValueError(f"template {template!r} has {fields.count(response)} response slots {slot}; it needs "
                         "exactly one, at the end")
    if not template.endswith(slot):
        raise ValueError(f"template {template!r} must end with its response slot {slot}: "
                         "everything after it would be trained as part of the response")
    if "" in fields or any(field.isdigit() for field in fields):
        raise ValueError(f"template {template!r} has a positional slot; name every slot after a field, "
                         "e.g. {instruction}")
    return fields[:-1]


def prompt_response_segments(tokenizer: Tokenizer, prompt: str, response: str) -> list[Segment]:
    """[BOT] prompt | response [EOT]: the single-turn layout of the alpaca and format-string templates."""
    return [(tokenizer.bot_id, False), (prompt, False), (response, True), (tokenizer.eot_id, True)]


def chat_segments(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]) -> list[Segment]:
    """The "chat" format: [BOT], then "<|role|>\\n" + content + "\\n" and [EOT] per message."""
    segments: list[Segment] = [(tokenizer.bot_id, False)]
    for message in messages:
        answer = message["role"] == "assistant"
        segments += [(f"<|{message['role']}|>\n", False), (message["content"] + "\n", answer),
                     (tokenizer.eot_id, answer)]
    return segments


def model_segments(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]) -> list[Segment]:
    """A conversation in the model's own chat template, split by rendering each prefix and diffing.

    Message i adds render(messages[:i+1]) minus render(messages[:i]). An assistant message is split at
    its cue, render(messages[:i], add_generation_prompt=True): the cue is prompt, the answer counts up
    to and including the tokenizer's EOT (the template's end of turn, e.g. <|im_end|>), and whatever
    the template puts after that (ChatML's newline) is never generated, so it does not count.
    """
    eot = tokenizer.eot_token
    segments: list[Segment] = []
    done = ""  # the text of the messages so far

    def extend(count: int, add_generation_prompt: bool) -> str:
        text = render_model_template(tokenizer, messages[:count], add_generation_prompt)
        if not text.startswith(done):
            raise ValueError(f"the model's chat template is not prefix-stable: rendering the first {count} "
                             f"messages{' with the generation prompt' if add_generation_prompt else ''} does not "
                             "start with the rendering of the messages before them, so the assistant's tokens "
                             "cannot be located; use template 'chat', or a chat template that only appends")
        return text

    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            cue = extend(i, True)
            segments.append((cue[len(done):], False))
            done = cue
        text = extend(i + 1, False)
        added = text[len(done):]
        if message["role"] != "assistant":
            segments.append((added, False))
        elif eot is None or eot not in added:
            raise ValueError(f"the chat template's assistant turn {added!r} does not contain the tokenizer's "
                             f"eot_token {eot!r}, so the model could never learn to stop; load the tokenizer "
                             "with eot_token set to the template's end-of-turn token (e.g. '<|im_end|>')")
        else:
            end = added.rindex(eot) + len(eot)
            segments += [(added[:end], True), (added[end:], False)]
        done = text
    return segments


def encode_segments(tokenizer: Tokenizer, examples: Sequence[Sequence[Segment]],
                    allow_special: bool = False) -> list[tuple[list[int], list[bool]]]:
    """(ids, is_response per id) of each example; all texts go to the tokenizer in one parallel batch."""
    texts = [piece for segments in examples for piece, _ in segments if isinstance(piece, str)]
    encoded = iter(tokenizer.encode_batch(texts, allow_special=allow_special))
    result = []
    for segments in examples:
        ids: list[int] = []
        flags: list[bool] = []
        for piece, is_response in segments:
            piece_ids = next(encoded) if isinstance(piece, str) else [] if piece is None else [piece]
            ids += piece_ids
            flags += [is_response] * len(piece_ids)
        result.append((ids, flags))
    return result


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(f"the chat template rejected the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_model_template(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """Render the Jinja chat template that came with a pretrained model (e.g. SmolLM2's ChatML)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("this tokenizer has no chat template; use template 'chat' or 'alpaca' instead of 'model'")
    return _compile(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                     bos_token=tokenizer.bot_token or "", eos_token=tokenizer.eot_token or "")


def conversation_ids(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], template: str) -> list[int]:
    """Token ids of a conversation, ending with the cue for the assistant's next answer."""
    if template == "model":
        return tokenizer.encode(render_model_template(tokenizer, messages), allow_special=True)
    if template == "chat":
        [(ids, _)] = encode_segments(tokenizer, [chat_segments(tokenizer, messages) + [("<|assistant|>\n", False)]])
        return ids
    raise ValueError(f"template {template!r} cannot hold a conversation; use 'chat' or 'model'")


def user_prompt(tokenizer: Tokenizer, text: str, template: str, system: str = "",
                response: str = "output") -> str | list[int]:
    """One user message in any template: ids for chat and model templates, text for the others."""
    if template in ("chat", "model"):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return conversation_ids(tokenizer, messages, template)
    return prompt_text(text, template, response)


def prompt_text(text: str, template: str, response: str = "output") -> str:
    """A single prompt in the alpaca template, as it is ('none'), or in a format string whose response slot
    is `response`. Chat templates go through conversation_ids.

    In a format string the text fills the first prompt field and the others stay empty; a format string
    without prompt fields, such as "{text}" for plain text, takes the text as the start of the response.
    """
    if template == "alpaca":
        return alpaca_prompt(text)
    if template == "none":
        return text
    if template in TEMPLATES:
        raise ValueError(f"unknown template {template!r} for a single prompt; choose one of {', '.join(TEMPLATES)}")
    fields = format_fields(template, response)
    if not fields:
        return text
    return template.removesuffix("{" + response + "}").format_map({field: "" for field in fields} | {fields[0]: text})
