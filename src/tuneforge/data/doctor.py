"""The data doctor: a per-row report over every dataset of a config."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

from tuneforge.config.schema import RunConfig
from tuneforge.data.build import encode_options
from tuneforge.data.pipeline import IDENTITY_SETS, encode_examples, load_examples, split_validation
from tuneforge.data.types import Example, PreferencePair, RowProblem
from tuneforge.errors import TuneforgeError
from tuneforge.templates.base import Template


@dataclass
class DatasetHealth:
    """What the doctor found in one dataset."""

    name: str
    rows: int = 0
    usable: int = 0
    problems: list[RowProblem] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    trained_tokens: int = 0

    @property
    def errors(self) -> list[RowProblem]:
        return [p for p in self.problems if p.severity == "error"]


def check_datasets(cfg: RunConfig, template: Template, kind: str) -> list[DatasetHealth]:
    """Examine every dataset named in the config for a data kind; nothing is raised for bad rows, everything is
    reported."""
    data, seed = cfg.data, cfg.train.seed
    report = []
    train_keys: dict[str, str] = {}
    for name in dict.fromkeys([*data.dataset, *data.eval_dataset]):
        health = DatasetHealth(name)
        report.append(health)
        try:
            loaded = load_examples(data, name, kind, seed, strict=False)
        except TuneforgeError as err:
            health.problems.append(RowProblem(name, str(err), kind="dataset"))
            continue
        health.rows = loaded.raw_count
        health.problems += loaded.problems
        _check_duplicates(loaded.examples, health)
        _check_pairs(loaded.examples, health)
        _check_placeholders(loaded.examples, health, name)
        _check_encoding(loaded.examples, template, cfg, health, kind)
        if name in data.dataset:
            train, val = split_validation(loaded.examples, data.val_size, seed) if data.val_size else \
                (loaded.examples, [])
            keys = {_key(e): e.origin for e in train}
            _check_overlap(val, keys, health, "the validation split")
            train_keys.update(keys)
        else:
            _check_overlap(loaded.examples, train_keys, health, f"eval dataset '{name}'")
    return report


def _key(example: Example) -> str:
    body = repr({k: v for k, v in vars(example).items() if k != "origin"})
    return hashlib.sha1(body.encode()).hexdigest()


def _check_duplicates(examples: list[Example], health: DatasetHealth) -> None:
    first: dict[str, str] = {}
    for example in examples:
        key = _key(example)
        if key in first:
            health.problems.append(RowProblem(example.origin, f"exact duplicate of {first[key]}",
                                              severity="warning", kind="duplicate"))
        else:
            first[key] = example.origin


def _check_pairs(examples: list[Example], health: DatasetHealth) -> None:
    """A pair whose chosen and rejected answers are the same teaches nothing (its DPO gradient is zero)."""
    for example in examples:
        if isinstance(example, PreferencePair) and example.chosen == example.rejected:
            health.problems.append(RowProblem(example.origin, "chosen and rejected answers are identical; fix or "
                                              "remove the pair", kind="pair"))


def _check_placeholders(examples: list[Example], health: DatasetHealth, name: str) -> None:
    if name in IDENTITY_SETS:
        return
    for example in examples:
        if "{{name}}" in repr(vars(example)) or "{{author}}" in repr(vars(example)):
            health.problems.append(RowProblem(example.origin, "contains {{name}}/{{author}} placeholders; name the "
                                              "dataset 'identity' or run `tuneforge data identity`",
                                              severity="warning", kind="placeholder"))


def _check_overlap(examples: list[Example], train_keys: dict[str, str], health: DatasetHealth, what: str) -> None:
    for example in examples:
        match = train_keys.get(_key(example))
        if match:
            health.problems.append(RowProblem(example.origin, f"row of {what} also in training data ({match})",
                                              severity="warning", kind="overlap"))


def _check_encoding(examples: list[Example], template: Template, cfg: RunConfig, health: DatasetHealth,
                    kind: str) -> None:
    opts = encode_options(cfg.data)
    try:  # one batched pass; only when a row fails is each row encoded alone to name the bad ones
        rows, report = encode_examples(examples, template, opts, kind)
    except TuneforgeError:
        good = []
        for example in examples:
            try:
                encode_examples([example], template, opts, kind)
                good.append(example)
            except TuneforgeError as err:
                health.problems.append(RowProblem(example.origin, str(err), kind="template"))
        rows, report = encode_examples(good, template, opts, kind)
    health.usable = len(rows)
    health.trained_tokens = report.trained_tokens
    health.lengths = [len(r.get("input_ids", r.get("chosen_input_ids", []))) for r in rows]
    for origin in report.no_trained_tokens:
        health.problems.append(RowProblem(origin, "no trained tokens after masking and truncation", kind="masking"))
    for origin in report.dropped:
        health.problems.append(RowProblem(origin, f"longer than cutoff_len={cfg.data.cutoff_len}; dropped",
                                          severity="warning", kind="length"))
    for origin in report.truncated:
        health.problems.append(RowProblem(origin, f"longer than cutoff_len={cfg.data.cutoff_len}; truncated",
                                          severity="warning", kind="length"))


def histogram(lengths: list[int], cutoff: int) -> list[tuple[str, int]]:
    """Counts of token lengths in power-of-two buckets up to cutoff_len."""
    edges = [0]
    while edges[-1] < cutoff:
        edges.append(min(cutoff, max(32, edges[-1] * 2)))
    counts: Counter[int] = Counter()
    for n in lengths:
        counts[next((i for i, e in enumerate(edges[1:]) if n <= e), len(edges) - 2)] += 1
    return [(f"{edges[i] + 1}-{edges[i + 1]}", counts[i]) for i in range(len(edges) - 1)]
