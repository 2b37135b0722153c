"""Row formats (alpaca, sharegpt, openai) -> canonical types. Pure functions; errors name file, row and field."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tuneforge.data.catalog import DatasetSpec, Tags
from tuneforge.data.readers import RawRow
from tuneforge.data.types import (
    Conversation,
    Example,
    KTOExample,
    Message,
    PreferencePair,
    PromptExample,
    Text,
)
from tuneforge.errors import DataError
from tuneforge.registry import Registry

Converter = Callable[[RawRow, DatasetSpec], Example]
FORMATS: Registry[Converter] = Registry("dataset format", DataError)


def to_example(row: RawRow, spec: DatasetSpec, want_text: bool = False) -> Example:
    """Convert one raw row; `want_text` (pre-training) asks for plain text instead of a conversation."""
    example = FORMATS.get(spec.formatting)(row, spec)
    return as_text(example) if want_text else example


def as_text(example: Example) -> Text:
    """Plain text of an example (pre-training uses every message's content, joined by newlines)."""
    if isinstance(example, Text):
        return example
    messages = example.prompt + [example.chosen] if isinstance(example, PreferencePair) else example.messages
    text = "\n".join(m.content for m in messages if m.content)
    return Text(text=text, origin=example.origin)


def to_prompt(row: RawRow, spec: DatasetSpec) -> PromptExample:
    """A generation prompt (stage grpo): every turn up to the last user turn, with system and tools; the final
    answer (response, chosen, or a trailing assistant turn) becomes the `answer` column, and every column the
    format does not use is kept under its own name (a dataset's own `answer` column wins)."""
    cols = spec.columns
    if spec.formatting == "alpaca":
        prompt = _text_field(row, cols.prompt, required=True)
        query = _text_field(row, cols.query)
        content = f"{prompt}\n{query}" if prompt and query else prompt or query
        messages = _history(row, cols.history) + [Message("user", content)]
        system = _blank_to_none(_text_field(row, cols.system)) if cols.system else None
        answer_column = cols.chosen if spec.ranking else cols.response
        value = row.data.get(answer_column or "")
        answer = value[0] if isinstance(value, list) and value and isinstance(value[0], str) else value
        used = (cols.prompt, cols.query, cols.response, cols.history, cols.system, cols.tools, cols.chosen,
                cols.rejected, cols.kto_tag)
    else:
        raw = row.data.get(cols.messages)
        if not isinstance(raw, list) or not raw:
            raise DataError(f"{row.origin}: field '{cols.messages}' must be a non-empty list of messages, got "
                            f"{_short(raw)}; set columns.messages in dataset_info.json if the column has another "
                            "name")
        system = _blank_to_none(_text_field(row, cols.system)) if cols.system else None
        messages, inline_system = _tagged_messages(row, raw, spec.tags, cols.messages)
        system = system or inline_system
        answer = None
        if messages and messages[-1].role in ("assistant", "function"):
            answer, messages = messages[-1].content, messages[:-1]
        elif spec.ranking:
            answer = _single_message(row, cols.chosen, spec.tags).content
        _check_order(row, messages, spec.tags, cols.messages, ends_with_prompt=True)
        used = (cols.messages, cols.system, cols.tools, cols.chosen, cols.rejected, cols.kto_tag)
    if not messages[-1].content.strip():
        raise DataError(f"{row.origin}: the last prompt turn is empty; a generation prompt needs text to answer")
    columns = {k: v for k, v in row.data.items() if k not in used}
    if isinstance(answer, str):
        columns.setdefault("answer", answer)
    return PromptExample(messages, answer if isinstance(answer, str) else None, columns, system,
                         _tools(row, cols.tools), row.origin)


@FORMATS.register("alpaca")
def from_alpaca(row: RawRow, spec: DatasetSpec) -> Example:
    """Instruction/input/output rows (with optional system and history)."""
    cols = spec.columns
    prompt = _text_field(row, cols.prompt, required=True)
    query = _text_field(row, cols.query)
    content = f"{prompt}\n{query}" if prompt and query else prompt or query
    messages = _history(row, cols.history) + [Message("user", content)]
    system = _blank_to_none(_text_field(row, cols.system)) if cols.system else None
    tools = _tools(row, cols.tools)
    if spec.ranking:
        chosen, rejected = (_text_field(row, c or "", required=True, non_empty=True)
                            for c in (cols.chosen, cols.rejected))
        return PreferencePair(messages, Message("assistant", chosen), Message("assistant", rejected),
                              system, tools, row.origin)
    response = _response(row, cols.response)
    if response is None:  # a prompt-only row (pre-training text such as c4_demo)
        return Text(text=content, origin=row.origin)
    messages.append(Message("assistant", response))
    if cols.kto_tag:
        return KTOExample(messages, _kto_label(row, cols.kto_tag), system, tools, row.origin)
    return Conversation(messages, system, tools, row.origin)


@FORMATS.register("sharegpt")
@FORMATS.register("openai")
def from_sharegpt(row: RawRow, spec: DatasetSpec) -> Example:
    """Lists of role-tagged messages (ShareGPT `from`/`value` or OpenAI `role`/`content`)."""
    cols = spec.columns
    raw = row.data.get(cols.messages)
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{row.origin}: field '{cols.messages}' must be a non-empty list of messages, got "
                        f"{_short(raw)}; set columns.messages in dataset_info.json if the column has another name")
    system = _blank_to_none(_text_field(row, cols.system)) if cols.system else None
    messages, inline_system = _tagged_messages(row, raw, spec.tags, cols.messages)
    system = system or inline_system
    tools = _tools(row, cols.tools)
    if spec.ranking:
        _check_order(row, messages, spec.tags, cols.messages, ends_with_prompt=True)
        chosen = _single_message(row, cols.chosen, spec.tags)
        rejected = _single_message(row, cols.rejected, spec.tags)
        return PreferencePair(messages, chosen, rejected, system, tools, row.origin)
    _check_order(row, messages, spec.tags, cols.messages, ends_with_prompt=False)
    if cols.kto_tag:
        return KTOExample(messages, _kto_label(row, cols.kto_tag), system, tools, row.origin)
    return Conversation(messages, system, tools, row.origin)


