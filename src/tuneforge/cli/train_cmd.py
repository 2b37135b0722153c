"""`tuneforge train CONFIG [key=value ...] [--lf_key value ...] [--plan]`."""

from __future__ import annotations

import argparse
import os
from typing import Any


def register(sub: Any) -> None:
    """Add the train command."""
    from tuneforge.cli.main import add_config_argument

    p = sub.add_parser("train", help="train a model (stages pt, sft, rm, dpo, kto; methods full, freeze, lora, qlora)")
    add_config_argument(p)
    p.add_argument("--plan", action="store_true", help="print the plan (steps, memory, time) without training")
    p.set_defaults(handler=cmd_train)


def cmd_train(args: argparse.Namespace, overrides: list[str], flags: dict[str, Any]) -> int:
    """Load the config and run training; Ctrl-C saves a checkpoint and exits with 130. Several GPUs (or
    FORCE_TORCHRUN=1) re-launch the command under torchrun, as LLaMA-Factory's CLI does."""
    import subprocess

    from tuneforge.config import load
    from tuneforge.config.paths import check_paths
    from tuneforge.run import train
    from tuneforge.train.distributed import torchrun_command

    cfg = load(args.config, overrides, flags)  # a bad config fails here, once, before any launch
    check_paths(cfg, output=True)
    command = None if args.plan else torchrun_command(getattr(args, "argv", []))
    if command is not None:
        return subprocess.run(command).returncode
    try:
        run_dir = train(cfg, plan_only=args.plan)
    except KeyboardInterrupt:
        return 130
    finally:
        leave_process_group()
    if os.environ.get("RANK", "0") != "0":  # one summary line per run, not one per process
        return 0
    if not args.plan and not cfg.train.enabled:  # do_eval / do_predict without do_train
        print(f"evaluated without training: {run_dir / 'eval'}" +
              (f"; LLaMA-Factory's result files: {cfg.eval.lf_dir}" if cfg.eval.lf_dir else ""))
    elif not args.plan:
        print(f"run folder: {run_dir}")
    return 0


def leave_process_group() -> None:
    """Tear the process group down before exit (FSDP's gloo group aborts the process at exit otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
