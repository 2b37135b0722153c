"""The training loop: one screen of code on accelerate; stages supply collation and loss."""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tuneforge.config.schema import TrainConfig
from tuneforge.stages.base import Stage
from tuneforge.train.batches import BatchPlan, epoch_of, split_by_tokens, step_batches
from tuneforge.train.checkpoint import (
    TrainState,
    checkpoint_dir,
    load_checkpoint,
    prune_checkpoints,
    resolve_resume,
    save_checkpoint,
)
from tuneforge.train.optim import build_optimizer, build_scheduler
from tuneforge.train.tracking import Progress, Tracker


class LossModule(nn.Module):
    """Wraps model + stage so DDP sees one forward that returns (summed loss, trained tokens)."""

    def __init__(self, model: nn.Module, stage: Stage) -> None:
        super().__init__()
        self.model = model
        self.stage = stage

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, float]:
        out = self.stage.loss(self.model, batch)
        return out.loss_sum, out.tokens, out.metrics.get("correct", 0.0)


@dataclass
class RunContext:
    """What the loop needs besides model, stage and data: where to write and how to save."""

    run_dir: Path
    accelerator: Any
    plan: BatchPlan
    save_weights: Callable[[Path], None] | None = None  # writes the user-facing adapter/model of a checkpoint
    group_by_length: bool = True
    forward_tokens: int = 0  # 0: each micro-batch is one forward pass
    tracker_config: dict[str, Any] = field(default_factory=dict)
    logging_dir: Path | None = None


@dataclass
class FitResult:
    """How training ended."""

    state: TrainState
    interrupted: bool
    last_loss: float | None


