"""Datasets in a config -> canonical examples -> mixed and split -> encoded rows (cached by content hash)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.config.schema import DataConfig
from tuneforge.data.catalog import DatasetSpec, get_spec, load_catalog
from tuneforge.data.encode import (
    IGNORE_INDEX,
    EncodeOptions,
    encode_pairwise,
    encode_supervised,
    encode_text,
    pack_blocks,
)
from tuneforge.data.formats import to_example, to_prompt
from tuneforge.data.readers import RawRow, iter_rows, read_rows
from tuneforge.data.types import (
    Conversation,
    EncodeReport,
    Example,
    KTOExample,
    PreferencePair,
    PromptExample,
    RowProblem,
    Text,
)
from tuneforge.errors import DataError, TemplateError
from tuneforge.templates.base import Side, Template

# A data kind is what a stage trains on (each stage declares its own; see tuneforge.stages):
# text (pre-training), sft (conversations), pairwise (preference pairs), kto (labelled answers), prompt (generation
# prompts for online RL, with the answer and extra columns kept for reward functions).
KINDS = ("text", "sft", "pairwise", "kto", "prompt")
# Built-in sets whose {{name}} / {{author}} placeholders are filled from data.identity.
IDENTITY_SETS = ("identity", "identity_pref", "identity_pref_eval")
CHUNK = 512


@dataclass
class LoadedDataset:
    """One dataset's canonical examples and the problems found while converting its rows."""

    name: str
    spec: DatasetSpec
    examples: list[Example]
    problems: list[RowProblem] = field(default_factory=list)
    raw_count: int = 0


def load_examples(data: DataConfig, name: str, kind: str, seed: int, strict: bool = True) -> LoadedDataset:
    """Read and convert one dataset for a data kind; strict mode raises on the first bad row, otherwise collects
    problems. For kto, preference pairs are unpaired: a desirable row (chosen) and an undesirable one (rejected).
    (Training reads its rows through `Sources` instead, which keeps them on disk.)"""
    spec = get_spec(load_catalog(data.dataset_dir, data.inline), name, data.dataset_dir)
    rows = read_rows(spec)
    raw_count = len(rows)
    if not rows:
        if strict:
            raise DataError(_no_rows(spec, name))
        return LoadedDataset(name, spec, [], [RowProblem(spec.location, "the dataset has no rows")], 0)
    rows = [rows[i] for i in sample_positions(len(rows), spec, data, seed)]
    loaded = LoadedDataset(name, spec, [], raw_count=raw_count)
    for row in rows:
        try:
            loaded.examples += convert_row(row, spec, kind, data)
        except DataError as err:
            if strict:
                raise DataError(f"{err} (run `tuneforge data check` to list every bad row)") from None
            message = str(err).removeprefix(f"{row.origin}: ")
            loaded.problems.append(RowProblem(row.origin, message))
    return loaded


def convert_row(row: RawRow, spec: DatasetSpec, kind: str, data: DataConfig) -> list[Example]:
    """One raw row as the examples a data kind trains on (two for a preference pair read for kto, else one);
    raises DataError naming the row."""
    if spec.name in IDENTITY_SETS:
        row = RawRow(substitute_identity(row.data, data.identity.name, data.identity.author), row.file, row.row)
    if kind == "prompt":
        return [to_prompt(row, spec)]
    example = to_example(row, spec, want_text=kind == "text")
    if kind == "kto" and isinstance(example, PreferencePair):
        return list(unpair(example))
    _check_kind(example, kind, spec)
    return [example]


def sample_positions(count: int, spec: DatasetSpec, data: DataConfig, seed: int) -> list[int]:
    """Which rows of a dataset of `count` rows are used, in order: the dataset's num_samples (drawn with the seed;
    repeated rows when it exceeds the count), then data.max_samples."""
    positions = list(range(count))
    if spec.num_samples is not None:
        positions = _sample(positions, spec.num_samples, seed)
    if data.max_samples is not None:
        positions = positions[: data.max_samples]
    return positions


