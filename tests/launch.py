"""Two-process runs for tests, without paying each process's ~8 s of imports on every launch.

`two_ranks("train", "cfg.yaml")` starts two real processes that rendezvous over gloo through the environment
torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and run
`tuneforge.cli.main.main(argv)`, the entry point `python -m tuneforge` calls. The processes are forked from a
multiprocessing forkserver that imported torch, transformers, peft, datasets, accelerate, deepspeed and tuneforge
once (and ran nothing: no threads, no process group), so a launch costs its work, not its imports. The launchers
themselves (torchrun, tuneforge's own re-launch, `accelerate launch`) keep their tests with real launches.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(argv: list[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    """One worker: the caller's environment plus torchrun's, output to files, then the CLI's exit code."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    import torch

    torch.set_num_threads(1)
    from tuneforge.cli.main import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def two_ranks(*argv: str, logs: Path | None = None, cwd: Path | None = None, timeout: float = 300,
              check: bool = True) -> subprocess.CompletedProcess:
    """Run `tuneforge ARGV` as ranks 0 and 1 of one node; stdout / stderr are both ranks' output, rank 0 first."""
    logs = Path(tempfile.mkdtemp(prefix="ranks-")) if logs is None else logs
    logs.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    ctx = context()
    procs, files = [], []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   GROUP_RANK="0", ROLE_RANK=str(rank), ROLE_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1")
        out, err = logs / f"rank{rank}.out", logs / f"rank{rank}.err"
        files.append((out, err))
        proc = ctx.Process(target=_rank, args=(list(argv), env, str(cwd or Path.cwd()), str(out), str(err)))
        proc.start()
        procs.append(proc)
    for proc in procs:
        proc.join(timeout)
    hung = [p for p in procs if p.exitcode is None]
    for proc in hung:
        proc.kill()
        proc.join()
    stdout = "".join(out.read_text(errors="replace") for out, _ in files if out.exists())
    stderr = "".join(err.read_text(errors="replace") for _, err in files if err.exists())
    code = 124 if hung else max(abs(p.exitcode) for p in procs)
    if check:
        assert code == 0, f"exit codes {[p.exitcode for p in procs]}\n{stderr[-4000:]}"
    return subprocess.CompletedProcess(["tuneforge", *argv], code, stdout, stderr)
