"""Read raw rows from files (json, jsonl, csv, parquet, arrow, txt) or hubs, each tagged with file and row."""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections.abc import Iterable, Iterator
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
    return list(iter_rows(spec))


def iter_rows(spec: DatasetSpec) -> Iterator[RawRow]:
    """The rows of a dataset one at a time, in file order: a file is read row by row (a JSON list is parsed one row
    object at a time from its text; parquet and arrow files batch by batch), so rows are never all held at once."""
    if spec.source == "file":
        return _read_location(Path(spec.location), spec.name)
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
        yield from _read_jsonl(path, _file_lines(path))
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
        raise _not_utf8(path, raw[: err.start].count(b"\n") + 1, err.start, raw[err.start:err.start + 1]) from None


def _not_utf8(path: Path, line: int, byte: int, value: bytes) -> DataError:
    return DataError(f"{path}: line {line}: not UTF-8 text (byte {byte}: {value!r}); re-save the file as UTF-8")


def _lines(text: str) -> Iterator[str]:
    """Split on newlines only (str.splitlines also splits on U+2028 etc., which may sit inside JSON strings)."""
    start = 0
    while start <= len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        line = text[start:end]
        yield line[:-1] if line.endswith("\r") else line
        start = end + 1


def _file_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 file, read one at a time."""
    offset = 0
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(path, number, offset + err.start, raw[err.start:err.start + 1]) from None
            offset += len(raw)
            yield line.rstrip("\n").removesuffix("\r")


_SPACE = re.compile(r"[ \t\n\r]*")


def _read_json(path: Path) -> Iterator[RawRow]:
    stream = _TextStream(path)
    if stream.next_char() == "[":
        stream.pos += 1
        yield from _json_list(stream)
        return
    stream.close()
    text = _text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):
            yield from _read_jsonl(path, _lines(text))  # JSON lines saved with a .json suffix, as datasets accepts
            return
        raise _invalid_json(path, err) from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON list of row objects, got {type(data).__name__}")
    yield RawRow(data, str(path), 1)


def _json_list(stream: _TextStream) -> Iterator[RawRow]:
    """The objects of a JSON list, parsed one at a time as the file is read (just after its '['); the same rows and
    the same errors as json.loads of the whole text, without ever holding the whole text."""
    path = stream.path
    number = 0
    with stream:
        if stream.next_char() == "]":
            stream.pos += 1
        else:
            while True:
                row = stream.value()
                number += 1
                if not isinstance(row, dict):
                    raise DataError(f"{path}: row {number}: expected an object with named fields, got "
                                    f"{type(row).__name__}")
                yield RawRow(row, str(path), number)
                char = stream.next_char()
                if char not in (",", "]"):
                    raise stream.error("Expecting ',' delimiter", stream.pos)
                stream.pos += 1
                if char == "]":
                    break
                stream.next_char()
        if stream.next_char():
            raise stream.error("Extra data", stream.pos)


class _TextStream:
    """A UTF-8 file's text decoded block by block; text already parsed is dropped, and positions in what is kept
    map back to the file's line and column for messages."""

    BLOCK = 1 << 20

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path.open("rb")
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.text = ""  # decoded and not yet dropped
        self.pos = 0  # where parsing is, in self.text
        self.eof = False
        self.line = 1  # the line and 0-based column at which self.text starts
        self.column = 0
        self.bytes = 0  # bytes read, and the newlines among them (for a decoding error's line)
        self.newlines = 0

    def __enter__(self) -> _TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()

    def more(self, size: int = BLOCK) -> bool:
        """Read and decode up to `size` more bytes; False at the end of the file."""
        if self.eof:
            return False
        data = self.file.read(size)
        self.eof = not data
        pending = len(self.decoder.getstate()[0])
        try:
            self.text += self.decoder.decode(data, final=self.eof)
        except UnicodeDecodeError as err:
            start = err.start - pending  # where in `data` (a negative start lies in the previous block's tail)
            line = self.newlines + data.count(b"\n", 0, max(start, 0)) + 1
            raise _not_utf8(self.path, line, self.bytes + start, err.object[err.start:err.start + 1]) from None
        self.bytes += len(data)
        self.newlines += data.count(b"\n")
        return not self.eof

    def next_char(self) -> str:
        """The next character that is not JSON whitespace (pos moved onto it); "" at the end of the file."""
        while True:
            self.pos = _SPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.more():
                return ""

    def value(self) -> Any:
        """The JSON value at pos (reading more of the file while it is incomplete); pos moves past it."""
        size = self.BLOCK
        while True:
            try:
                value, self.pos = _DECODER.raw_decode(self.text, self.pos)
                break
            except json.JSONDecodeError as err:
                if not self.more(size):
                    raise self.error(err.msg, err.pos) from None
                size *= 2  # a long row: read on in growing blocks
        if self.pos > self.BLOCK:  # drop what is parsed, keeping track of where the kept text starts
            dropped = self.text[: self.pos]
            newlines = dropped.count("\n")
            self.line += newlines
            self.column = len(dropped) - dropped.rfind("\n") - 1 if newlines else self.column + len(dropped)
            self.text, self.pos = self.text[self.pos:], 0
        return value

    def error(self, message: str, pos: int) -> DataError:
        """An invalid-JSON message naming the file's line and 1-based column of `pos` (as json.loads names them)."""
        newline = self.text.rfind("\n", 0, pos)
        line = self.line + self.text.count("\n", 0, pos)
        column = pos - newline if newline >= 0 else self.column + pos + 1
        return DataError(f"{self.path}: line {line}, column {column}: invalid JSON: {message}")


_DECODER = json.JSONDecoder()


def _invalid_json(path: Path, err: json.JSONDecodeError) -> DataError:
    return DataError(f"{path}: line {err.lineno}, column {err.colno}: invalid JSON: {err.msg}")


def _read_jsonl(path: Path, lines: Iterable[str]) -> Iterator[RawRow]:
    for i, line in enumerate(lines, start=1):
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
    """Rows of a parquet or arrow (IPC stream or file) table, converted one record batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    try:
        if path.suffix.lower() == ".parquet":
            batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        else:
            source = pa.memory_map(str(path))
            try:
                reader = pa.ipc.open_stream(source)
                batches = iter(reader)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield RawRow(row, str(path), number)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: cannot read as {path.suffix[1:]}: {err}") from None


def _read_hf(spec: DatasetSpec) -> Iterator[RawRow]:
    import datasets

    try:
        ds = datasets.load_dataset(spec.location, name=spec.subset, split=spec.split, data_dir=spec.folder)
    except Exception as err:  # hub, network and format failures all surface as one message
        raise DataError(f"dataset '{spec.name}': cannot load '{spec.location}' from the Hugging Face hub: {err}. "
                        "Offline? Download it and register it with file_name.") from None
    return (RawRow(dict(row), f"hf://{spec.location}", i) for i, row in enumerate(ds, start=1))


def _read_ms(spec: DatasetSpec) -> Iterator[RawRow]:
    try:
        from modelscope import MsDataset
    except ImportError:
        raise MissingDependencyError(f"dataset '{spec.name}' comes from ModelScope, which needs the modelscope "
                                     "package: pip install 'tuneforge[modelscope]'") from None
    try:
        ds = MsDataset.load(spec.location, subset_name=spec.subset, split=spec.split, data_dir=spec.folder)
    except Exception as err:  # as above: one message for any hub failure
        raise DataError(f"dataset '{spec.name}': cannot load '{spec.location}' from ModelScope: {err}") from None
    return (RawRow(dict(row), f"ms://{spec.location}", i) for i, row in enumerate(ds, start=1))