def fit(model: nn.Module, stage: Stage, train_rows: list[dict], val_rows: list[dict], train: TrainConfig,
        run: RunContext) -> FitResult:
    """Train until the plan's total steps (or a signal); checkpoint, log, evaluate along the way.

    This is deliberately one function (~100 lines): the whole loop readable top to bottom.
    """
    acc, plan = run.accelerator, run.plan
    lengths = [len(r["input_ids"]) for r in train_rows]
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train, plan.total_steps)
    module, optimizer = acc.prepare(LossModule(model, stage), optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    resume = resolve_resume(train.resume_from_checkpoint, run.run_dir)
    state = load_checkpoint(resume, model, optimizer, scheduler) if resume else TrainState()
    main = acc.is_main_process
    tracker = Tracker(run.run_dir, train.report_to, run.logging_dir or run.run_dir / "tensorboard",
                      state.step if resume else None, run.tracker_config) if main else None
    progress = Progress(plan.total_steps, state.step, main)
    if resume:
        progress.write(f"resumed from {resume} at step {state.step}")
    eval_every = train.eval_steps or train.save_steps
    session_start, session_step, session_tokens, elapsed_before = time.time(), state.step, 0, state.elapsed
    padded_tokens = 0  # input tokens including padding, for the benchmark's padding overhead
    window_loss, window_tokens, last_loss = 0.0, 0, None
    module.train()
    with stop_on_signals() as stopped:
        while state.step < plan.total_steps and not stopped():
            micro = [[train_rows[i] for i in b] for b in
                     step_batches(lengths, plan, state.step, train.seed, run.group_by_length, acc.process_index)]
            micro = [part for rows in micro for part in split_by_tokens(rows, run.forward_tokens)]
            # Normalise by trained tokens of the whole window on every process, so accum 8 x batch 1 gives the
            # gradient of batch 8 x accum 1; DDP's gradient averaging is undone by the world-size factor.
            global_tokens = int(_sum(acc, sum(stage.trained_tokens(rows) for rows in micro)))
            step_loss = torch.zeros(())
            for i, rows in enumerate(micro):
                batch = {k: v.to(acc.device) for k, v in stage.collate(rows).items()}
                sync = contextlib.nullcontext() if i == len(micro) - 1 else acc.no_sync(module)
                with sync, acc.autocast():
                    loss_sum, _, _ = module(batch)
                    acc.backward(loss_sum * acc.num_processes / max(global_tokens, 1))
                step_loss += loss_sum.detach().float().cpu()
                session_tokens += sum(len(r["input_ids"]) for r in rows) * acc.num_processes
                padded_tokens += batch["input_ids"].numel() * acc.num_processes
            grad_norm = _clip(acc, params, train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens += global_tokens
            window_loss += float(_sum(acc, step_loss))
            window_tokens += global_tokens
            elapsed = time.time() - session_start
            state.elapsed = elapsed_before + elapsed
            speed = session_tokens / max(elapsed, 1e-9)
            eta = elapsed / max(state.step - session_step, 1) * (plan.total_steps - state.step)
            lr = scheduler.get_last_lr()[0]
            if state.step % train.logging_steps == 0 or state.step == plan.total_steps:
                last_loss = window_loss / max(window_tokens, 1)
                record = {"step": state.step, "epoch": round(epoch_of(state.step, plan), 4),
                          "loss": round(last_loss, 6), "lr": lr, "grad_norm": round(grad_norm, 6),
                          "tokens_per_s": round(speed, 2), "elapsed": round(elapsed, 2), "eta": round(eta, 1),
                          "trained_tokens": state.tokens, "input_tokens": session_tokens,
                          "padded_tokens": padded_tokens, "time": round(time.time(), 3)}
                window_loss, window_tokens = 0.0, 0
                if tracker:
                    tracker.log(record)
            progress.update({"loss": f"{last_loss:.4f}" if last_loss is not None else "-", "lr": f"{lr:.2e}",
                             "tok/s": f"{speed:.0f}"})
            if val_rows and eval_every and (state.step % eval_every == 0 or state.step == plan.total_steps):
                metrics = evaluate(module, stage, val_rows, train.eval_batch_size, acc, run.forward_tokens)
                if tracker:
                    tracker.log({"step": state.step, "epoch": round(epoch_of(state.step, plan), 4), **metrics})
                progress.write(f"step {state.step}: eval_loss {metrics['eval_loss']:.4f} "
                               f"ppl {metrics['eval_perplexity']:.2f}")
            if train.save_steps and state.step % train.save_steps == 0 and state.step < plan.total_steps:
                _save(run, model, optimizer, scheduler, state, train.save_total_limit)
        interrupted = state.step < plan.total_steps
        if interrupted:
            _save(run, model, optimizer, scheduler, state, train.save_total_limit)
            progress.write(f"interrupted: checkpoint saved at step {state.step}; rerun with "
                           "train.resume_from_checkpoint=auto to continue")
    progress.close()
    if tracker:
        tracker.close()
    return FitResult(state, interrupted, last_loss)


def evaluate(module: nn.Module, stage: Stage, rows: list[dict], batch_size: int, acc: Any,
             forward_tokens: int = 0) -> dict[str, float]:
    """Mean loss over every trained token of the validation rows (sharded across processes), and perplexity."""
    module.eval()
    mine = rows[acc.process_index::acc.num_processes]
    loss_sum, tokens, correct = torch.zeros(()), torch.zeros(()), torch.zeros(())
    with torch.no_grad():
        for start in range(0, len(mine), batch_size):
            for part_rows in split_by_tokens(mine[start:start + batch_size], forward_tokens):
                batch = {k: v.to(acc.device) for k, v in stage.collate(part_rows).items()}
                with acc.autocast():
                    part, count, hits = module(batch)
                loss_sum += part.float().cpu()
                tokens += count.float().cpu()
                correct += hits
    module.train()
    total, count, hits = float(_sum(acc, loss_sum)), float(_sum(acc, tokens)), float(_sum(acc, correct))
    loss = total / max(count, 1)
    return {"eval_loss": round(loss, 6), "eval_perplexity": round(math.exp(min(loss, 50)), 4),
            "eval_accuracy": round(hits / max(count, 1), 6)}


def _save(run: RunContext, model: nn.Module, optimizer: Any, scheduler: Any, state: TrainState,
          keep: int | None) -> None:
    acc = run.accelerator
    if acc.is_main_process:
        save_checkpoint(checkpoint_dir(run.run_dir, state.step), model, optimizer, scheduler, state,
                        run.save_weights)
        prune_checkpoints(run.run_dir, keep)
    acc.wait_for_everyone()


def _sum(acc: Any, value: float | Tensor) -> Tensor:
    """Sum a number over all processes."""
    tensor = torch.as_tensor(value, dtype=torch.float64).reshape(1).to(acc.device)
    return acc.reduce(tensor, reduction="sum").cpu()[0] if acc.num_processes > 1 else tensor.cpu()[0]


def _clip(acc: Any, params: list[nn.Parameter], max_norm: float) -> float:
    if max_norm > 0:
        return float(acc.clip_grad_norm_(params, max_norm))
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Callable[[], bool]]:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves a checkpoint and returns."""
    flag = {"stop": False}

    def handler(signum: int, frame: Any) -> None:
        flag["stop"] = True

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: flag["stop"]
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