def _tagged_messages(row: RawRow, raw: list, tags: Tags, field: str) -> tuple[list[Message], str | None]:
    roles = {tags.user_tag: "user", tags.assistant_tag: "assistant", tags.observation_tag: "observation",
             tags.function_tag: "function"}
    system = None
    messages = []
    for turn, item in enumerate(raw, start=1):
        if not isinstance(item, dict):
            raise DataError(f"{row.origin}: field '{field}', turn {turn}: expected an object, got {_short(item)}")
        tag = item.get(tags.role_tag)
        content = item.get(tags.content_tag)
        if turn == 1 and tag == tags.system_tag:
            system = _blank_to_none(content if isinstance(content, str) else None)
            continue
        if tag not in roles:
            raise DataError(f"{row.origin}: field '{field}', turn {turn}: role '{tag}' (key '{tags.role_tag}') is "
                            f"unknown; expected one of {', '.join(repr(t) for t in roles)}. Set tags in "
                            "dataset_info.json if your file uses other role names")
        if roles[tag] == "assistant" and item.get("tool_calls") and not content:
            # OpenAI form: an assistant turn that only calls tools is a function-call turn
            messages.append(Message("function", json.dumps(item["tool_calls"], ensure_ascii=False)))
            continue
        if content is None and roles[tag] == "function" and "tool_calls" in item:
            content = json.dumps(item["tool_calls"], ensure_ascii=False)
        if isinstance(content, (dict, list)):
            content = json.dumps(content, ensure_ascii=False)
        if not isinstance(content, str):
            raise DataError(f"{row.origin}: field '{field}', turn {turn}: '{tags.content_tag}' must be text, "
                            f"got {_short(content)}")
        messages.append(Message(roles[tag], content))
    return messages, system