def _no_rows(spec: DatasetSpec, name: str) -> str:
    return f"{spec.location}: dataset '{name}' has no rows; add rows or remove it from data.dataset"


# ----------------------------------------------------------------------------------- rows kept on disk (training)
# A row reference is (source, position, part): the dataset's index in Sources, the row's position in its store, and
# which of the row's examples (a preference pair read for kto gives two). Mixing and splitting move references.
Ref = tuple[int, int, int]


@dataclass
class Sources:
    """The datasets a training set is built from, each kept on disk (RowStore) with its spec; examples are made
    from references chunk by chunk, in whichever process encodes the chunk."""

    data: DataConfig
    kind: str
    stores: list[Any] = field(default_factory=list)  # tuneforge.data.store.RowStore
    specs: list[DatasetSpec] = field(default_factory=list)

    def add(self, name: str, folder: Path, seed: int) -> list[Ref]:
        """Store dataset `name`'s rows under `folder`; the references of the rows used, in order."""
        from tuneforge.data.store import RowStore

        spec = get_spec(load_catalog(self.data.dataset_dir, self.data.inline), name, self.data.dataset_dir)
        index = len(self.stores)
        store = RowStore.write(iter_rows(spec), folder / f"source-{index}.arrow")
        if not store.count:
            raise DataError(_no_rows(spec, name))
        self.stores.append(store)
        self.specs.append(spec)
        parts = 2 if self.kind == "kto" and spec.ranking else 1
        return [(index, position, part) for position in sample_positions(store.count, spec, self.data, seed)
                for part in range(parts)]

    def examples(self, refs: list[Ref]) -> list[Example]:
        """The examples these references stand for, in order; a bad row raises DataError naming it."""
        rows: dict[tuple[int, int], list[Example]] = {}
        for source in sorted({s for s, _, _ in refs}):
            positions = sorted({p for s, p, _ in refs if s == source})
            for position, row in zip(positions, self.stores[source].take(positions)):
                try:
                    rows[source, position] = convert_row(row, self.specs[source], self.kind, self.data)
                except DataError as err:
                    raise DataError(f"{err} (run `tuneforge data check` to list every bad row)") from None
        return [rows[s, p][part] for s, p, part in refs]


def unpair(pair: PreferencePair) -> list[KTOExample]:
    """A preference pair as two KTO rows: the chosen answer desirable, the rejected one undesirable."""
    return [KTOExample(pair.prompt + [answer], label, pair.system, pair.tools, f"{pair.origin} ({side})")
            for answer, label, side in ((pair.chosen, True, "chosen"), (pair.rejected, False, "rejected"))]


def substitute_identity(value: Any, name: str, author: str) -> Any:
    """Replace {{name}} and {{author}} in every text of a row."""
    if isinstance(value, str):
        return value.replace("{{name}}", name).replace("{{author}}", author)
    if isinstance(value, list):
        return [substitute_identity(v, name, author) for v in value]
    if isinstance(value, dict):
        return {k: substitute_identity(v, name, author) for k, v in value.items()}
    return value


def _check_kind(example: Example, kind: str, spec: DatasetSpec) -> None:
    wanted = {"text": Text, "sft": Conversation, "pairwise": PreferencePair, "kto": KTOExample}[kind]
    if not isinstance(example, wanted):
        hint = {"pairwise": "set \"ranking\": true and chosen/rejected columns", "kto": "set columns.kto_tag",
                "sft": "give it a response column", "text": ""}[kind]
        who = {"pairwise": "preference stages (rm, dpo)", "kto": "stage kto", "sft": "this stage",
               "text": "pre-training (pt)"}[kind]
        raise DataError(f"{example.origin}: {who} need {wanted.__name__} rows but dataset "
                        f"'{spec.name}' gives {type(example).__name__}; in dataset_info.json {hint}")


