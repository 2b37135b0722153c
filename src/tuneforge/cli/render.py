"""Terminal views of templates and encoded rows: trained text in green between « and »."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.text import Text

from tuneforge.data.encode import IGNORE_INDEX, trained_spans

OPEN, CLOSE = "«", "»"
LEGEND = f"legend: {OPEN}trained text{CLOSE}; everything else is context the loss ignores"


def print_pairs(pairs: list[tuple[str, str]], console: Console | None = None) -> None:
    """Print rendered (prompt, response) texts with responses marked."""
    out = Text()
    for prompt, response in pairs:
        out.append(prompt)
        out.append(OPEN + response + CLOSE, style="bold green")
    (console or Console()).print(out)
    (console or Console()).print(LEGEND, style="dim")


def print_encoded(row: dict[str, Any], tokenizer: Any, console: Console) -> None:
    """Decode one encoded row, marking trained tokens."""
    keys = [("input_ids", "labels")] if "input_ids" in row else \
        [("chosen_input_ids", "chosen_labels"), ("rejected_input_ids", "rejected_labels")]
    for ids_key, labels_key in keys:
        ids, labels = row[ids_key], row[labels_key]
        trained = sum(1 for t in labels if t != IGNORE_INDEX)
        kind = ids_key.split("_")[0] if len(keys) > 1 else \
            {True: "desirable", False: "undesirable"}.get(row.get("kto_label"), "row")
        title = f"{row.get('origin', '')}  [{kind}: {len(ids)} tokens, {trained} trained, {row.get('status', 'ok')}]"
        console.print(title, style="bold cyan", markup=False)
        out = Text()
        for is_trained, tokens in trained_spans(ids, labels):
            text = tokenizer.decode(tokens)
            out.append(OPEN + text + CLOSE if is_trained else text, style="bold green" if is_trained else None)
        console.print(out)
        console.print()
