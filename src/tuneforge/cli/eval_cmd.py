"""`tuneforge eval CONFIG [--compare-base]`: loss, predict and choice modes, results.json and report.md."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add the eval command."""
    from tuneforge.cli.main import add_config_argument

    p = sub.add_parser("eval", help="evaluate: loss/perplexity, predictions with BLEU/ROUGE, multiple choice")
    add_config_argument(p)
    p.add_argument("--compare-base", action="store_true", help="also evaluate the base model and report deltas")
    p.set_defaults(handler=cmd_eval)


def cmd_eval(args: argparse.Namespace, overrides: list[str], flags: dict[str, Any]) -> int:
    """Run the evaluation and print the report."""
    from pathlib import Path

    from tuneforge.config import load
    from tuneforge.config.paths import check_paths
    from tuneforge.evaluate.run import evaluate

    cfg = load(args.config, overrides, flags)
    check_paths(cfg)
    evaluate(cfg, compare_base=args.compare_base)
    report = Path(cfg.eval.dir) / "report.md"
    print(report.read_text(encoding="utf-8"))
    print(f"written: {report} and {report.with_name('results.json')}")
    if cfg.eval.lf_dir:
        print(f"LLaMA-Factory's result files: {cfg.eval.lf_dir}")
    return 0
