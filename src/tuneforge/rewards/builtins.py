"""Built-in reward functions, each a factory: settings in, a TRL-signature function out.

Every built-in takes `completions` (plain strings, or TRL's conversational form `[{"role": "assistant",
"content": ...}]`) and returns one float (or None: "no opinion", skipped for that sample) per completion.

| name         | settings (defaults)                                | reward                                              |
|--------------|----------------------------------------------------|-----------------------------------------------------|
| `accuracy`   | `column` ("solution", else "answer")               | 1.0 if the answer matches the column, else 0.0      |
| `format`     | `pattern` (`<think>.*?</think>\\s*<answer>.*?</answer>`) | 1.0 if the stripped completion fully matches, else 0.0 |
| `length`     | `max_words` (50) or `max_tokens`                   | 1.0 within the limit, falling linearly to 0 at twice it |
| `repetition` | `ngram_size` (3), `max_penalty` (-1.0)             | max_penalty x share of repeated n-grams (0 = none)  |
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

from tuneforge.errors import ConfigError
from tuneforge.registry import Registry

RewardFn = Callable[..., list[float | None]]

BUILTINS: Registry[Callable[..., RewardFn]] = Registry("built-in reward function", ConfigError)

DEFAULT_FORMAT = r"<think>.*?</think>\s*<answer>.*?</answer>"
ANSWER_COLUMNS = ("solution", "answer")


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the content of TRL's conversational [{"role", "content"}] form."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        return "".join(str(message.get("content", "")) for message in completion)
    return str(completion)


# ------------------------------------------------------------------------------------------ accuracy


def last_boxed(text: str) -> str | None:
    r"""Content of the last \boxed{...} (or \fbox{...}) in text, braces balanced; None when there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_answer(text: str) -> str:
    r"""The answer part of a completion: the last \boxed{} content, else the last <answer>...</answer>, else the
    whole text; stripped."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    tagged = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
    return (tagged[-1] if tagged else text).strip()


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def parse_number(text: str) -> Fraction | None:
    r"""The number that text is (commas, $, %, a trailing period, \frac{a}{b} and a/b allowed), else None."""
    t = text.strip().rstrip(".").replace("$", "").replace("%", "").replace(",", "").replace(" ", "")
    frac = re.fullmatch(r"\\d?frac\{(-?\d+)\}\{(-?\d+)\}", t)
    if frac:
        t = f"{frac.group(1)}/{frac.group(2)}"
    if not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)(/-?\d+)?", t):
        return None
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(completion: str, gold: str) -> bool:
    """Exact match of the extracted answers after stripping; for a numeric gold answer, numeric equality with the
    extracted answer, or else with the last number in it ("... so the answer is 42.")."""
    answer = extract_answer(completion)
    expected = extract_answer(gold)
    if answer == expected:
        return True
    gold_number = parse_number(expected)
    if gold_number is None:
        return False
    number = parse_number(answer)
    if number is None:
        found = NUMBER.findall(answer)
        number = parse_number(found[-1]) if found else None
    return number == gold_number


@BUILTINS.register("accuracy")
def accuracy(column: str | None = None) -> RewardFn:
    """1.0 when the completion's answer equals the dataset column's (None when the row has no answer)."""

    def accuracy(completions: list[Any], **columns: Any) -> list[float | None]:
        name = column or next((c for c in ANSWER_COLUMNS if c in columns), None)
        if name is None or name not in columns:
            wanted = f"'{column}'" if column else "'solution' or 'answer'"
            raise ConfigError(
                f"reward function 'accuracy' needs the dataset column {wanted}; the rows have "
                f"{sorted(k for k in columns if k != 'trainer_state') or 'no extra columns'}. "
                "Set the column with {func: accuracy, column: <name>}"
            )
        golds = columns[name]
        return [
            None if gold is None or str(gold).strip() == ""
            else float(answers_match(completion_text(c), str(gold)))
            for c, gold in zip(completions, golds, strict=True)
        ]

    return accuracy


# ------------------------------------------------------------------------------------------ format


@BUILTINS.register("format")
def format_match(pattern: str = DEFAULT_FORMAT) -> RewardFn:
    """1.0 when the stripped completion matches `pattern` in full (re.DOTALL: `.` spans lines), else 0.0."""
    try:
        regex = re.compile(pattern, flags=re.DOTALL)
    except re.error as err:
        raise ConfigError(f"reward function 'format': pattern {pattern!r} is not a valid regex ({err})") from None

    def format(completions: list[Any], **_: Any) -> list[float | None]:
        return [float(regex.fullmatch(completion_text(c).strip()) is not None) for c in completions]

    return format


# ------------------------------------------------------------------------------------------ length


# Scripts written without spaces between words: each character counts as one word (as word processors count
# East Asian text). Han (with extension A and compatibility ideographs), kana, Hangul syllables.
CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af"
WORD = re.compile(f"[{CJK}]|[^\\s{CJK}]+")


def count_words(text: str) -> int:
    """Words of a text: runs of non-space characters, each CJK character (Han, kana, Hangul) a word of its own."""
    return len(WORD.findall(text))


@BUILTINS.register("length")
def length(max_words: int | None = None, max_tokens: int | None = None) -> RewardFn:
    """1.0 for a completion of at most the limit (words: `count_words`, so Chinese counts character by character;
    or completion tokens), then 1 - (n - limit) / limit, floored at 0 (so 0 from twice the limit). Default:
    max_words 50."""
    if max_words is not None and max_tokens is not None:
        raise ConfigError("reward function 'length': set max_words or max_tokens, not both")
    limit = max_tokens if max_tokens is not None else (max_words if max_words is not None else 50)
    if limit < 1:
        raise ConfigError(f"reward function 'length': the limit must be at least 1, got {limit}")

    def score(n: int) -> float:
        return 1.0 if n <= limit else max(0.0, 1.0 - (n - limit) / limit)

    def length(completions: list[Any], completion_ids: list[list[int]] | None = None, **_: Any) -> list[float | None]:
        if max_tokens is not None:
            if completion_ids is None:
                raise ConfigError("reward function 'length' with max_tokens needs completion_ids")
            return [score(len(ids)) for ids in completion_ids]
        return [score(count_words(completion_text(c))) for c in completions]

    return length


# ------------------------------------------------------------------------------------------ repetition


def repeated_share(words: list[str], n: int) -> float:
    """1 - distinct n-grams / all n-grams over the word list (0 when shorter than n)."""
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


@BUILTINS.register("repetition")
def repetition(ngram_size: int = 3, max_penalty: float = -1.0) -> RewardFn:
    """max_penalty x (1 - distinct/total word n-grams), lower-cased: 0 for no repeats, max_penalty at the limit
    (as ms-swift's `repetition`, from "Demystifying Long Chain-of-Thought Reasoning")."""
    if ngram_size < 1:
        raise ConfigError(f"reward function 'repetition': ngram_size must be at least 1, got {ngram_size}")
    if max_penalty > 0:
        raise ConfigError(f"reward function 'repetition': max_penalty must be <= 0, got {max_penalty}")

    def repetition(completions: list[Any], **_: Any) -> list[float | None]:
        return [
            max_penalty * repeated_share(completion_text(c).lower().split(), ngram_size) for c in completions
        ]

    return repetition
