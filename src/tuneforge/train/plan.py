"""The pre-launch plan: rows, tokens, steps, parameters and an estimate of peak memory (and time)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from rich.console import Console
from rich.table import Table
from torch import nn

from tuneforge.data.types import EncodeReport
from tuneforge.finetune import count_parameters
from tuneforge.train.batches import BatchPlan
from tuneforge.train.losses import CHUNK_TOKENS


@dataclass
class Plan:
    """Everything printed before training starts."""

    rows: int
    trained_tokens: int
    input_tokens: int
    truncated: int
    dropped: int
    no_trained_tokens: int
    batch_size: int
    accumulation: int
    world_size: int
    steps_per_epoch: int
    total_steps: int
    epochs: float
    trainable_params: int
    total_params: int
    peak_memory_gb: float
    precision: str
    stage: str = ""
    reference_gb: float = 0.0
    estimated_seconds: float | None = None
    optimizer: str = ""


def make_plan(rows: list[dict], report: EncodeReport, batches: BatchPlan, model: nn.Module,
              precision: str, stage: Any) -> Plan:
    """Collect the plan's figures (memory includes a separately loaded reference model)."""
    trainable, total = count_parameters(model)
    lengths = [stage.row_length(r) for r in rows]
    reference = stage.reference_model()
    ref_bytes = sum(p.numel() * p.element_size() for p in reference.parameters()) if reference is not None else 0
    return Plan(
        rows=len(rows), trained_tokens=report.trained_tokens, input_tokens=sum(lengths),
        truncated=len(report.truncated), dropped=len(report.dropped), no_trained_tokens=len(report.no_trained_tokens),
        batch_size=batches.batch_size, accumulation=batches.accumulation, world_size=batches.world_size,
        steps_per_epoch=batches.steps_per_epoch, total_steps=batches.total_steps,
        epochs=batches.total_steps / batches.steps_per_epoch, trainable_params=trainable, total_params=total,
        peak_memory_gb=(estimate_memory(model, forward_tokens(stage, batches.batch_size, max(lengths)), precision)
                        + ref_bytes) / 2**30,
        precision=precision, stage=stage.describe(), reference_gb=ref_bytes / 2**30,
    )


def forward_tokens(stage: Any, batch_size: int, longest: int) -> int:
    """Tokens of the largest training forward pass: a batch of the longest rows, or an online stage's rollout rows
    (grpo: batch x num_generations completions of the longest prompt + max_completion_length)."""
    rollout = getattr(stage, "rollout_tokens", None)
    return rollout(batch_size, longest) if rollout else batch_size * longest


def estimate_memory(model: nn.Module, tokens: int, precision: str) -> float:
    """Bytes per process: weights + fp32 grads and AdamW moments of trained weights + activations + loss chunk.

    Activations of a decoder layer are counted as (10 * hidden + 4 * intermediate) values per token (inputs of the
    projections, norms, attention and MLP outputs kept for backward), at 2 bytes under bf16/fp16 and 4 in fp32.
    """
    config = getattr(model, "config", None)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer_and_grads = trainable * 4 * 3
    act_bytes = 4 if precision == "fp32" else 2
    hidden = getattr(config, "hidden_size", 0)
    inter = getattr(config, "intermediate_size", 4 * hidden)
    layers = getattr(config, "num_hidden_layers", 0)
    vocab = getattr(config, "vocab_size", 0)
    activations = tokens * layers * (10 * hidden + 4 * inter) * act_bytes
    loss_chunk = min(tokens, CHUNK_TOKENS) * vocab * 4 * 2
    runtime = 600 * 2**20  # the Python process with torch and transformers imported
    return float(weights + optimizer_and_grads + activations + loss_chunk + runtime)


def print_plan(plan: Plan, console: Console | None = None) -> None:
    """A two-column table of the plan."""
    table = Table(title="training plan", show_header=False)
    rows: list[tuple[str, Any]] = [
        ("rows", f"{plan.rows:,} ({plan.truncated} truncated, {plan.dropped} dropped, "
                 f"{plan.no_trained_tokens} without trained tokens)"),
        ("tokens", f"{plan.input_tokens:,} in rows, {plan.trained_tokens:,} trained"),
        ("batch", f"{plan.batch_size} per process x {plan.accumulation} accumulation x {plan.world_size} "
                  f"process(es) = {plan.batch_size * plan.accumulation * plan.world_size} rows per step"),
        ("steps", f"{plan.steps_per_epoch} per epoch x {plan.epochs:g} epochs = {plan.total_steps} "
                  "(per epoch: floor(ceil(rows / (batch x processes)) / accumulation))"),
        ("parameters", f"{plan.trainable_params:,} trainable of {plan.total_params:,} "
                       f"({100 * plan.trainable_params / max(plan.total_params, 1):.2f}%)"),
        ("stage", plan.stage),
        *([("optimizer", plan.optimizer)] if plan.optimizer else []),
        ("precision", plan.precision),
        ("peak memory", f"~{plan.peak_memory_gb:.1f} GB per process (estimate"
                        + (f", {plan.reference_gb:.1f} GB of it the reference model)" if plan.reference_gb else ")")),
    ]
    if plan.estimated_seconds is not None:
        rows.append(("time", f"~{format_seconds(plan.estimated_seconds)} (from two measured steps)"))
    for key, value in rows:
        table.add_row(key, str(value))
    (console or Console(stderr=True)).print(table)


def format_seconds(seconds: float) -> str:
    """1h 02m, 3m 20s, 42s."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def plan_dict(plan: Plan) -> dict[str, Any]:
    """The plan as plain data (for the manifest)."""
    return asdict(plan)
