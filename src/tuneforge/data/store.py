"""A dataset's raw rows on disk while a run's training set is built, so they are never all held as Python objects.

`RowStore.write` streams a dataset's rows (tuneforge.data.readers.iter_rows) into an Arrow IPC file, one record
batch at a time: each row as its JSON text, with the file and row number it came from. The pipeline then mixes and
splits row references (small tuples) instead of rows, and each encoding chunk - in this process or in a worker -
takes its rows from the memory-mapped file, converts and tokenizes them, and lets them go.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tuneforge.data.readers import RawRow

BATCH = 2048  # rows per record batch written


class RowStore:
    """The rows of one dataset in an Arrow file; `take` gives them back as RawRows by position (0-based)."""

    def __init__(self, path: Path, count: int) -> None:
        self.path = Path(path)
        self.count = count
        self._table: Any = None

    @classmethod
    def write(cls, rows: Iterable[RawRow], path: Path) -> RowStore:
        """Stream rows into a new file at `path`; values JSON cannot hold (dates, bytes) are kept as their text.
        Each row is kept only as its JSON text until its batch is written (not as the parsed row)."""
        import pyarrow as pa

        schema = pa.schema([("json", pa.large_string()), ("file", pa.string()), ("row", pa.int64())])
        count = 0
        batch: tuple[list[str], list[str], list[int]] = ([], [], [])
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for row in rows:
                batch[0].append(json.dumps(row.data, ensure_ascii=False, default=str))
                batch[1].append(row.file)
                batch[2].append(row.row)
                count += 1
                if len(batch[0]) == BATCH:
                    writer.write_batch(pa.record_batch([pa.array(c, t) for c, t in zip(batch, schema.types)],
                                                       schema=schema))
                    batch = ([], [], [])
            if batch[0]:
                writer.write_batch(pa.record_batch([pa.array(c, t) for c, t in zip(batch, schema.types)],
                                                   schema=schema))
        return cls(path, count)

    def take(self, positions: Sequence[int]) -> list[RawRow]:
        """The rows at these positions, in the order given."""
        import pyarrow as pa

        if self._table is None:
            self._table = pa.ipc.open_file(pa.memory_map(str(self.path))).read_all()
        picked = self._table.take(pa.array(positions, pa.int64())).to_pydict()
        return [RawRow(json.loads(text), file, row)
                for text, file, row in zip(picked["json"], picked["file"], picked["row"])]

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "count": self.count, "_table": None}  # a worker maps the file itself
