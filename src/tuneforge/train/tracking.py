"""Where training reports go: metrics.jsonl, TensorBoard (and wandb when installed), the progress bar."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from tuneforge.config.typed import flatten
from tuneforge.deps import available
from tuneforge.errors import ConfigError

log = logging.getLogger(__name__)
KNOWN_REPORTERS = ("tensorboard", "wandb", "swanlab", "mlflow")


class Tracker:
    """Appends one JSON line per log step and forwards scalars to the requested loggers."""

    def __init__(self, run_dir: Path, report_to: list[str], logging_dir: Path, resume_step: int | None,
                 config: dict[str, Any]) -> None:
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None:
            truncate_after(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()
        self.writers: list[Any] = []
        for name in report_to:
            self.writers.append(_open_writer(name, logging_dir, run_dir, config))

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (must contain 'step')."""
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        for writer in self.writers:
            writer(scalars, record["step"])

    def close(self) -> None:
        """Flush and close every logger."""
        for writer in self.writers:
            getattr(writer, "close", lambda: None)()


def truncate_after(path: Path, step: int) -> None:
    """Drop lines logged after `step` (a resumed run logs those steps again)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:  # blank, or the half line of a killed run
            continue
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class _TensorBoard:
    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    def __call__(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(f"train/{key}" if not key.startswith("eval") else key.replace("_", "/", 1),
                                   value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(dir=str(run_dir), name=run_dir.name, config=config)

    def __call__(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params({k: str(v)[:250] for k, v in flatten(config).items()})

    def __call__(self, scalars: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class _SwanLab:
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        import swanlab

        self.swanlab = swanlab
        swanlab.init(experiment_name=run_dir.name, config=config, logdir=str(run_dir / "swanlab"))

    def __call__(self, scalars: dict[str, float], step: int) -> None:
        self.swanlab.log(scalars, step=step)

    def close(self) -> None:
        self.swanlab.finish()


def check_reporters(names: list[str]) -> None:
    """Each reporter known and installed (checked when the config loads, before any model does)."""
    for name in names:
        if name not in KNOWN_REPORTERS:
            raise ConfigError(f"train.report_to: '{name}' is not one of {', '.join(KNOWN_REPORTERS)}")
        if not available(name):
            raise ConfigError(f"train.report_to includes {name}, which is not installed: pip install {name} (or "
                              f"remove it from report_to)")


def _open_writer(name: str, logging_dir: Path, run_dir: Path, config: dict[str, Any]) -> Any:
    check_reporters([name])
    if name == "tensorboard":
        return _TensorBoard(logging_dir)
    if name == "wandb":
        return _Wandb(run_dir, config)
    if name == "mlflow":
        return _MLflow(run_dir, config)
    return _SwanLab(run_dir, config)


class Progress:
    """A tqdm bar with ETA and the latest loss, lr and tokens/s (main process only)."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step",
                        dynamic_ncols=True, file=sys.stderr)

    def update(self, postfix: dict[str, Any]) -> None:
        """Advance one step and show the latest figures."""
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def write(self, text: str) -> None:
        """Print a line without breaking the bar."""
        self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
