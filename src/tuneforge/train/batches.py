"""Which rows go in which micro-batch, on which process: a pure function of (seed, epoch, step).

Because the order is recomputed rather than iterated, resuming at optimizer step s needs no data-loader
state: step s covers micro-batches [w*accum, (w+1)*accum) of epoch s // steps_per_epoch, w = s % steps_per_epoch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

MEGABATCH = 32  # global micro-batches sorted together when grouping by length


@dataclass(frozen=True)
class BatchPlan:
    """Batch geometry of a run; all sizes are per optimizer step unless named otherwise."""

    rows: int
    batch_size: int
    accumulation: int
    world_size: int
    epochs: float
    max_steps: int = -1
    shuffle: bool = True  # false: every epoch in dataset order (LLaMA-Factory's disable_shuffling)
    data_seed: int | None = None  # seeds the order instead of the run seed (the HF Trainer's data_seed)

    @property
    def global_micro_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(self.rows / self.global_micro_batch)

    @property
    def steps_per_epoch(self) -> int:
        """floor(ceil(rows / (batch * world)) / accumulation), at least 1 (the HF Trainer / LLaMA-Factory rule)."""
        return max(1, self.micro_batches_per_epoch // self.accumulation)

    @property
    def total_steps(self) -> int:
        """max_steps when set, else ceil(epochs * steps_per_epoch). 1000 rows, 8 x 8, 30 epochs -> 15 x 30 = 450."""
        return self.max_steps if self.max_steps > 0 else math.ceil(self.epochs * self.steps_per_epoch)


def epoch_order(lengths: list[int], plan: BatchPlan, epoch: int, seed: int, group_by_length: bool) -> list[list[int]]:
    """Global micro-batches (row indices) for one epoch: shuffled, optionally grouped by similar length; in
    dataset order when the plan does not shuffle (length grouping would reorder rows, so it is off then too)."""
    seed = plan.data_seed if plan.data_seed is not None else seed
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    group_by_length = group_by_length and plan.shuffle
    if plan.shuffle:
        rng.shuffle(order)
    size = plan.global_micro_batch
    if group_by_length:
        mega = size * MEGABATCH
        order = [i for s in range(0, len(order), mega)
                 for i in sorted(order[s:s + mega], key=lambda j: -lengths[j])]
    batches = [order[s:s + size] for s in range(0, len(order), size)]
    if plan.world_size > 1 and len(batches[-1]) < size:
        # Every process must run the same number of micro-batches (DDP), so the last one wraps around.
        batches[-1] = batches[-1] + order[: size - len(batches[-1])]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def step_batches(lengths: list[int], plan: BatchPlan, step: int, seed: int, group_by_length: bool,
                 rank: int) -> list[list[int]]:
    """This process's micro-batches (row indices) for optimizer step `step` (0-based)."""
    epoch, window = divmod(step, plan.steps_per_epoch)
    batches = epoch_order(lengths, plan, epoch, seed, group_by_length)
    chosen = batches[window * plan.accumulation:(window + 1) * plan.accumulation]
    return [shard(b, rank, plan.world_size) for b in chosen if shard(b, rank, plan.world_size)]


def shard(batch: list[int], rank: int, world: int) -> list[int]:
    """A process's share of a global micro-batch (strided, so shares differ by at most one row)."""
    return batch[rank::world]


def epoch_of(step: int, plan: BatchPlan) -> float:
    """Fractional epoch reached after `step` optimizer steps."""
    return step / plan.steps_per_epoch


def pack_rows(rows: list[dict], cutoff: int, seed: int, neat: bool = True, shuffle: bool = True) -> list[dict]:
    """Greedy first-fit-decreasing packing of SFT rows into blocks of at most cutoff tokens.

    Each row keeps its own position ids (restarting at 0) and the first label of every row is masked. Neat
    packing (LLaMA-Factory's neat_packing) keeps attention inside each row, so packed and unpacked losses are the
    same sum over the same predictions; plain packing (its `packing: true`) lets each token also attend to the
    rows packed before it (`cross_attention` tells the collator). Blocks are shuffled unless `shuffle` is off.
    """
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]["input_ids"]), i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(rows[i]["input_ids"])
        slot = next((b for b, free in enumerate(room) if free >= n), None)
        if slot is None:
            bins.append([i])
            room.append(cutoff - n)
        else:
            bins[slot].append(i)
            room[slot] -= n
    if shuffle:
        random.Random(seed).shuffle(bins)
    else:
        bins.sort(key=min)  # blocks in the dataset order of their earliest row
    packed = []
    for members in bins:
        ids, labels, positions = [], [], []
        for i in members:
            row = rows[i]
            ids += row["input_ids"]
            labels += [-100] + list(row["labels"][1:])
            positions += list(range(len(row["input_ids"])))
        block = {"input_ids": ids, "labels": labels, "position_ids": positions,
                 "origin": f"packed {len(members)} rows"}
        packed.append(block if neat else dict(block, cross_attention=True))
    return packed


def split_by_tokens(rows: list[dict], budget: int,
                    length: Callable[[dict], int] = lambda row: len(row["input_ids"])) -> list[list[dict]]:
    """Cut a micro-batch into forward passes of at most `budget` padded tokens (a longer row goes alone).

    The loss is normalised by the window's trained tokens, so the gradient is the same however a micro-batch is
    cut; on CPUs, ~512-token forwards are both faster per token and far lighter on memory than one big batch.
    """
    if budget <= 0:
        return [rows]
    parts: list[list[dict]] = []
    current: list[dict] = []
    longest = 0
    for row in rows:
        n = length(row)
        if current and (len(current) + 1) * max(longest, n) > budget:
            parts.append(current)
            current, longest = [], 0
        current.append(row)
        longest = max(longest, n)
    if current:
        parts.append(current)
    return parts