def _check_order(row: RawRow, messages: list[Message], tags: Tags, field: str, ends_with_prompt: bool) -> None:
    prompt_tags = f"'{tags.user_tag}' or '{tags.observation_tag}'"
    response_tags = f"'{tags.assistant_tag}' or '{tags.function_tag}'"
    names = {"user": tags.user_tag, "observation": tags.observation_tag, "assistant": tags.assistant_tag,
             "function": tags.function_tag}
    skipped = 1 if _has_system_turn(row, field, tags) else 0  # turns are numbered as in the file
    for i, message in enumerate(messages):
        want_prompt = i % 2 == 0
        if (message.role in ("user", "observation")) != want_prompt:
            turn = i + 1 + skipped
            raise DataError(
                f"{row.origin}: field '{field}', turn {turn}: found role '{names[message.role]}' but expected "
                f"{prompt_tags if want_prompt else response_tags}; turns must alternate prompt, response, ..."
            )
    if not messages:
        raise DataError(f"{row.origin}: field '{field}' has no prompt or response turns")
    last_is_prompt = len(messages) % 2 == 1
    if last_is_prompt != ends_with_prompt:
        want = "a prompt (user) turn, with the answers in chosen/rejected" if ends_with_prompt \
            else f"a response turn ({response_tags})"
        raise DataError(f"{row.origin}: field '{field}': the last turn must be {want}; "
                        f"this row has {len(messages)} turns ending with '{names[messages[-1].role]}'")


def _has_system_turn(row: RawRow, field: str, tags: Tags) -> bool:
    raw = row.data.get(field) or []
    return bool(raw) and isinstance(raw[0], dict) and raw[0].get(tags.role_tag) == tags.system_tag


def _single_message(row: RawRow, column: str | None, tags: Tags) -> Message:
    item = row.data.get(column or "")
    if isinstance(item, str) and item.strip():
        return Message("assistant", item)
    if not isinstance(item, dict) or not isinstance(item.get(tags.content_tag), str):
        raise DataError(f"{row.origin}: field '{column}' must be a message object with '{tags.content_tag}' text, "
                        f"got {_short(item)}")
    if not item[tags.content_tag].strip():
        raise DataError(f"{row.origin}: field '{column}' has an empty '{tags.content_tag}'")
    return Message("assistant", item[tags.content_tag])


def _history(row: RawRow, column: str | None) -> list[Message]:
    if not column or row.data.get(column) in (None, "", []):
        return []
    history = row.data[column]
    if not isinstance(history, list):
        raise DataError(f"{row.origin}: field '{column}' must be a list of [prompt, response] pairs")
    messages = []
    for i, pair in enumerate(history, start=1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise DataError(f"{row.origin}: field '{column}', item {i}: expected [prompt, response] (two texts), "
                            f"got {_short(pair)}")
        messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    return messages


def _response(row: RawRow, column: str) -> str | None:
    if column not in row.data or row.data[column] is None:
        return None
    value = row.data[column]
    if isinstance(value, list):  # LLaMA-Factory drops such a row with a warning; one answer per row here
        raise DataError(f"{row.origin}: field '{column}' must be one answer (text), got a list {_short(value)}; "
                        "for a preferred and a rejected answer set \"ranking\": true with chosen/rejected columns "
                        "in dataset_info.json")
    if not isinstance(value, str):
        raise DataError(f"{row.origin}: field '{column}' must be text, got {_short(value)}")
    if not value.strip():
        raise DataError(f"{row.origin}: field '{column}' is empty; every training row needs a non-empty response")
    return value


def _text_field(row: RawRow, column: str, required: bool = False, non_empty: bool = False) -> str:
    value = row.data.get(column)
    if value is None:
        if required:
            raise DataError(f"{row.origin}: missing field '{column}'; the row has {', '.join(map(str, row.data))}. "
                            "Fix the row or set columns in dataset_info.json")
        return ""
    if not isinstance(value, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise DataError(f"{row.origin}: field '{column}' must be text, got {_short(value)}")
    if non_empty and not value.strip():
        raise DataError(f"{row.origin}: field '{column}' is empty")
    return value


def _tools(row: RawRow, column: str | None) -> str | None:
    if not column:
        return None
    value = row.data.get(column)
    if isinstance(value, str) and value.strip():
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise DataError(f"{row.origin}: field '{column}' is not valid JSON ({err.msg} at character {err.pos}); "
                            "tools must be a JSON list of function schemas") from None
    if value is None or (isinstance(value, str) and not value.strip()) or value in ([], {}):
        return None  # blank tools mean none (the LF tutorial's conversion script writes " ")
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise DataError(f"{row.origin}: field '{column}' must be a list of function schemas (objects)")
    return json.dumps(value, ensure_ascii=False)


def _kto_label(row: RawRow, column: str) -> bool:
    value = row.data.get(column)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise DataError(f"{row.origin}: field '{column}' (kto_tag) must be true or false, got {_short(value)}")


def _blank_to_none(text: str | None) -> str | None:
    return text if text and text.strip() else None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
