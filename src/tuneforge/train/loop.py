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

from tuneforge.config.rules import eval_interval
from tuneforge.config.schema import LoraConfig, TrainConfig
from tuneforge.errors import ConfigError
from tuneforge.finetune.fused import fuse_shared_inputs, unfuse
from tuneforge.finetune.methods import adapter_inputs_as_autocast, tuner_layers
from tuneforge.stages.base import Stage
from tuneforge.train.batches import BatchPlan, epoch_of, split_by_tokens, step_batches
from tuneforge.train.checkpoint import (
    TrainState,
    check_depends,
    checkpoint_dir,
    in_progress,
    load_checkpoint,
    load_weights,
    prune_checkpoints,
    resolve_resume,
    save_checkpoint,
    start_checkpoint,
)
from tuneforge.train.distributed import (
    ENGINE_TAG,
    FSDP_TAG,
    deepspeed_engine,
    full_state,
    gathered,
    is_sharded,
    load_sharded,
    save_sharded,
    shard,
)
from tuneforge.train.optim import build_optimizer, build_scheduler
from tuneforge.train.tracking import Progress, Tracker


class LossModule(nn.Module):
    """Wraps model + stage so DDP sees one forward that returns (summed loss, units, metrics)."""

    def __init__(self, model: nn.Module, stage: Stage) -> None:
        super().__init__()
        self.model = model
        self.stage = stage
        self.tuner_layers = tuner_layers(model)  # (the adapters are in place when the loop starts)

    @property
    def config(self) -> Any:
        """The model's config (accelerate sizes DeepSpeed's "auto" ZeRO buckets from its hidden size)."""
        from tuneforge.stages.base import unwrap_causal_lm

        return getattr(unwrap_causal_lm(self.model), "config", None)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        with adapter_inputs_as_autocast(self.model, self.tuner_layers):
            out = self.stage.loss(self.model, batch)
        return out.loss_sum, out.units, out.metrics


class Window:
    """Loss, units and metric [sum, count] pairs added up between two log lines; reduced over processes on read."""

    def __init__(self) -> None:
        self.loss, self.units, self.metrics = 0.0, 0.0, {}

    def add(self, loss_sum: Tensor, units: float, metrics: dict[str, Tensor]) -> None:
        self.loss += float(loss_sum.detach().float())
        self.units += units
        for name, pair in metrics.items():
            self.metrics[name] = self.metrics.get(name, 0) + pair

    def read(self, acc: Any, stage: Stage, prefix: str = "") -> dict[str, float]:
        """{loss, every metric} as window means over all processes (every process calls this together)."""
        names = sorted(self.metrics)
        flat = torch.tensor([self.loss, self.units] + [float(v) for n in names for v in self.metrics[n]],
                            dtype=torch.float64)
        if acc.num_processes > 1:
            flat = acc.reduce(flat.to(acc.device), reduction="sum").cpu()
        values = {f"{prefix}loss": float(flat[0] / max(float(flat[1]), 1))}
        for i, name in enumerate(names):
            total, count = float(flat[2 + 2 * i]), float(flat[3 + 2 * i])
            if count > 0:
                values[name] = total / count
        values = stage.summarize({k: v for k, v in values.items()})
        self.__init__()
        return {(k if k.startswith(prefix) else prefix + k): round(v, 6) for k, v in values.items()}


@dataclass
class RunContext:
    """What the loop needs besides model, stage and data: where to write and how to save."""

    run_dir: Path
    accelerator: Any
    plan: BatchPlan
    # writes the user-facing adapter/model of a checkpoint (from the given weights under FSDP)
    save_weights: Callable[[Path, dict[str, Tensor] | None], None] | None = None
    group_by_length: bool = True
    forward_tokens: int = 0  # 0: each micro-batch is one forward pass
    tracker_config: dict[str, Any] = field(default_factory=dict)
    logging_dir: Path | None = None
    lora: LoraConfig | None = None  # the LoRA settings (LoRA+ learning rates) when the method is lora
    fsdp: Any = None  # train.fsdp when FSDP shards the model
    sharded: nn.Module | None = None  # set by fit under FSDP: the root unit (final saves gather through it)
    depends: dict[str, Any] = field(default_factory=dict)  # what an exact resume depends on (checkpoint.py)
    resume_anyway: bool = False  # train.resume_anyway: resume although `depends` changed


