"""`tuneforge export`: merge adapters, write the export, print the verification report; exit 1 when it fails."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.table import Table


def register(sub: Any) -> None:
    """Add the export command."""
    from tuneforge.cli.main import add_config_argument

    p = sub.add_parser("export", help="merge LoRA into the base and export (safetensors, Modelfile, GGUF), verified")
    add_config_argument(p)
    p.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace, overrides: list[str], flags: dict[str, Any]) -> int:
    """Run the export and show what was written and how it verified."""
    from tuneforge.config import load
    from tuneforge.config.paths import check_paths
    from tuneforge.export.merge import GREEDY_TOKENS, PROMPTS, export

    cfg = load(args.config, overrides, flags)
    check_paths(cfg)
    report = export(cfg)
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"exported to {report.folder}: {', '.join(report.files)}", markup=False)
    if not report.checks:
        return 0
    table = Table("artifact", "max |logit diff|", "tolerance", f"greedy {GREEDY_TOKENS}-token agreement", "result",
                  title=f"verification against base + adapter on {len(PROMPTS)} prompts")
    for check in report.checks:
        table.add_row(check.artifact, f"{check.max_abs_diff:.2e}", f"{check.tolerance:g}",
                      f"{100 * check.greedy_agreement:.0f}%", "ok" if check.passed else "FAILED")
    console.print(table)
    return 0 if report.passed else 1
