"""Checkpoints: trainable weights, optimizer, schedule, RNG and position; written atomically."""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tuneforge.errors import ConfigError
from tuneforge.io import plain_modes

STATE_FILE = "trainer_state.json"  # written last: a folder without it is incomplete and never resumed from
STAGE_FILE = "stage_state.json"  # a stage's running state (e.g. BCO's reward mean)
DEPENDS_FILE = "resume_key.json"  # what continuing exactly depends on: data, template, batch layout, processes
DEPENDS_NAMES = {"data": "the tokenized data (datasets, template, tokenizer, cutoff or data settings)",
                 "batch_size": "train.batch_size", "gradient_accumulation_steps": "train.gradient_accumulation_steps",
                 "processes": "the number of processes", "stage": "stage", "method": "finetune.method"}


@dataclass
class TrainState:
    """Where a run is: optimizer steps done, tokens trained, seconds spent."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    best: dict[str, Any] = field(default_factory=dict)  # the best-model tracker's state (see train.loop.BestModel)


def checkpoint_dir(output: Path, step: int) -> Path:
    """checkpoints/step-N under the run folder."""
    return output / "checkpoints" / f"step-{step}"


def in_progress(folder: Path) -> Path:
    """The folder a checkpoint is written into before it is renamed into place."""
    return folder.with_name(folder.name + ".tmp")


def start_checkpoint(folder: Path) -> Path:
    """A fresh in-progress folder (DeepSpeed's ranks write their partitions into it before rank 0 completes it)."""
    tmp = in_progress(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def save_checkpoint(folder: Path, model: nn.Module, optimizer: Any, scheduler: Any, state: TrainState,
                    save_adapter: Any = None, stage_state: dict[str, Any] | None = None,
                    names: set[str] | None = None, started: bool = False,
                    weights: dict[str, torch.Tensor] | None = None, depends: dict[str, Any] | None = None) -> None:
    """Write everything needed to continue exactly; rename into place only when complete.

    names: the parameters to save (default: those requiring gradients now; BAdam marks only its active block).
    optimizer None: its state is saved elsewhere (DeepSpeed's or FSDP's shards, already in the started folder).
    weights: the trained weights gathered from FSDP's shards (the model's own parameters are shards then).
    """
    tmp = in_progress(folder) if started else start_checkpoint(folder)
    given = weights
    if weights is None:
        weights = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters()
                   if (n in names if names is not None else p.requires_grad)}
    elif names is not None:
        weights = {n: t for n, t in weights.items() if n in names}
    save_file({n: t.contiguous() for n, t in weights.items()}, str(tmp / "trainable.safetensors"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    if save_adapter is not None:
        save_adapter(tmp / "adapter", given)
    if stage_state:
        (tmp / STAGE_FILE).write_text(json.dumps(stage_state), encoding="utf-8")
    if depends:
        (tmp / DEPENDS_FILE).write_text(json.dumps(depends, sort_keys=True), encoding="utf-8")
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state)), encoding="utf-8")
    plain_modes(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def load_checkpoint(folder: Path, model: nn.Module, optimizer: Any, scheduler: Any, stage: Any = None,
                    engine: Any = None, sharded: nn.Module | None = None) -> TrainState:
    """Restore weights, optimizer, schedule, RNG and the stage's running state; return the saved position.
    engine: a DeepSpeedEngine; sharded: FSDP's root unit. Each rank reads its own shard of weights and optimizer
    (every rank calls this)."""
    from tuneforge.train.distributed import ENGINE_TAG, FSDP_TAG, load_sharded

    if engine is not None:
        if not (folder / ENGINE_TAG).is_dir():
            raise ConfigError(f"{folder}: not a DeepSpeed checkpoint (no {ENGINE_TAG}/); resume it without "
                              "train.deepspeed, or start a new run")
        engine.load_checkpoint(str(folder), tag=ENGINE_TAG, load_optimizer_states=True,
                               load_lr_scheduler_states=False)
    elif sharded is not None:
        if not (folder / FSDP_TAG).is_dir():
            raise ConfigError(f"{folder}: not an FSDP checkpoint (no {FSDP_TAG}/); resume it without FSDP "
                              "(train.fsdp), or start a new run")
        load_sharded(sharded, optimizer, folder / FSDP_TAG)
    else:
        for tag, name in ((ENGINE_TAG, "DeepSpeed (train.deepspeed); resume it with the same DeepSpeed config"),
                          (FSDP_TAG, "FSDP (train.fsdp); resume it with FSDP")):
            if (folder / tag).is_dir():
                raise ConfigError(f"{folder} was written under {name}")
        load_weights(folder, model)
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(folder / "rng.pt", weights_only=True))
    if stage is not None and (folder / STAGE_FILE).is_file():
        stage.load_state_dict(json.loads((folder / STAGE_FILE).read_text(encoding="utf-8")))
    return TrainState(**json.loads((folder / STATE_FILE).read_text(encoding="utf-8")))


def check_depends(folder: Path, current: dict[str, Any], anyway: bool) -> list[str]:
    """What changed since the checkpoint was written (data, batch layout, processes, ...): refused unless
    `anyway`, then returned for a warning. Checkpoints written before this record existed are not checked."""
    path = folder / DEPENDS_FILE
    if not path.is_file() or not current:
        return []
    saved = json.loads(path.read_text(encoding="utf-8"))
    changed = [f"{DEPENDS_NAMES.get(key, key)}: {saved[key]} -> {current[key]}" if key != "data" else
               DEPENDS_NAMES["data"] for key in sorted(set(saved) & set(current)) if saved[key] != current[key]]
    if changed and not anyway:
        raise ConfigError(f"{folder} was written by a run with other settings ({'; '.join(changed)}); resuming "
                          "would not continue it exactly. Restore those settings, start a new run, or set "
                          "train.resume_anyway=true to continue anyway")
    return changed


def load_weights(folder: Path, model: nn.Module) -> None:
    """Copy a checkpoint's trained weights into the model (nothing else)."""
    weights = load_file(str(folder / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise ConfigError(f"{folder}: checkpoint does not match this model/method (e.g. '{missing[0]}'); "
                          "resume with the config the checkpoint was made with")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)


def rng_state() -> dict[str, Any]:
    """Python and torch RNG states (dropout and any sampling continue identically)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state saved."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = output / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve_resume(value: str | None, output: Path) -> Path | None:
    """'auto' -> newest complete checkpoint in the run folder (or none); a path must be a complete checkpoint."""
    if value is None:
        return None
    if value == "auto":
        found = list_checkpoints(output)
        return found[-1] if found else None
    folder = Path(value)
    if not (folder / STATE_FILE).is_file():
        raise ConfigError(f"train.resume_from_checkpoint: {folder} is not a complete checkpoint "
                          f"(no {STATE_FILE}); use 'auto' to pick the newest valid one")
    return folder


def prune_checkpoints(output: Path, keep: int | None, protect: Path | None = None) -> None:
    """Delete the oldest checkpoints beyond save_total_limit, never `protect` (the best one, when it matters)."""
    if keep is None or keep < 1:
        return
    for old in list_checkpoints(output)[:-keep]:
        if old != protect:
            shutil.rmtree(old, ignore_errors=True)