@dataclass
class FitResult:
    """How training ended."""

    state: TrainState
    interrupted: bool
    last_loss: float | None
    stop_reason: str = "completed"  # completed | early_stopping | interrupted
    weights_step: int | None = None  # the step whose weights the model holds now (the best one when loaded)

    def outcome(self) -> dict[str, Any]:
        """How training ended, for the manifest: why it stopped, at which step, whose weights are final."""
        return {"stop_reason": self.stop_reason, "steps": self.state.step,
                "final_weights_step": self.weights_step or self.state.step, "best_model": self.state.best or None,
                **peak_memory()}


def peak_memory() -> dict[str, float]:
    """This process's peak resident memory, and its peak GPU memory where it used one (GB)."""
    import resource

    peaks = {"peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return peaks


@dataclass
class BestModel:
    """metric_for_best_model over the evaluations, as the HF Trainer tracks it: early stopping counts evaluations in
    a row that do not strictly beat the best value so far (EarlyStoppingCallback, threshold 0); the best step is
    the best evaluation among those whose weights are kept (a checkpoint, or the final weights)."""

    metric: str
    greater: bool
    patience: int | None
    value: float | None = None  # best value of any evaluation
    bad_evals: int = 0  # evaluations in a row without improvement
    step: int | None = None  # best evaluated step with kept weights
    step_value: float | None = None

    @classmethod
    def from_config(cls, train: TrainConfig, saved: dict[str, Any]) -> BestModel | None:
        """None when neither early stopping nor load_best_model_at_end is asked for; else resumed from `saved`."""
        if train.early_stopping_steps is None and not train.load_best_model_at_end:
            return None
        metric = train.metric_for_best_model
        metric = metric if metric.startswith("eval_") else f"eval_{metric}"
        greater = train.greater_is_better if train.greater_is_better is not None else not metric.endswith("loss")
        best = cls(metric, greater, train.early_stopping_steps)
        if saved.get("metric", metric) != metric or saved.get("greater", greater) != greater:
            return best  # resumed with another metric or direction: the saved best means nothing for it
        for key in ("value", "bad_evals", "step", "step_value"):
            setattr(best, key, saved.get(key, getattr(best, key)))
        return best

    def better(self, value: float, than: float | None) -> bool:
        """Strictly better in the metric's direction (anything beats no value)."""
        return than is None or (value > than if self.greater else value < than)

    def update(self, step: int, metrics: dict[str, float], kept: bool) -> bool:
        """Record one evaluation; kept: this step's weights are saved. True when training should stop now."""
        if self.metric not in metrics:
            raise ConfigError(f"train.metric_for_best_model: '{self.metric}' is not an evaluation metric of this "
                              f"stage; use one of {', '.join(sorted(metrics))}")
        value = metrics[self.metric]
        self.bad_evals = 0 if self.better(value, self.value) else self.bad_evals + 1
        self.value = value if self.better(value, self.value) else self.value
        stop = self.patience is not None and self.bad_evals >= self.patience
        if (kept or stop) and self.better(value, self.step_value):  # when stopping, this step's weights are final
            self.step, self.step_value = step, value
        return stop

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps so a resumed run continues the count."""
        return {"metric": self.metric, "greater": self.greater, "value": self.value, "bad_evals": self.bad_evals,
                "step": self.step, "step_value": self.step_value}


def fit(model: nn.Module, stage: Stage, train_rows: list[dict], val_rows: list[dict], train: TrainConfig,
        run: RunContext) -> FitResult:
    """Train until the plan's total steps (or a signal); checkpoint, log, evaluate along the way.

    This is deliberately one function (~100 lines): the whole loop readable top to bottom.
    """
    acc, plan = run.accelerator, run.plan
    lengths = [stage.row_length(r) for r in train_rows]
    module = LossModule(model, stage)
    # FSDP2 replaces the parameters by their shards: before anything holds them (the optimizer above all)
    sharded = run.sharded = shard(module, model, run.fsdp) if run.fsdp is not None else None
    # Taken before the optimizer is built: BAdam then marks only its active block trainable, but clipping and
    # checkpoints cover every parameter the method trains.
    params = [p for p in model.parameters() if p.requires_grad]
    trained_names = {n for n, p in model.named_parameters() if p.requires_grad}
    optimizer = build_optimizer(model, train, run.lora, acc.num_processes)
    scheduler = build_scheduler(optimizer, train, plan.total_steps)
    # The scheduler stays the loop's to step, also under DeepSpeed (it sets the lr of the optimizer's groups,
    # which ZeRO's optimizer shares): handed to the engine it was stepped twice per step.
    if sharded is None:
        module, optimizer = acc.prepare(module, optimizer)
    engine = deepspeed_engine(acc, module)
    if acc.num_processes == 1 and acc.device.type == "cpu" and not train.compile:
        # q/k/v and gate/up LoRA layers: one frozen matmul per shared input. One process only: DDP, ZeRO and FSDP
        # runs then compute alike (FSDP's sharded weights cannot be grouped), bf16 rounding included.
        fuse_shared_inputs(model)
    stage.run_dir = run.run_dir  # where the stage writes its own files (grpo: completions.jsonl)
    resume = resolve_resume(train.resume_from_checkpoint, run.run_dir)
    changed = check_depends(resume, run.depends, run.resume_anyway) if resume else []
    state = load_checkpoint(resume, model, optimizer, scheduler, stage, engine, sharded) if resume else TrainState()
    main = acc.is_main_process
    tracker = Tracker(run.run_dir, train.report_to, run.logging_dir or run.run_dir / "tensorboard",
                      state.step if resume else None, run.tracker_config) if main else None
    progress = Progress(plan.total_steps, state.step, main)
    if resume:
        progress.write(f"resumed from {resume} at step {state.step}" +
                       (f" although these changed (train.resume_anyway): {'; '.join(changed)}" if changed else ""))
    eval_every = eval_interval(train)
    best, stop_early = BestModel.from_config(train, state.best), False
    session_start, session_step, session_tokens, elapsed_before = time.time(), state.step, 0, state.elapsed
    padded_tokens = 0  # input tokens including padding, for the benchmark's padding overhead
    window, last_loss, shown = Window(), None, {}
    module.train()
    with stop_on_signals() as stopped:
        while state.step < plan.total_steps and not stopped() and not stop_early:
            micro = [[train_rows[i] for i in b] for b in
                     step_batches(lengths, plan, state.step, train.seed, run.group_by_length, acc.process_index)]
            micro = [part for rows in micro for part in split_by_tokens(rows, run.forward_tokens, stage.row_length)]
            # Normalise by the stage's units (trained tokens, pairs, rows) of the whole window on every process,
            # so accum 8 x batch 1 gives the gradient of batch 8 x accum 1; DDP's averaging is undone by the
            # world-size factor.
            with acc.autocast():
                generated = stage.prepare_step(model, micro, acc)
            if generated is not None:  # online stages (grpo) train on rows generated for this step
                micro = [part for rows in generated for part in split_by_tokens(rows, run.forward_tokens,
                                                                                stage.row_length)]
            global_units = int(_sum(acc, sum(stage.units(rows) for rows in micro)))
            for i, rows in enumerate(micro):
                batch = {k: v.to(acc.device) for k, v in stage.collate(rows).items()}
                last = i == len(micro) - 1  # gradients are reduced over processes at the last micro-batch only
                if engine is not None:  # DeepSpeed also steps there
                    acc.gradient_state._set_sync_gradients(last)
                if sharded is not None:
                    sharded.set_requires_gradient_sync(last)
                sync = contextlib.nullcontext() if last or sharded is not None else acc.no_sync(module)
                with sync, acc.autocast():
                    loss_sum, units, metrics = module(batch)
                    acc.backward(loss_sum * acc.num_processes / max(global_units, 1))
                window.add(loss_sum, float(units), metrics)
                session_tokens += sum(stage.row_length(r) for r in rows) * acc.num_processes
                padded_tokens += batch["input_ids"].numel() * acc.num_processes
            grad_norm = _clip(acc, params, train.max_grad_norm, engine, sharded)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens += global_units
            elapsed = time.time() - session_start
            state.elapsed = elapsed_before + elapsed
            speed = session_tokens / max(elapsed, 1e-9)
            eta = elapsed / max(state.step - session_step, 1) * (plan.total_steps - state.step)
            lr = scheduler.get_last_lr()[0]
            if state.step % train.logging_steps == 0 or state.step == plan.total_steps:
                logged = window.read(acc, stage)
                last_loss = logged["loss"]
                record = {"step": state.step, "epoch": round(epoch_of(state.step, plan), 4), **logged, "lr": lr,
                          "grad_norm": round(grad_norm, 6), "tokens_per_s": round(speed, 2),
                          "elapsed": round(elapsed, 2), "eta": round(eta, 1), "trained_units": state.tokens,
                          "input_tokens": session_tokens, "padded_tokens": padded_tokens, "time": round(time.time(), 3)}
                if tracker:
                    tracker.log(record)
                shown = {label: f"{logged[k]:.3f}" for k, label in stage.progress_metrics.items() if k in logged}
            progress.update({"loss": f"{last_loss:.4f}" if last_loss is not None else "-",
                             **shown, "lr": f"{lr:.2e}", "tok/s": f"{speed:.0f}"})
            if val_rows and eval_every and (state.step % eval_every == 0 or state.step == plan.total_steps):
                metrics = evaluate(module, stage, val_rows, train.eval_batch_size, acc, run.forward_tokens)
                if tracker:
                    tracker.log({"step": state.step, "epoch": round(epoch_of(state.step, plan), 4), **metrics})
                progress.write(f"step {state.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
                if best:
                    kept = bool(train.save_steps) and state.step % train.save_steps == 0
                    stop_early = best.update(state.step, metrics, kept or state.step == plan.total_steps)
                    state.best = best.state()
            if train.save_steps and state.step % train.save_steps == 0 and state.step < plan.total_steps:
                _save(run, model, optimizer, scheduler, state, stage, train.save_total_limit, trained_names, engine,
                  sharded)
        interrupted = state.step < plan.total_steps and not stop_early
        if stop_early:
            progress.write(f"early stopping at step {state.step}: {best.metric} has not improved for "
                           f"{best.bad_evals} evaluations (best {best.value:.4g})")
        if interrupted:
            _save(run, model, optimizer, scheduler, state, stage, train.save_total_limit, trained_names, engine,
                  sharded)
            progress.write(f"interrupted: checkpoint saved at step {state.step}; rerun with "
                           "train.resume_from_checkpoint=auto to continue")
    progress.close()
    if tracker:
        tracker.close()
    weights_step = state.step
    if best and train.load_best_model_at_end and not interrupted and best.step not in (None, state.step):
        best_dir = checkpoint_dir(run.run_dir, best.step)  # the final weights become the best ones
        if engine is not None:
            engine.load_checkpoint(str(best_dir), tag=ENGINE_TAG, load_optimizer_states=False,
                                   load_lr_scheduler_states=False)
        elif sharded is not None:
            load_sharded(sharded, None, best_dir / FSDP_TAG)
        else:
            load_weights(best_dir, model)
        weights_step = best.step
        progress.write(f"loaded the best weights: step {best.step} ({best.metric} {best.step_value:.4g})")
    reason = "interrupted" if interrupted else "early_stopping" if stop_early else "completed"
    unfuse(model)
    return FitResult(state, interrupted, last_loss, reason, weights_step)


def evaluate(module: nn.Module, stage: Stage, rows: list[dict], batch_size: int, acc: Any,
             forward_tokens: int = 0) -> dict[str, float]:
    """eval_loss and every stage metric (eval_ prefixed) over the validation rows, sharded across processes;
    eval_perplexity for cross-entropy stages. No gradients of any kind are computed.

    Sharded weights (FSDP, DeepSpeed) are gathered inside every forward, a collective: there each process makes as
    many forward passes as the busiest one, the extra ones on a filler batch whose results are dropped. Otherwise
    the bare module computes (DDP's forward may synchronise buffers, also a collective)."""
    module.eval()
    mine = rows[acc.process_index::acc.num_processes]
    window = Window()
    inner = module  # the LossModule inside DDP's (or another wrapper's) .module
    while not isinstance(inner, LossModule) and isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module
    model = inner.model
    lockstep = acc.num_processes > 1 and (is_sharded(module) or deepspeed_engine(acc, module) is not None)
    forward = module if lockstep else inner
    # agreed before the first forward: a collective now could not meet the other processes' gathers later
    busiest = _max(acc, sum(len(split_by_tokens(mine[start:start + batch_size], forward_tokens, stage.row_length))
                            for start in range(0, len(mine), batch_size))) if lockstep else 0
    passes = 0
    with torch.no_grad():
        for start in range(0, len(mine), batch_size):
            batch_rows = mine[start:start + batch_size]
            with acc.autocast():
                generated = stage.eval_step(model, batch_rows, acc, start // batch_size)
            if generated is not None:  # online stages: completions of these prompts, with the rollout's metrics
                batch_rows, rollout_metrics = generated  # (not its timings: evaluation reports no timing/)
                window.add(torch.zeros(()), 0.0, {k: v for k, v in rollout_metrics.items()
                                                  if not k.startswith("timing/")})
            for part_rows in split_by_tokens(batch_rows, forward_tokens, stage.row_length):
                batch = {k: v.to(acc.device) for k, v in stage.collate(part_rows).items()}
                with acc.autocast():
                    loss_sum, units, metrics = forward(batch)
                window.add(loss_sum, float(units), metrics)
                passes += 1
        if lockstep:
            filler = {k: v.to(acc.device) for k, v in stage.collate(rows[:1]).items()}
            for _ in range(busiest - passes):
                with acc.autocast():
                    forward(filler)
    module.train()
    values = window.read(acc, stage, prefix="eval_")
    if stage.reports_perplexity:
        values["eval_perplexity"] = round(math.exp(min(values["eval_loss"], 50)), 4)
    return values


def _save(run: RunContext, model: nn.Module, optimizer: Any, scheduler: Any, state: TrainState, stage: Stage,
          keep: int | None, names: set[str] | None = None, engine: Any = None, sharded: nn.Module | None = None) \
        -> None:
    """A checkpoint, written by rank 0 (DDP: every rank holds the same state). Under DeepSpeed and FSDP every rank
    first writes its shard of model and optimizer into the folder being made, then the weights are gathered on every
    rank while rank 0 writes the trained weights and the adapter."""
    acc = run.accelerator
    folder = checkpoint_dir(run.run_dir, state.step)
    collective = engine is not None or sharded is not None
    if collective:
        if acc.is_main_process:
            start_checkpoint(folder)
        acc.wait_for_everyone()
        if engine is not None:
            engine.save_checkpoint(str(in_progress(folder)), tag=ENGINE_TAG)
        else:
            save_sharded(sharded, optimizer, in_progress(folder) / FSDP_TAG)
    trained = [p for n, p in model.named_parameters() if (n in names if names is not None else p.requires_grad)]
    weights = full_state(sharded, trainable_only=True)
    with gathered(trained):
        if acc.is_main_process:
            save_checkpoint(folder, model, None if collective else optimizer, scheduler, state,
                            run.save_weights, stage.state_dict(), names, started=collective, weights=weights,
                            depends=run.depends)
            best_step = state.best.get("step")
            prune_checkpoints(run.run_dir, keep, checkpoint_dir(run.run_dir, best_step) if best_step else None)
    acc.wait_for_everyone()


def _max(acc: Any, value: int) -> int:
    """The largest of a number over all processes."""
    gathered_values = acc.gather(torch.tensor([value], dtype=torch.int64, device=acc.device))
    return int(gathered_values.max())


def _sum(acc: Any, value: float | Tensor) -> Tensor:
    """Sum a number over all processes."""
    tensor = torch.as_tensor(value, dtype=torch.float64).reshape(1).to(acc.device)
    return acc.reduce(tensor, reduction="sum").cpu()[0] if acc.num_processes > 1 else tensor.cpu()[0]


def _clip(acc: Any, params: list[nn.Parameter], max_norm: float, engine: Any = None,
          sharded: nn.Module | None = None) -> float:
    if engine is not None:  # DeepSpeed clipped (gradient_clipping = max_grad_norm) and stepped at the boundary
        norm = engine.get_global_grad_norm()  # None where the engine keeps none (ZeRO-0 without clipping)
        return float(norm) if norm is not None else 0.0
    if sharded is not None:  # the norm over every rank's gradient shards (a DTensor); inf: measure, do not clip
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    grads = [p.grad for p in params if p.grad is not None]
    if max_norm > 0 and not any(g.is_sparse for g in grads):
        return float(acc.clip_grad_norm_(params, max_norm))
    # Also the path for sparse gradients (BAdam's ratio mode, never under fp16 loss scaling), which torch's
    # clip_grad_norm_ cannot take.
    norm = torch.stack([g.detach().float().norm() for g in grads]).norm() if grads else torch.tensor(0.0)
    if max_norm > 0:
        for g in grads:
            g.detach().mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0).to(g.dtype))
    return float(norm)


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
