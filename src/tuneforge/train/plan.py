"""The pre-launch plan: rows, tokens, steps, parameters and an estimate of peak memory (and time)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from rich.console import Console
from rich.table import Table
from torch import nn

from tuneforge.data.types import EncodeReport
from tuneforge.finetune import count_parameters
from tuneforge.finetune.methods import full_numel
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
    reward_model_gb: float = 0.0  # a separately loaded reward model (ppo, reward_model.type=full)
    generation_gb: float = 0.0  # online stages: KV cache and sampling buffers of one rollout batch
    rollout_seconds: float | None = None  # online stages: measured rollout time of a step (and generation's share)
    generation_seconds: float | None = None
    zero_stage: int | None = None  # DeepSpeed ZeRO stage of the run (memory is per process under it)
    fsdp: bool = False  # FSDP2 shards weights, gradients and optimizer state (memory is per process)


def model_bytes(model: nn.Module | None) -> int:
    """Bytes of a model's parameters (0 for none)."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) if model is not None else 0


def make_plan(rows: list[dict], report: EncodeReport, batches: BatchPlan, model: nn.Module,
              precision: str, stage: Any, zero_stage: int | None = None, fsdp: bool = False) -> Plan:
    """Collect the plan's figures (memory includes separately loaded reference and reward models, and for online
    stages the larger of the training pass and the rollout's generation)."""
    trainable, total = count_parameters(model)
    lengths = [stage.row_length(r) for r in rows]
    ref_bytes = model_bytes(stage.reference_model())
    reward_bytes = model_bytes(stage.reward_model())
    shape = stage.rollout_shape(batches.batch_size, max(lengths)) if hasattr(stage, "rollout_shape") else None
    generation = generation_bytes(model, *shape) if shape else 0
    return Plan(
        rows=len(rows), trained_tokens=report.trained_tokens, input_tokens=sum(lengths),
        truncated=len(report.truncated), dropped=len(report.dropped), no_trained_tokens=len(report.no_trained_tokens),
        batch_size=batches.batch_size, accumulation=batches.accumulation, world_size=batches.world_size,
        steps_per_epoch=batches.steps_per_epoch, total_steps=batches.total_steps,
        epochs=batches.total_steps / batches.steps_per_epoch, trainable_params=trainable, total_params=total,
        peak_memory_gb=(estimate_memory(model, forward_tokens(stage, batches.batch_size, max(lengths)), precision,
                                        generation, zero_stage, batches.world_size, fsdp,
                                        kept_attention(model, max(lengths)))
                        + ref_bytes + reward_bytes) / 2**30,
        zero_stage=zero_stage, fsdp=fsdp,
        precision=precision, stage=stage.describe(), reference_gb=ref_bytes / 2**30,
        reward_model_gb=reward_bytes / 2**30, generation_gb=generation / 2**30,
    )


def forward_tokens(stage: Any, batch_size: int, longest: int) -> int:
    """Tokens of the largest training forward pass: a batch of the longest rows, or an online stage's rollout rows
    (grpo: batch x num_generations completions of the longest prompt + max_completion_length)."""
    if hasattr(stage, "rollout_shape"):
        sequences, length = stage.rollout_shape(batch_size, longest)
        return sequences * length
    return batch_size * longest


def generation_bytes(model: nn.Module, sequences: int, length: int) -> int:
    """A rollout batch's generation memory: the KV cache (keys and values of every layer for `sequences` rows of
    `length` tokens, in the weights' dtype) plus ~4 fp32 [rows, vocab] buffers of sampling (logits, softmax,
    top-p's sort)."""
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", 0)
    heads = getattr(config, "num_attention_heads", 1) or 1
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "hidden_size", 0) // heads
    dtype_bytes = max((p.element_size() for p in model.parameters() if not p.requires_grad), default=4)
    kv = 2 * layers * kv_heads * head_dim * sequences * length * dtype_bytes
    return kv + 4 * sequences * getattr(config, "vocab_size", 0) * 4


