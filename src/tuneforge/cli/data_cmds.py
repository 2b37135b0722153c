"""`data preview`, `data tokenize`, `data check` (the data doctor) and `data identity`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tuneforge.errors import DataError

MAX_LISTED = 30


def register(sub: Any) -> None:
    """Add the data commands to the parser."""
    from tuneforge.cli.main import add_config_argument

    data = sub.add_parser("data", help="dataset tools").add_subparsers(metavar="ACTION")
    p = data.add_parser("preview", help="encode rows as training would and show the trained tokens")
    add_config_argument(p)
    p.add_argument("--num", type=int, default=3, help="rows to show")
    p.add_argument("--format", choices=["text", "jsonl"], default="text",
                   help="jsonl prints {input_ids, labels} per row, -100 where masked")
    p.add_argument("--split", choices=["train", "val"], default="train")
    p.set_defaults(handler=cmd_preview)
    p = data.add_parser("tokenize", help="tokenize a config's datasets into data.tokenized_path and stop "
                        "(later runs with that tokenized_path load the rows without the data files)")
    add_config_argument(p)
    p.set_defaults(handler=cmd_tokenize)
    p = data.add_parser("check", help="the data doctor: report bad rows in every dataset of a config")
    add_config_argument(p)
    p.set_defaults(handler=cmd_check)
    p = data.add_parser("identity", help="write the identity dataset with your model's name and author")
    p.add_argument("--name", required=True)
    p.add_argument("--author", required=True)
    p.add_argument("-o", "--output", required=True, help="output JSON file")
    p.set_defaults(handler=cmd_identity)


def _setup(args: argparse.Namespace, overrides: list[str], flags: dict[str, Any]) -> tuple[Any, Any]:
    from tuneforge.config import load
    from tuneforge.models.load import load_tokenizer
    from tuneforge.templates import get_template

    cfg = load(args.config, overrides, flags)
    tokenizer = load_tokenizer(cfg.model)
    template = get_template(cfg.data.template, tokenizer, cfg.data.default_system, cfg.data.enable_thinking,
                            cfg.data.tool_format)
    return cfg, template


def cmd_preview(args: argparse.Namespace, overrides: list[str], flags: dict[str, Any]) -> int:
    """Show encoded rows, or print them as JSON lines."""
    from tuneforge.cli.render import LEGEND, print_encoded
    from tuneforge.data.build import build_datasets
    from tuneforge.stages import data_kind

    cfg, template = _setup(args, overrides, flags)
    encoded = build_datasets(cfg.data, data_kind(cfg.stage), template, cfg.train.seed)
    rows = encoded.train if args.split == "train" else encoded.val
    if rows is None:
        raise DataError("there is no validation split: set data.val_size or data.eval_dataset")
    chosen = rows.select(range(min(args.num, len(rows))))
    if args.format == "jsonl":
        for row in chosen:
            print(json.dumps({k: row[k] for k in row if k != "status"}, ensure_ascii=False))
        return 0
    console = Console(highlight=False, soft_wrap=True)
    report = encoded.report
    console.print(f"{len(rows)} {args.split} rows | template {template.name} | cutoff_len {cfg.data.cutoff_len} | "
                  f"truncated {len(report.truncated)} | dropped {len(report.dropped)} | "
                  f"no trained tokens {len(report.no_trained_tokens)}", markup=False)
    console.print(LEGEND, style="dim")
    for row in chosen:
        print_encoded(row, template.tokenizer, console)
    return 0


def cmd_tokenize(args: argparse.Namespace, overrides: list[str], flags: dict[str, Any]) -> int:
    """Save the tokenized rows in data.tokenized_path (or check the ones already there) without training."""
    from tuneforge.data.build import build_datasets
    from tuneforge.data.tokenized import has_tokenized
    from tuneforge.errors import ConfigError
    from tuneforge.stages import data_kind

    cfg, template = _setup(args, overrides, flags)
    path = cfg.data.tokenized_path
    if not path:
        raise ConfigError("data tokenize needs data.tokenized_path (LLaMA-Factory: tokenized_path): the folder "
                          "to save the tokenized rows in")
    existed = has_tokenized(path)
    encoded = build_datasets(cfg.data, data_kind(cfg.stage), template, cfg.train.seed)
    val = f" and {len(encoded.val)} validation rows" if encoded.val is not None else ""
    verb = "already holds (checked against this config)" if existed else "now holds"
    print(f"{path} {verb} {len(encoded.train)} training rows{val} for stage {cfg.stage}; train with "
          f"data.tokenized_path={path} (LLaMA-Factory: tokenized_path)")
    return 0


def cmd_check(args: argparse.Namespace, overrides: list[str], flags: dict[str, Any]) -> int:
    """Run the doctor, print its report, exit 1 when any dataset has errors."""
    from tuneforge.data.doctor import check_datasets, histogram
    from tuneforge.stages import data_kind

    cfg, template = _setup(args, overrides, flags)
    if not cfg.data.dataset:
        raise DataError("no datasets to check: set data.dataset")
    console = Console(highlight=False, soft_wrap=True)
    health = check_datasets(cfg, template, data_kind(cfg.stage))
    summary = Table("dataset", "rows", "usable", "trained tokens", "errors", "warnings")
    for h in health:
        summary.add_row(h.name, str(h.rows), str(h.usable), str(h.trained_tokens), str(len(h.errors)),
                        str(len(h.problems) - len(h.errors)))
    console.print(summary)
    for h in health:
        for problem in h.problems[:MAX_LISTED]:
            style = "red" if problem.severity == "error" else "yellow"
            console.print(f"{problem.severity.upper():7} {problem.origin}: {problem.message}", style=style,
                          markup=False)
        if len(h.problems) > MAX_LISTED:
            console.print(f"... and {len(h.problems) - MAX_LISTED} more in {h.name}", markup=False)
        if h.lengths:
            console.print(f"{h.name}: token lengths (cutoff_len {cfg.data.cutoff_len})", markup=False)
            top = max(c for _, c in histogram(h.lengths, cfg.data.cutoff_len)) or 1
            for label, count in histogram(h.lengths, cfg.data.cutoff_len):
                console.print(f"  {label:>12} {count:6} {'#' * round(40 * count / top)}", markup=False)
    errors = sum(len(h.errors) for h in health)
    console.print("clean: no errors" if not errors else f"{errors} error(s) found", style="green" if not errors
                  else "red")
    return 1 if errors else 0


def cmd_identity(args: argparse.Namespace, overrides: list[str], flags: dict[str, Any]) -> int:
    """Write the built-in identity set with {{name}} and {{author}} filled in."""
    from tuneforge.data.catalog import BUILTIN_DIR
    from tuneforge.data.pipeline import substitute_identity
    from tuneforge.io import write_text_atomic

    rows = json.loads((BUILTIN_DIR / "identity.json").read_text(encoding="utf-8"))
    rows = substitute_identity(rows, args.name, args.author)
    write_text_atomic(Path(args.output), json.dumps(rows, ensure_ascii=False, indent=2) + "\n")
    print(f"wrote {len(rows)} rows to {args.output}")
    return 0
