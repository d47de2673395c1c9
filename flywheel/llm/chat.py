"""Chat-formatted text: a list of `{role, content}` messages is a text value like a string.

Datasets may hold a prompt, chosen or rejected answer either as a plain string or as chat
messages. A model with a chat template renders messages with it; a string given to a
model whose prompt format is `chat` becomes one user message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

Message = dict[str, str]
Prompt = str | list[Message]
PromptFormat = Literal["auto", "raw", "chat"]
ROLES = ("system", "user", "assistant", "tool")


class NotAText(ValueError):
    """A value is neither a string nor a list of chat messages."""


def is_messages(value: Any) -> bool:
    """Whether `value` looks like chat messages (a list or tuple of mappings)."""
    if hasattr(value, "tolist") and not isinstance(value, str):  # numpy arrays from parquet
        value = value.tolist()
    return isinstance(value, list | tuple) and all(isinstance(m, dict) for m in value)


def as_messages(value: Any, *, where: str = "value") -> list[Message]:
    """`value` as a checked list of messages; the error names `where` and the message."""
    if hasattr(value, "tolist") and not isinstance(value, str):
        value = value.tolist()
    if not isinstance(value, list | tuple) or not value:
        raise NotAText(f"{where}: chat messages must be a non-empty list of {{role, content}}")
    messages: list[Message] = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise NotAText(f"{where}: message {i} is {type(message).__name__}, not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise NotAText(f"{where}: message {i} has role {role!r}; use one of {ROLES}")
        if not isinstance(content, str):
            raise NotAText(f"{where}: message {i} has no string `content`")
        messages.append({"role": role, "content": content})
    return messages


def as_text_value(value: Any, *, where: str = "value") -> Prompt:
    """A string, or checked chat messages; anything else is a NotAText naming `where`."""
    if isinstance(value, str):
        return value
    if is_messages(value):
        return as_messages(value, where=where)
    raise NotAText(f"{where}: {type(value).__name__} is neither text nor chat messages")


def is_empty(value: Prompt) -> bool:
    """A blank string, or messages whose contents are all blank."""
    if isinstance(value, str):
        return not value.strip()
    return all(not m["content"].strip() for m in value)


def to_messages(prompt: Prompt) -> list[Message]:
    """A string becomes one user message; messages stay as they are."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_format(prompt_format: PromptFormat, tokenizer: Any) -> Literal["raw", "chat"]:
    """`auto` is chat when the tokenizer has a chat template, else raw; `chat` needs one."""
    if prompt_format == "auto":
        return "chat" if has_chat_template(tokenizer) else "raw"
    if prompt_format == "chat" and not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "the model")
        raise ValueError(
            f"prompt_format 'chat' needs a chat template, and {name}'s tokenizer has none "
            "(field: prompt_format). Use 'raw', or add a chat_template to tokenizer_config.json."
        )
    return prompt_format


def render_prompt(tokenizer: Any, prompt: Prompt, prompt_format: Literal["raw", "chat"]) -> str:
    """The text a model reads for a prompt. Chat: the template with the assistant turn
    opened. Raw: a string as it is; messages (no template to use) as `role: content`
    lines followed by `assistant:`."""
    if prompt_format == "chat":
        return tokenizer.apply_chat_template(
            to_messages(prompt), tokenize=False, add_generation_prompt=True
        )
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt) + "\nassistant:"


def render_conversation(
    tokenizer: Any, prompt: Prompt, answer: Prompt, prompt_format: Literal["raw", "chat"]
) -> tuple[str, str]:
    """(prompt text, answer text) whose concatenation is the whole exchange, for scoring
    and training: the answer is what the assistant writes after the prompt. An answer
    given as messages is their assistant turns' content."""
    prompt_text = render_prompt(tokenizer, prompt, prompt_format)
    answer_text = answer if isinstance(answer, str) else _assistant_content(answer)
    if prompt_format != "chat":
        return prompt_text, (" " + answer_text if isinstance(prompt, list) else answer_text)
    full = tokenizer.apply_chat_template(
        [*to_messages(prompt), {"role": "assistant", "content": answer_text}], tokenize=False
    )
    if not full.startswith(prompt_text):  # a template that rewrites earlier turns
        return "", full
    return prompt_text, full[len(prompt_text) :]


def _assistant_content(messages: Sequence[Message]) -> str:
    parts = [m["content"] for m in messages if m["role"] == "assistant"]
    if not parts:
        raise NotAText("an answer given as messages needs at least one assistant message")
    return "\n".join(parts)


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    """Token ids that close an assistant turn in the chat template (e.g. `<|im_end|>`,
    `<|eot_id|>`): what the template writes right after the assistant's content, when that
    is one special token."""
    if not has_chat_template(tokenizer):
        return set()
    marker = "\u2063flywheel\u2063"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}],
            tokenize=False,
        )
    except Exception:  # noqa: BLE001 - a template that cannot render this gives no ids
        return set()
    after = text.split(marker, 1)[-1] if marker in text else ""
    ids = tokenizer(after.strip(), add_special_tokens=False)["input_ids"] if after.strip() else []
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if t.special
    }
    first = ids[:1]
    return {first[0]} if first and first[0] in special else set()
