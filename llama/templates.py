"""Prompt templates: the Llama article's Alpaca and chat formats, and a pretrained model's own chat template.

A conversation is a list of {"role", "content"} messages. `conversation_ids` turns one into token ids
ending where the assistant's next answer begins, which is what generation and the chat REPL need.
"""
from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import Tokenizer

TEMPLATES = ("alpaca", "chat", "model", "none")

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


def chat_message(role: str, content: str) -> str:
    """The article's chat format for one message; EOT follows it as a token, not as text."""
    return f"<|{role}|>\n{content}\n"


def render_model_template(tokenizer: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """Render the Jinja chat template that came with a pretrained model (e.g. SmolLM2's ChatML)."""
    if not tokenizer.chat_template:
        raise ValueError("this tokenizer has no chat template; use --template chat or alpaca instead of model")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(f"the chat template rejected the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(tokenizer.chat_template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt,
        bos_token=tokenizer.bot_token or "", eos_token=tokenizer.eot_token or "")


def conversation_ids(tokenizer: Tokenizer, messages: Sequence[dict], template: str) -> list[int]:
    """Token ids of a conversation, ending with the cue for the assistant's next answer."""
    if template == "model":
        return tokenizer.encode(render_model_template(tokenizer, messages), allow_special=True)
    if template == "chat":
        ids = [tokenizer.bot_id] if tokenizer.bot_id is not None else []
        for message in messages:
            ids += tokenizer.encode(chat_message(message["role"], message["content"]))
            ids += [tokenizer.eot_id] if tokenizer.eot_id is not None else []
        return ids + tokenizer.encode("<|assistant|>\n")
    raise ValueError(f"template {template!r} cannot hold a conversation; use 'chat' or 'model'")


def prompt_text(text: str, template: str) -> str:
    """A single prompt in the alpaca template or as it is ('none'). Chat templates go through conversation_ids."""
    if template == "alpaca":
        return alpaca_prompt(text)
    if template == "none":
        return text
    raise ValueError(f"unknown template {template!r} for a single prompt; choose one of {', '.join(TEMPLATES)}")
