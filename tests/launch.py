"""Two-process runs for tests, without paying each process's ~8 s of imports on every launch.

`two_ranks("train", "cfg.yaml")` starts two real processes that rendezvous over gloo through the environment
torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and run
`tuneforge.cli.main.main(argv)`, the entry point `python -m tuneforge` calls. The processes are forked from a
multiprocessing forkserver that imported torch, transformers, peft, datasets, accelerate, deepspeed and tuneforge
once (and ran nothing: no threads, no process group), so a launch costs its work, not its imports. The launchers
themselves (torchrun, tuneforge's own re-launch, `accelerate launch`) keep their tests with real launches.

A child gets the caller's environment at launch, but settings the preloaded libraries read at import time (e.g.
datasets' cache paths, HF_HUB_OFFLINE) are those of the moment the forkserver started: pass such settings in the
run's config, not through environment variables.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.connection
import multiprocessing.util  # its exit hook (joining children) is registered before ours, so ours runs first
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tuneforge.train.distributed import free_port

PRELOAD = ["torch", "transformers", "peft", "datasets", "accelerate", "deepspeed", "tuneforge.run",
           "tuneforge.cli.main", "tuneforge.cli.train_cmd", "tests.launch"]
_CONTEXT = None


def context() -> multiprocessing.context.BaseContext:
    """The forkserver context (started on first use, kept for the session)."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def _rank(argv: list[str], env: dict[str, str], cwd: str, out: str, err: str, threads: int) -> None:
    """One worker: the caller's environment (plus torchrun's), output to files, then the CLI's exit code."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    import torch

    torch.set_num_threads(threads)
    from tuneforge.cli.main import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


class Worker:
    """One started process: its multiprocessing handle and its output files (killed at exit if still running, so
    a failed test never leaves pytest waiting on it)."""

    started: list[Worker] = []

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, logs: Path, name: str,
                 threads: int) -> None:
        self.out, self.err = logs / f"{name}.out", logs / f"{name}.err"
        self.process = context().Process(target=_rank, args=(argv, env, str(cwd), str(self.out), str(self.err),
                                                             threads))
        self.process.start()
        Worker.started.append(self)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait(self, timeout: float = 300) -> int | None:
        """The exit code (a signal's as -N), or None if still running after `timeout` (then it is killed)."""
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
            return None
        return self.process.exitcode

    def kill(self) -> None:
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()

    def stdout(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def stderr(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""


@atexit.register  # before multiprocessing's own exit hook, which would join them
def _kill_started() -> None:
    for worker in Worker.started:
        worker.kill()


def wait_all(workers: list[Worker], timeout: float) -> list[int | None]:
    """Exit codes of all workers within one shared deadline; when one fails, the others are killed at once (as
    torchrun tears a group down) instead of waiting in a collective until the deadline. None: killed hanging."""
    deadline = time.monotonic() + timeout
    live = list(workers)
    while live and time.monotonic() < deadline:
        multiprocessing.connection.wait([w.process.sentinel for w in live], deadline - time.monotonic())
        live = [w for w in live if w.process.exitcode is None]
        if any(w.process.exitcode not in (None, 0) for w in workers):
            break
    codes = [w.process.exitcode for w in workers]
    for worker in workers:
        worker.kill()
    return codes


def one_process(*argv: str, logs: Path | None = None, cwd: Path | None = None) -> Worker:
    """Start `tuneforge ARGV` as a single process (to signal, wait for and read) with as many intra-op threads as
    this one, so that its numbers equal a run in this process."""
    import torch

    logs = Path(tempfile.mkdtemp(prefix="worker-")) if logs is None else logs
    logs.mkdir(parents=True, exist_ok=True)
    return Worker(list(argv), dict(os.environ), cwd or Path.cwd(), logs, "worker", torch.get_num_threads())


def two_ranks(*argv: str, logs: Path | None = None, cwd: Path | None = None, timeout: float = 300,
              check: bool = True) -> subprocess.CompletedProcess:
    """Run `tuneforge ARGV` as ranks 0 and 1 of one node; stdout / stderr are both ranks' output, rank 0 first."""
    logs = Path(tempfile.mkdtemp(prefix="ranks-")) if logs is None else logs
    logs.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    workers = []
    try:
        for rank in (0, 1):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                       GROUP_RANK="0", ROLE_RANK=str(rank), ROLE_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port, OMP_NUM_THREADS="1")
            workers.append(Worker(list(argv), env, cwd or Path.cwd(), logs, f"rank{rank}", 1))
        codes = wait_all(workers, timeout)
    finally:  # interrupted (or one rank failed): no rank outlives the call
        for worker in workers:
            worker.kill()
    stdout, stderr = "".join(w.stdout() for w in workers), "".join(w.stderr() for w in workers)
    failed = [abs(c) for c in codes if c]
    code = failed[0] if failed else 124 if None in codes else 0
    if check:
        assert code == 0, f"exit codes {codes}\n{stderr[-4000:]}"
    return subprocess.CompletedProcess(["tuneforge", *argv], code, stdout, stderr)
