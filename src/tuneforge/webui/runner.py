"""Training as a child process (no shell): the UI survives a crash, reads progress from the run folder, and
shows the child's own error message when it fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.train.plot import PREFERENCE_CURVES, is_reward_curve

ABORT_GRACE_S = 120  # SIGINT lets the run save a checkpoint (large for a full fine-tune); then it is killed
LOG_TAIL_LINES = 40
PLOT_POINTS = 400
# What the live plot draws of each training record that has them: the loss, for preference stages the reward
# accuracy and margins (dpo, kto) or the reward model's pair accuracy (rm), and for grpo the mean reward and each
# reward function's mean (rewards/<name>/mean, see curve_keys).
CURVES = ("loss", *PREFERENCE_CURVES)


def curve_keys(record: dict[str, Any]) -> list[str]:
    """The record's keys the live plot draws: CURVES, then the reward curves (named by the reward functions)."""
    return [k for k in CURVES if k in record] + [k for k in record if is_reward_curve(k) and k not in CURVES]


@dataclass
class JobStatus:
    """What the Train tab shows: state, progress, the curves (`losses`: step, loss and, for preference stages,
    reward accuracy and margins, for grpo the rewards), the log tail and the error (if any)."""

    state: str  # idle | starting | running | finished | failed | aborted
    step: int = 0
    total: int = 0
    loss: float | None = None
    eta: float | None = None
    losses: list[dict[str, Any]] = field(default_factory=list)
    log_tail: str = ""
    error: str = ""
    run_dir: str = ""


class TrainJob:
    """One `tuneforge train CONFIG` child process writing to a log file beside its config."""

    def __init__(self, argv: list[str], cwd: Path, run_dir: Path, log_path: Path) -> None:
        self.run_dir, self.log_path = run_dir, log_path
        self.aborted = False
        self.metrics: list[dict[str, Any]] = []  # read so far; each poll reads only what was appended
        self._offset = 0
        self.total = 0  # planned steps, read once from the manifest when the run has written it
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # Unbuffered output for a live log tail; tables drawn for a narrow terminal fit the log box.
        env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="96")
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)

    @property
    def running(self) -> bool:
        """Whether the child process is still alive."""
        return self.process.poll() is None

    def abort(self) -> None:
        """Ask the run to stop (it checkpoints and exits 130); kill it if it does not within the grace time."""
        if not self.running:
            return
        self.aborted = True
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(ABORT_GRACE_S)
        except subprocess.TimeoutExpired:  # its own session: kill the whole group (workers included)
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def _read_new_metrics(self) -> None:
        """Parse the complete lines appended to metrics.jsonl since the last poll (a half-written one waits)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        with open(path, "rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        complete = chunk[:chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.decode("utf-8", errors="replace").splitlines():
            try:
                self.metrics.append(json.loads(line))
            except ValueError:  # not a record (never written by the loop); skip it rather than stop showing
                continue

    def status(self) -> JobStatus:
        """The current state read from the process, metrics.jsonl, manifest.json and the log."""
        code = self.process.poll()
        self._read_new_metrics()
        metrics = [m for m in self.metrics if "loss" in m]
        tail = log_tail(self.log_path)
        status = JobStatus("running" if metrics else "starting", run_dir=str(self.run_dir), log_tail=tail,
                           losses=thin([{k: m[k] for k in ("step", *curve_keys(m))} for m in metrics]))
        self.total = self.total or planned_steps(self.run_dir)
        status.total = self.total
        if metrics:
            status.step, status.loss, status.eta = metrics[-1]["step"], metrics[-1]["loss"], metrics[-1].get("eta")
        if code is None:
            return status
        if code == 0:
            status.state, status.step, status.eta = "finished", status.total or status.step, 0.0
        elif self.aborted or code == 130:
            status.state = "aborted"
        else:
            status.state, status.error = "failed", error_line(tail) or f"the training process exited with {code}"
        return status


def thin(points: list[dict[str, Any]], most: int = PLOT_POINTS) -> list[dict[str, Any]]:
    """At most `most` evenly spaced points (the last one always kept), so a long run's plot stays light."""
    if len(points) <= most:
        return points
    stride = -(-len(points) // most)
    return points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])


def planned_steps(run_dir: Path) -> int:
    """Total optimizer steps from the run's manifest (written once the plan is made), or 0 before that."""
    path = run_dir / "manifest.json"
    if not path.is_file():
        return 0
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["data"]["plan"]["total_steps"])
    except (ValueError, KeyError, TypeError):
        return 0


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of the log, with progress-bar redraws (carriage returns) collapsed to their last state."""
    if not path.is_file():
        return ""
    text = path.read_bytes()[-64_000:].decode("utf-8", errors="replace")
    shown = [line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(line for line in shown[-lines:] if line.strip())


def error_line(tail: str) -> str:
    """The child's own message: the `error: ...` line tuneforge prints, or the last line of a traceback."""
    lines = [line for line in tail.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: "):]
    return lines[-1] if lines else ""


def wait_for(job: TrainJob, states: tuple[str, ...], timeout: float) -> JobStatus:
    """Poll until the job reaches one of `states` (for tests and scripts)."""
    deadline = time.monotonic() + timeout
    while True:
        status = job.status()
        if status.state in states or time.monotonic() > deadline:
            return status
        time.sleep(0.5)