def _sample(rows: list[int], n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    if n <= len(rows):
        return rng.sample(rows, n)
    return rows + rng.choices(rows, k=n - len(rows))


def mix(groups: list[list[Example]], strategy: str, probs: list[float], seed: int) -> list[Example]:
    """Concatenate, or interleave by probability until the first (under) or the last (over) runs out."""
    if strategy == "concat" or len(groups) == 1:
        return [e for group in groups for e in group]
    probs = probs or [1 / len(groups)] * len(groups)
    rng = random.Random(seed)
    cursors = [0] * len(groups)
    exhausted = [False] * len(groups)
    out: list[Example] = []
    while True:
        i = rng.choices(range(len(groups)), weights=probs)[0]
        if cursors[i] >= len(groups[i]):
            exhausted[i] = True
            if strategy == "interleave_under" or all(exhausted):
                return out
            cursors[i] = 0  # oversampling: start this dataset again
        out.append(groups[i][cursors[i]])
        cursors[i] += 1


def split_validation(examples: list[Example], val_size: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Seeded split into (train, validation); val_size is a fraction or a whole count."""
    if val_size <= 0:
        return examples, []
    count = int(val_size) if val_size >= 1 else max(1, round(len(examples) * val_size))
    if count >= len(examples):
        raise DataError(f"data.val_size={val_size:g} leaves no training rows out of {len(examples)}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    val_ids = set(order[:count])
    return ([e for i, e in enumerate(examples) if i not in val_ids],
            [examples[i] for i in sorted(val_ids)])


def encode_examples(examples: list[Example], template: Template, opts: EncodeOptions, kind: str,
                    num_proc: int | None = None, packing: bool = False) -> tuple[list[dict[str, Any]], EncodeReport]:
    """Encode in chunks of rows, each tokenized in one batched call, optionally across processes."""
    with _chunk_mapper(template, opts, kind, packing, num_proc, len(examples)) as mapper:
        rows = [row for part in mapper(_encode_rows, _chunks(examples)) for row in part]
    if kind == "text" and packing:
        rows = [block for blocks in _packed(iter([rows]), opts.cutoff_len) for block in blocks]
    return _keep_trainable(rows)


def encode_to_arrow(items: list[Example] | list[Ref], template: Template, opts: EncodeOptions, kind: str, path: Path,
                    num_proc: int | None = None, packing: bool = False, sources: Sources | None = None) -> EncodeReport:
    """Encode into an Arrow stream file at `path` (what datasets.Dataset.from_file reads), chunk by chunk as the
    chunks finish, so the encoded rows are never all held as Python objects; no file when no row is kept.
    `items` are examples, or references into `sources` (each chunk's rows are then read and converted where the
    chunk is encoded). Workers (num_proc > 1) get the template and sources once and send back each chunk's kept
    rows as an Arrow table. Packed pre-training text is cut into blocks as the chunks arrive."""
    import pyarrow as pa

    report = EncodeReport()
    writer = None
    packed = kind == "text" and packing  # blocks cross row boundaries: the parent cuts them
    with _chunk_mapper(template, opts, kind, packing, num_proc, len(items), sources) as mapper, \
            pa.OSFile(str(path), "wb") as sink:
        if packed:
            blocks = _packed(mapper(_encode_rows, _chunks(items)), opts.cutoff_len)
            parts: Any = ((_arrow_table(kept) if kept else None, part)
                          for kept, part in map(_keep_trainable, blocks))
        else:
            parts = mapper(_encode_kept, _chunks(items))
        for table, part in parts:
            _add_report(report, part)
            if table is not None:
                writer = writer or pa.ipc.new_stream(sink, table.schema)
                writer.write_table(table)
        if writer is not None:
            writer.close()
    if writer is None:
        path.unlink()
    return report


def _packed(chunks: Iterator[list[dict[str, Any]]], block: int) -> Iterator[list[dict[str, Any]]]:
    """Pre-training rows' ids concatenated and cut into rows of `block` tokens (the last may be shorter), a list of
    blocks per chunk of rows (see encode.pack_blocks)."""
    carry: list[int] = []
    number = 0

    def blocks(ids: list[list[int]]) -> list[dict[str, Any]]:
        nonlocal number
        out = []
        for ids_ in ids:
            number += 1
            out.append({"input_ids": ids_, "labels": list(ids_), "status": "ok", "origin": f"packed block {number}"})
        return out

    for rows in chunks:
        cut = pack_blocks([carry] + [r["input_ids"] for r in rows], block)
        carry = cut.pop() if cut and len(cut[-1]) < block else []
        yield blocks(cut)
    if carry:
        yield blocks([carry])


def _chunks(items: list[Any]) -> list[list[Any]]:
    return [items[i:i + CHUNK] for i in range(0, len(items), CHUNK)]


@contextmanager
def _chunk_mapper(template: Template, opts: EncodeOptions, kind: str, packing: bool, num_proc: int | None,
                  count: int, sources: Sources | None = None) -> Iterator[Callable[..., Iterator[Any]]]:
    """A `map` over chunks, in order: in worker processes (each given the template, options and sources once) when
    num_proc > 1 and there is more than one chunk, else in this process. Chunks not yet started are cancelled when
    the caller stops early (a bad row)."""
    context = (template, opts, kind, packing, sources)
    if num_proc and num_proc > 1 and count > CHUNK:
        pool = ProcessPoolExecutor(max_workers=num_proc, initializer=_set_context, initargs=context)
        try:
            yield pool.map
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return
    saved = dict(_CONTEXT)
    _set_context(*context)
    try:
        yield map
    finally:
        _CONTEXT.clear()
        _CONTEXT.update(saved)


_CONTEXT: dict[str, Any] = {}  # the template, options and sources the chunk functions use (set once per process)


def _set_context(template: Template, opts: EncodeOptions, kind: str, packing: bool, sources: Sources | None) -> None:
    _CONTEXT.update(template=template, opts=opts, kind=kind, packing=packing, sources=sources)


def _encode_rows(items: list[Any]) -> list[dict[str, Any]]:
    sources = _CONTEXT["sources"]
    examples = sources.examples(items) if sources is not None else items
    return _encode_chunk((examples, _CONTEXT["template"], _CONTEXT["opts"], _CONTEXT["kind"], _CONTEXT["packing"]))


def _encode_kept(examples: list[Example]) -> tuple[Any, EncodeReport]:
    """A chunk's kept rows as an Arrow table (None when none is kept) and its report."""
    kept, report = _keep_trainable(_encode_rows(examples))
    return (_arrow_table(kept) if kept else None), report


def _add_report(total: EncodeReport, part: EncodeReport) -> None:
    total.rows += part.rows
    total.truncated += part.truncated
    total.dropped += part.dropped
    total.no_trained_tokens += part.no_trained_tokens
    total.trained_tokens += part.trained_tokens
    total.total_tokens += part.total_tokens


def _arrow_table(rows: list[dict[str, Any]]) -> Any:
    """Rows as an Arrow table with one type per column whatever the chunk holds (token lists are int64, as
    datasets infers them), so every chunk of a file has the same schema."""
    import pyarrow as pa

    kinds = {list: pa.list_(pa.int64()), bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string()}
    schema = pa.schema([(key, kinds[type(value)]) for key, value in rows[0].items()])
    return pa.Table.from_pylist(rows, schema=schema)


def _encode_chunk(job: tuple[list[Example], Template, EncodeOptions, str, bool]) -> list[dict[str, Any]]:
    examples, template, opts, kind, packing = job
    if kind == "prompt":
        return [dict(encode_prompt_row(e, template, opts.cutoff_len), origin=e.origin)
                for e in examples]  # type: ignore[arg-type]
    if kind == "text":
        texts = [e.text for e in examples]  # type: ignore[union-attr]
        ids = _batch_tokenize(template, texts)
        eos = template.tokenizer.eos_token_id
        limit = 2**62 if packing else opts.cutoff_len  # packed rows are cut into blocks later, not one by one
        return [dict(encode_text(i, eos, limit), origin=e.origin) for i, e in zip(ids, examples)]
    rendered = [_render(e, template, kind) for e in examples]
    flat = [side for sides in rendered for side in sides]
    ids = iter(template.encode_sides(flat))
    out = []
    for example, sides in zip(examples, rendered):
        side_ids = [next(ids) for _ in sides]
        row = _encode_one(example, side_ids, kind, opts, template.efficient_eos_id)
        out.append(dict(row, origin=example.origin))
    return out


def encode_prompt_row(example: PromptExample, template: Template, cutoff_len: int) -> dict[str, Any]:
    """A prompt row: the generation prompt's ids (encoded as chat encodes prompts), the last prompt turn's text, and
    the row's other columns as JSON (one Arrow column whatever each dataset holds). A prompt longer than
    cutoff_len is dropped: cutting it would change the question."""
    try:
        ids = template.encode_prompt(example.messages, example.system, example.tools)
    except TemplateError as err:
        raise TemplateError(f"{example.origin}: {err}") from None
    status = "dropped" if len(ids) > cutoff_len else "ok"
    return {"input_ids": ids, "prompt": example.messages[-1].content, "status": status,
            "columns": json.dumps(example.columns, ensure_ascii=False, default=str)}


def _render(example: Example, template: Template, kind: str) -> list[Side]:
    """The pieces of each prompt and response side (each piece is tokenized on its own)."""
    try:
        if isinstance(example, PreferencePair):
            chosen = template.render_pieces(example.prompt + [example.chosen], example.system, example.tools)
            rejected = template.render_pieces(example.prompt + [example.rejected], example.system, example.tools)
            return [t for p, r in chosen[:-1] for t in (p, r)] + [chosen[-1][0], chosen[-1][1], rejected[-1][1]]
        pairs = template.render_pieces(example.messages, example.system, example.tools)  # type: ignore[union-attr]
    except TemplateError as err:
        raise TemplateError(f"{example.origin}: {err}") from None
    return [t for pair in pairs for t in pair]


def _encode_one(example: Example, ids: list[list[int]], kind: str, opts: EncodeOptions,
                efficient_eos: int | None = None) -> dict[str, Any]:
    if kind == "pairwise":
        prompt = [t for piece in ids[:-2] for t in piece]
        end = [efficient_eos] if efficient_eos is not None else []  # eos ends each answer (LLaMA-Factory)
        return encode_pairwise(prompt, ids[-2] + end, ids[-1] + end, opts, tail=len(ids[-3]))
    pairs = [(ids[i], ids[i + 1]) for i in range(0, len(ids), 2)]
    if kind == "kto":
        row = encode_supervised(pairs, EncodeOptions(opts.cutoff_len, opts.train_on_prompt, True, opts.overlong),
                                efficient_eos)
        return dict(row, kto_label=example.label)  # type: ignore[union-attr]
    return encode_supervised(pairs, opts, efficient_eos)


def _batch_tokenize(template: Template, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    encoded = template.tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [list(ids) if text else [] for ids, text in zip(encoded, texts)]


def _keep_trainable(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], EncodeReport]:
    report = EncodeReport(rows=len(rows))
    kept = []
    for row in rows:
        if row["status"] == "dropped":
            report.dropped.append(row["origin"])
            continue
        if row["status"] == "truncated":
            report.truncated.append(row["origin"])
        labels = row.get("labels", row.get("chosen_labels", row.get("input_ids", [])))  # prompt rows: all prompt
        trained = sum(1 for t in labels if t != IGNORE_INDEX)
        if trained == 0:
            report.no_trained_tokens.append(row["origin"])
            continue
        report.trained_tokens += trained
        report.total_tokens += len(row.get("input_ids", row.get("chosen_input_ids", [])))
        kept.append(row)
    return kept, report
