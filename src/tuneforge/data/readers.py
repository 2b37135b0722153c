"""Read raw rows from files (json, jsonl, csv, parquet, arrow, txt) or hubs, each tagged with file and row."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.data.catalog import DatasetSpec
from tuneforge.errors import DataError, MissingDependencyError

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt")


@dataclass
class RawRow:
    """One row as read, with where it came from (file and 1-based row or line number)."""

    data: dict[str, Any]
    file: str
    row: int

    @property
    def origin(self) -> str:
        return f"{self.file}: row {self.row}"


def read_rows(spec: DatasetSpec) -> list[RawRow]:
    """All rows of a dataset, in file order."""
    if spec.source == "file":
        return list(_read_location(Path(spec.location), spec.name))
    if spec.source == "hf_hub":
        return _read_hf(spec)
    return _read_ms(spec)


def _read_location(path: Path, name: str) -> Iterator[RawRow]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"dataset '{name}': folder {path} holds no {'/'.join(SUFFIXES)} files")
        for file in files:
            yield from read_file(file)
    elif path.is_file():
        yield from read_file(path)
    else:
        raise DataError(f"dataset '{name}': file not found: {path}. Check file_name in dataset_info.json "
                        "(it is relative to data.dataset_dir)")


def read_file(path: Path) -> Iterator[RawRow]:
    """Rows of one file, chosen by its suffix."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        yield from _read_json(path)
    elif suffix == ".jsonl":
        yield from _read_jsonl(path, _text(path))
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(_text(path), newline=""))
        for i, row in enumerate(reader, start=1):
            yield RawRow(dict(row), str(path), i)
    elif suffix in (".parquet", ".arrow"):
        yield from _read_table(path)
    elif suffix == ".txt":
        for i, line in enumerate(_lines(_text(path)), start=1):
            if line.strip():
                yield RawRow({"text": line}, str(path), i)
    else:
        raise DataError(f"{path}: unsupported file type '{suffix}'; use one of {', '.join(SUFFIXES)}")


def _text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text (byte {err.start}: {raw[err.start:err.start + 1]!r}); "
                        "re-save the file as UTF-8") from None


def _lines(text: str) -> list[str]:
    """Split on newlines only (str.splitlines also splits on U+2028 etc., which may sit inside JSON strings)."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def _read_json(path: Path) -> Iterator[RawRow]:
    text = _text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):
            yield from _read_jsonl(path, text)  # JSON lines saved with a .json suffix, as datasets accepts
            return
        raise DataError(f"{path}: line {err.lineno}, column {err.colno}: invalid JSON: {err.msg}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of row objects, got {type(data).__name__}")
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i}: expected an object with named fields, got {type(row).__name__}")
        yield RawRow(row, str(path), i)


def _read_jsonl(path: Path, text: str) -> Iterator[RawRow]:
    for i, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {i}, column {err.colno}: invalid JSON: {err.msg}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {i}: expected an object with named fields, got {type(row).__name__}")
        yield RawRow(row, str(path), i)


def _read_table(path: Path) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".parquet":
            table = pq.read_table(path)
        else:
            try:
                with pa.memory_map(str(path)) as source:
                    table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                with pa.memory_map(str(path)) as source:
                    table = pa.ipc.open_file(source).read_all()
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: cannot read as {path.suffix[1:]}: {err}") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        yield RawRow(row, str(path), i)


def _read_hf(spec: DatasetSpec) -> list[RawRow]:
    import datasets

    try:
        ds = datasets.load_dataset(spec.location, name=spec.subset, split=spec.split, data_dir=spec.folder)
    except Exception as err:  # hub, network and format failures all surface as one message
        raise DataError(f"dataset '{spec.name}': cannot load '{spec.location}' from the Hugging Face hub: {err}. "
                        "Offline? Download it and register it with file_name.") from None
    return [RawRow(dict(row), f"hf://{spec.location}", i) for i, row in enumerate(ds, start=1)]


def _read_ms(spec: DatasetSpec) -> list[RawRow]:
    try:
        from modelscope import MsDataset
    except ImportError:
        raise MissingDependencyError(f"dataset '{spec.name}' comes from ModelScope, which needs the modelscope "
                                     "package: pip install 'tuneforge[modelscope]'") from None
    try:
        ds = MsDataset.load(spec.location, subset_name=spec.subset, split=spec.split, data_dir=spec.folder)
    except Exception as err:  # as above: one message for any hub failure
        raise DataError(f"dataset '{spec.name}': cannot load '{spec.location}' from ModelScope: {err}") from None
    return [RawRow(dict(row), f"ms://{spec.location}", i) for i, row in enumerate(ds, start=1)]