def fsdp_gathered_bytes(model: nn.Module) -> int:
    """Weights FSDP holds whole at once: the root unit's (embeddings, final norm, head: gathered from the first
    forward to the last backward) and two decoder layers' (the one computing and the one prefetched)."""
    from tuneforge.stages.base import unwrap_causal_lm

    names = set(getattr(unwrap_causal_lm(model), "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in in_layers)
    largest = max((sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layers), default=0)
    return root + 2 * largest


def kept_attention(model: nn.Module, longest: int) -> int:
    """The length whose attention probabilities a CPU run keeps for backward (models/attention.py), 0 for none."""
    from tuneforge.models import attention, segments
    from tuneforge.stages.base import unwrap_causal_lm

    config = getattr(unwrap_causal_lm(model), "config", None)
    kept = getattr(config, "_attn_implementation", None) in (attention.NAME, segments.NAME)
    return longest if kept and longest <= attention.MAX_TOKENS else 0


def estimate_memory(model: nn.Module, tokens: int, precision: str, generation: int = 0,
                    zero_stage: int | None = None, world: int = 1, fsdp: bool = False,
                    attention_length: int = 0) -> float:
    """Bytes per process: weights + fp32 grads and AdamW moments of trained weights + the larger of the training
    pass (activations + loss chunk) and an online stage's rollout generation (`generation` bytes).

    Under DeepSpeed ZeRO (zero_stage) over `world` processes: stage 1 shards the optimizer state (with the fp32
    master copy DeepSpeed keeps of bf16/fp16 weights), stage 2 also the gradients, stage 3 also the weights.
    Under FSDP2 weights, gradients and optimizer state are all sharded (no master copy: weights keep their dtype),
    plus what is gathered whole at once (fsdp_gathered_bytes).

    Activations of a decoder layer are counted as (10 * hidden + 4 * intermediate) values per token (inputs of the
    projections, norms, attention and MLP outputs kept for backward), at 2 bytes under bf16/fp16 and 4 in fp32;
    plus, when a CPU run keeps attention probabilities for rows of `attention_length` tokens, heads x that length
    values per token and layer (at most attention.MAX_PROBS a layer).
    """
    config = getattr(model, "config", None)
    weights = sum(full_numel(p) * p.element_size() for p in model.parameters())
    trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    grads, optimizer = trainable * 4, trainable * 4 * 2
    if zero_stage is not None:
        shards = max(world, 1)
        optimizer += trainable * 4 if precision != "fp32" else 0  # DeepSpeed's fp32 master weights
        optimizer /= shards if zero_stage >= 1 else 1
        grads /= shards if zero_stage >= 2 else 1
        weights /= shards if zero_stage >= 3 else 1
    elif fsdp:
        weights = weights / max(world, 1) + fsdp_gathered_bytes(model)
        grads, optimizer = grads / max(world, 1), optimizer / max(world, 1)
    optimizer_and_grads = grads + optimizer
    runtime = 600 * 2**20  # the Python process with torch and transformers imported
    return float(weights + optimizer_and_grads + max(pass_bytes(config, tokens, precision, attention_length),
                                                     generation) + runtime)


def pass_bytes(config: Any, tokens: int, precision: str, attention_length: int = 0) -> int:
    """Memory of one training forward and backward of `tokens` tokens: activations kept for backward plus the
    loss's chunk of logits (see estimate_memory); `config` is the model's config, or anything with its fields."""
    from tuneforge.models.attention import MAX_PROBS

    act_bytes = 4 if precision == "fp32" else 2
    hidden = getattr(config, "hidden_size", 0)
    inter = getattr(config, "intermediate_size", 4 * hidden)
    layers = getattr(config, "num_hidden_layers", 0)
    vocab = getattr(config, "vocab_size", 0)
    activations = tokens * layers * (10 * hidden + 4 * inter) * act_bytes
    heads = getattr(config, "num_attention_heads", 1) or 1
    activations += layers * min(tokens * heads * attention_length, MAX_PROBS) * act_bytes
    return activations + min(tokens, CHUNK_TOKENS) * vocab * 4 * 2


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
         + (f", DeepSpeed ZeRO-{plan.zero_stage} over {plan.world_size} process(es)"
            if plan.zero_stage is not None else "")
         + (f", FSDP2 over {plan.world_size} process(es)" if plan.fsdp else "") + "".join(
            f", {gb:.1f} GB of it the {what}" for what, gb in (("reference model", plan.reference_gb),
                                                               ("reward model", plan.reward_model_gb)) if gb) + ")"),
    ]
    if plan.generation_gb:
        rows.append(("rollout", f"generation needs ~{plan.generation_gb:.2f} GB (KV cache and sampling buffers of "
                                "one rollout batch) while the training pass's activations are freed"))
    if plan.estimated_seconds is not None:
        measured = ""
        if plan.rollout_seconds is not None:
            measured = (f"; of a step, ~{plan.rollout_seconds:.1f} s rollout, ~{plan.generation_seconds:.1f} s of it "
                        "generating")
        rows.append(("time", f"~{format_seconds(plan.estimated_seconds)} (from two measured steps{measured})"))
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
