"""Token ids of turn pairs -> training rows with labels. Pure functions over ids; no tokenizer, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

IGNORE_INDEX = -100
Status = Literal["ok", "truncated", "dropped"]
PairIds = tuple[list[int], list[int]]


@dataclass(frozen=True)
class EncodeOptions:
    """How rows become (input_ids, labels)."""

    cutoff_len: int = 2048
    train_on_prompt: bool = False
    mask_history: bool = False
    overlong: Literal["truncate", "drop"] = "truncate"


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """Lengths to keep of a (prompt, response) pair so they fit `cutoff_len`, favouring the response.

    The same rule as LLaMA-Factory: a short response is kept whole and the prompt cut; a short prompt is kept
    whole and the response cut; otherwise both are cut in proportion to their lengths.
    """
    if target_len * 2 < cutoff_len:
        max_target = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target = cutoff_len - source_len
    else:
        max_target = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target = min(max_target, target_len)
    new_source = min(max(cutoff_len - new_target, 0), source_len)
    return new_source, new_target


def encode_supervised(pairs: list[PairIds], opts: EncodeOptions, efficient_eos: int | None = None) -> dict[str, Any]:
    """input_ids and labels of a multi-turn row: responses trained, prompts masked (unless train_on_prompt).

    With `efficient_eos` (the eos id of templates such as glm4 that place no eos between turns), the row ends with
    that eos, trained, and every later prompt's first label is the eos, so each answer still learns to stop:
    LLaMA-Factory's rule, the final eos counted against cutoff_len.
    """
    end = [] if efficient_eos is None else [efficient_eos]
    total = sum(len(s) + len(t) for s, t in pairs) + len(end)
    if total > opts.cutoff_len and opts.overlong == "drop":
        return {"input_ids": [], "labels": [], "status": "dropped"}
    # With mask_history the last turn is encoded first, so truncation eats the history, never the trained turn.
    order = list(reversed(pairs)) if opts.mask_history else pairs
    input_ids: list[int] = []
    labels: list[int] = []
    used = len(end)
    for turn, (source, target) in enumerate(order):
        if used >= opts.cutoff_len:
            break
        source_len, target_len = infer_seqlen(len(source), len(target), opts.cutoff_len - used)
        source, target = source[:source_len], target[:target_len]
        used += source_len + target_len
        source_labels = list(source) if opts.train_on_prompt else [IGNORE_INDEX] * len(source)
        if efficient_eos is not None and turn > 0 and source and not opts.train_on_prompt:
            source_labels[0] = efficient_eos  # the previous answer's stop, learned at the next prompt's start
        trained = not opts.mask_history or turn == 0
        target_labels = list(target) if trained else [IGNORE_INDEX] * len(target)
        if opts.mask_history:
            input_ids = source + target + input_ids
            labels = source_labels + target_labels + labels
        else:
            input_ids += source + target
            labels += source_labels + target_labels
    status: Status = "truncated" if total > opts.cutoff_len else "ok"
    return {"input_ids": input_ids + end, "labels": labels + end, "status": status}


def encode_pairwise(prompt: list[int], chosen: list[int], rejected: list[int], opts: EncodeOptions,
                    tail: int = 0) -> dict[str, Any]:
    """Chosen and rejected sequences sharing one prompt; only the final responses are trained.

    Lengths follow LLaMA-Factory's rule (infer_seqlen on the prompt and the longer answer), but a prompt that must
    be cut loses tokens from its middle: its start (BOS, system) and its last `tail` tokens (the final user turn
    and the assistant header next to the answer) are kept, so the answer never follows a cut-off header.
    """
    longest = max(len(chosen), len(rejected))
    too_long = len(prompt) + longest > opts.cutoff_len
    if too_long and opts.overlong == "drop":
        return {"chosen_input_ids": [], "chosen_labels": [], "rejected_input_ids": [], "rejected_labels": [],
                "status": "dropped"}
    source_len, target_len = infer_seqlen(len(prompt), longest, opts.cutoff_len)
    prompt = cut_middle(prompt, source_len, tail)
    masked = list(prompt) if opts.train_on_prompt else [IGNORE_INDEX] * len(prompt)
    chosen, rejected = chosen[:target_len], rejected[:target_len]
    return {
        "chosen_input_ids": prompt + chosen, "chosen_labels": masked + chosen,
        "rejected_input_ids": prompt + rejected, "rejected_labels": masked + rejected,
        "status": "truncated" if too_long else "ok",
    }


def cut_middle(ids: list[int], keep: int, tail: int) -> list[int]:
    """`keep` tokens of `ids`: the last `tail` (or all `keep` when the tail is longer) plus the start."""
    if len(ids) <= keep:
        return list(ids)
    tail = min(tail, keep)
    return ids[:keep - tail] + ids[len(ids) - tail:]


def encode_text(ids: list[int], eos_id: int | None, cutoff_len: int) -> dict[str, Any]:
    """A pre-training row: the text's ids plus eos, every token trained, cut to cutoff_len."""
    ids = ids + ([eos_id] if eos_id is not None else [])
    status: Status = "truncated" if len(ids) > cutoff_len else "ok"
    ids = ids[:cutoff_len]
    return {"input_ids": ids, "labels": list(ids), "status": status}


def pack_blocks(rows: list[list[int]], block: int) -> list[list[int]]:
    """Concatenate pre-training ids and cut them into blocks of `block` tokens (the last may be shorter)."""
    flat = [token for row in rows for token in row]
    return [flat[i:i + block] for i in range(0, len(flat), block)]


def trained_spans(input_ids: list[int], labels: list[int]) -> list[tuple[bool, list[int]]]:
    """Runs of consecutive tokens that are all trained or all masked (for previews that mark trained text)."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(input_ids, labels):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    return runs
