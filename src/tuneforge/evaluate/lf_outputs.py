"""LLaMA-Factory's result files, for configs that name its output_dir (eval.lf_dir): generated_predictions.jsonl
and the HF Trainer's {split}_results.json / all_results.json, with the same fields and metric names."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tuneforge.chat.engine import ChatEngine
from tuneforge.data.types import Conversation
from tuneforge.io import write_text_atomic

# tuneforge's loss-mode names -> the HF Trainer's eval_ names (LF's compute_accuracy metric is eval_accuracy)
EVAL_NAMES = {"loss": "eval_loss", "perplexity": "eval_perplexity", "token_accuracy": "eval_accuracy"}
PREDICT_SCORES = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


def prediction_lines(engine: ChatEngine, examples: list[Conversation], records: list[dict[str, Any]],
                     system: str | None) -> list[dict[str, str]]:
    """One {prompt, predict, label} per row as LLaMA-Factory writes them: the prompt exactly as generation saw it,
    special tokens kept; the label is the reference answer as the template renders it (end-of-turn text
    included), special tokens skipped, the way LF decodes its label ids."""
    decode = engine.tokenizer.decode
    lines = []
    for example, record in zip(examples, records):
        own = example.system or system  # the system prompt predict mode generated with
        prompt = engine.prompt_ids(example.messages[:-1], own)
        answer = engine.template.encode_pairs(example.messages, own if own is not None else engine.default_system,
                                              example.tools)[-1][1]
        lines.append({"prompt": decode(prompt, skip_special_tokens=False), "predict": record["predict"],
                      "label": decode(answer, skip_special_tokens=True)})
    return lines


def write_predictions(folder: Path, lines: list[dict[str, str]]) -> Path:
    """generated_predictions.jsonl (rewritten whole, as LF does)."""
    path = folder / "generated_predictions.jsonl"
    write_text_atomic(path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    return path


def speed_metrics(split: str, seconds: float, samples: int, batch_size: int) -> dict[str, float]:
    """The HF Trainer's {split}_runtime, _samples_per_second and _steps_per_second (a step is one batch)."""
    steps = math.ceil(samples / batch_size)
    seconds = max(seconds, 1e-9)
    return {f"{split}_runtime": round(seconds, 4), f"{split}_samples_per_second": round(samples / seconds, 3),
            f"{split}_steps_per_second": round(steps / seconds, 3)}


def predict_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """predict_bleu-4, predict_rouge-1/2/l from predict mode's summary."""
    return {f"predict_{k}": summary[k] for k in PREDICT_SCORES}


def eval_metrics(loss: dict[str, Any]) -> dict[str, float]:
    """eval_loss (and eval_perplexity, eval_accuracy, a preference stage's eval_* figures) from loss mode's result."""
    return {EVAL_NAMES.get(k, f"eval_{k}"): v for k, v in loss.items()
            if k != "rows" and isinstance(v, (int, float))}


def save_metrics(folder: Path, split: str, metrics: dict[str, float]) -> None:
    """{split}_results.json, and the same keys merged into all_results.json, as the HF Trainer's save_metrics."""
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / f"{split}_results.json", json.dumps(metrics, indent=4, sort_keys=True))
    combined_path = folder / "all_results.json"
    combined = json.loads(combined_path.read_text(encoding="utf-8")) if combined_path.is_file() else {}
    combined.update(metrics)
    write_text_atomic(combined_path, json.dumps(combined, indent=4, sort_keys=True))
