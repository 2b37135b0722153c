"""`tuneforge eval`: loss, predict and choice modes on one engine; with --compare-base, the base model too.

Preference-trained weights (stages rm, dpo, kto; see evaluate.pairs) are evaluated as their stage: the stage's own
loss and metrics, plus log-prob preference accuracy on pairs for every model; a reward model's predict mode scores
both answers of each pair."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from tuneforge.chat.engine import ChatEngine, load_engine
from tuneforge.config.rules import PREFERENCE_STAGES, check_vllm_modes
from tuneforge.config.schema import DataConfig, RunConfig
from tuneforge.data.build import build_datasets
from tuneforge.data.pipeline import load_examples, mix, split_validation
from tuneforge.data.tokenized import has_tokenized
from tuneforge.data.types import Conversation, KTOExample, PreferencePair
from tuneforge.errors import DataError
from tuneforge.evaluate import choice as mc
from tuneforge.evaluate import lf_outputs, pairs
from tuneforge.evaluate.metrics import repeats_itself, score
from tuneforge.io import write_text_atomic

CHOICE_DROP_FLAG = 5.0  # accuracy points
COUNT_KEYS = ("rows", "questions", "pairs")  # sizes, not metrics: left out of the report's table


class LocalRuntime:
    """What the training loop's evaluate() needs from accelerate, for one process in fp32 on the CPU
    (accelerate keeps process-wide state, which an evaluation after training must not disturb)."""

    process_index, num_processes, device = 0, 1, "cpu"

    def autocast(self) -> Any:
        from contextlib import nullcontext

        return nullcontext()


def evaluate(cfg: RunConfig, compare_base: bool = False, trained: bool = False) -> dict[str, Any]:
    """Run every configured mode for the tuned model (and the base); write results.json and report.md, and
    LLaMA-Factory's result files into eval.lf_dir when set. trained: the weights were trained just now."""
    began = time.perf_counter()
    if cfg.model.infer_backend == "vllm":
        check_vllm_modes(cfg.eval.modes)
    engine = load_engine(cfg.model, cfg.data.template, cfg.data.default_system, cfg.data.enable_thinking)
    seconds = {"model_preparation": time.perf_counter() - began}
    cfg, inferred = pairs.resolve_stage(cfg, engine)
    out = Path(cfg.eval.dir)
    out.mkdir(parents=True, exist_ok=True)
    models = {"tuned": True, "base": False} if compare_base and engine.has_adapter else \
        {"model": True}
    results: dict[str, Any] = {name: {} for name in models}
    for name, adapter in models.items():
        for mode in cfg.eval.modes:
            suffix = "" if name in ("tuned", "model") else f"_{name}"
            began = time.perf_counter()
            if mode == "loss":
                with stage_explained(inferred, cfg.stage):
                    results[name]["loss"] = loss_mode(engine, adapter, cfg)
            elif mode == "predict" and cfg.stage == "rm":
                with stage_explained(inferred, cfg.stage):
                    rows = pairs.pair_rows(eval_data(cfg), engine, cfg.train.seed)
                scored = pairs.reward_predictions(engine, adapter, rows, cfg.eval.batch_size,
                                                  out / f"predictions{suffix}.jsonl")
                if scored is not None:  # the base of a LoRA reward model has no value head to score with
                    results[name]["predict"] = scored
            elif mode == "predict":
                results[name]["predict"] = predict_mode(engine, adapter, cfg, out / f"predictions{suffix}.jsonl")
            else:
                results[name]["choice"] = choice_mode(engine, adapter, cfg)
            seconds.setdefault(mode, time.perf_counter() - began)  # the tuned model's (it runs first)
    if cfg.eval.lf_dir:
        write_lf_results(cfg, engine, results[next(iter(models))], seconds, trained)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(out / "report.md", report_markdown(results, out, cfg.eval.samples))
    return results


@contextmanager
def stage_explained(inferred: bool, stage: str) -> Iterator[None]:
    """Explain a data error when the stage came from the weights' run info rather than the config."""
    try:
        yield
    except DataError as err:
        if not inferred:
            raise
        raise DataError(f"{err}. Stage {stage} was taken from the weights' tuneforge_run.json; set stage=sft to "
                        "evaluate them on conversations instead") from None


def write_lf_results(cfg: RunConfig, engine: ChatEngine, results: dict[str, Any], seconds: dict[str, float],
                     trained: bool) -> None:
    """LLaMA-Factory's files in eval.lf_dir: eval_results.json (loss mode), generated_predictions.jsonl and
    predict_results.json (predict mode), all_results.json; model_preparation_time only without training, as HF."""
    folder = Path(cfg.eval.lf_dir)
    folder.mkdir(parents=True, exist_ok=True)
    prep = {} if trained else {"model_preparation_time": round(seconds["model_preparation"], 4)}
    if "loss" in results:
        rows = results["loss"]["rows"]
        metrics = {**lf_outputs.eval_metrics(results["loss"]),
                   **lf_outputs.speed_metrics("eval", seconds["loss"], rows, cfg.eval.batch_size)}
        lf_outputs.save_metrics(folder, "eval", {**metrics, **{f"eval_{k}": v for k, v in prep.items()}})
    predict = results.get("predict", {})
    if "bleu-4" in predict:  # conversations answered (a reward model's pair scores have no LF counterpart here)
        records = read_predictions(Path(predict["file"]))
        lines = lf_outputs.prediction_lines(engine, prediction_examples(cfg), records, cfg.generation.system)
        lf_outputs.write_predictions(folder, lines)
        metrics = {**lf_outputs.predict_metrics(predict),
                   **lf_outputs.speed_metrics("predict", seconds["predict"], len(records), cfg.eval.batch_size)}
        lf_outputs.save_metrics(folder, "predict", {**metrics, **{f"predict_{k}": v for k, v in prep.items()}})


def uses_validation_split(cfg: RunConfig) -> bool:
    """No eval_dataset but a val_size: evaluate on the validation split training makes (LLaMA-Factory's rule)."""
    return not cfg.data.eval_dataset and cfg.data.val_size > 0


def uses_saved_rows(cfg: RunConfig) -> bool:
    """No eval_dataset but data.tokenized_path holds rows: the loss is measured on them (on their validation split
    when they were saved with one), as LLaMA-Factory evaluates a tokenized_path."""
    return bool(cfg.data.tokenized_path) and not cfg.data.eval_dataset and has_tokenized(cfg.data.tokenized_path)


def eval_dataset_names(cfg: RunConfig) -> list[str]:
    """eval_dataset when given, else the training datasets."""
    names = cfg.data.eval_dataset or cfg.data.dataset
    if not names:
        raise DataError("nothing to evaluate: set data.eval_dataset (or data.dataset)")
    return names


def eval_data(cfg: RunConfig) -> DataConfig:
    """The data section evaluation encodes: the evaluation datasets as one unsplit, unpacked set (or, with only
    val_size, the training datasets split as training splits them; the caller takes the validation part)."""
    if uses_saved_rows(cfg):
        return replace(cfg.data, packing=False, neat_packing=False)
    if uses_validation_split(cfg):
        return replace(cfg.data, packing=False, neat_packing=False, tokenized_path=None)
    return replace(cfg.data, dataset=eval_dataset_names(cfg), eval_dataset=[], val_size=0.0, packing=False,
                   neat_packing=False, tokenized_path=None)


def loss_mode(engine: ChatEngine, adapter: bool, cfg: RunConfig) -> dict[str, float]:
    """The stage's eval loss and metrics (perplexity and token accuracy for sft/pt), computed exactly as training's
    evaluation computes them; for preference stages also preference_accuracy and logp_margin on the pairs."""
    from tuneforge.run import forward_tokens, training_rows
    from tuneforge.stages import build_stage
    from tuneforge.train.loop import LossModule
    from tuneforge.train.loop import evaluate as eval_rows

    data_cfg = eval_data(cfg)
    stage = build_stage(cfg, engine.tokenizer.pad_token_id)
    data = build_datasets(data_cfg, stage.data_kind, engine.template, cfg.train.seed)
    rows, val_rows = training_rows(data, replace(cfg, data=data_cfg), stage)
    if uses_validation_split(cfg) or (uses_saved_rows(cfg) and val_rows):
        rows = val_rows
    results: dict[str, float] = {}
    model = pairs.stage_model(stage, engine, adapter, cfg)
    if model is not None:
        with engine.adapter_context(adapter):
            metrics = eval_rows(LossModule(model, stage), stage, rows, cfg.eval.batch_size, LocalRuntime(),
                                forward_tokens(cfg.train))
        engine.model.eval()  # evaluate() leaves the module in training mode
        names = {"eval_perplexity": "perplexity", "eval_accuracy": "token_accuracy" if stage.reports_perplexity
                 else "accuracy"}
        results = {names.get(k, k.removeprefix("eval_")): v for k, v in metrics.items()}
    if cfg.stage in PREFERENCE_STAGES and (stage.data_kind == "pairwise" or pairs.pairwise_data(data_cfg)):
        pair_data = rows if stage.data_kind == "pairwise" else pairs.pair_rows(data_cfg, engine, cfg.train.seed)
        results.update(pairs.pair_figures(engine, adapter, pair_data, cfg.eval.batch_size))
    return {**results, "rows": len(rows)}


def prediction_examples(cfg: RunConfig) -> list[Conversation]:
    """Conversations to answer, the last answer being the reference: sft rows as they are; for dpo/kto data the
    prompt with its chosen (desirable) answer, so a preference-tuned model is scored against what it should say."""
    from tuneforge.stages import data_kind

    kind = data_kind(cfg.stage) if cfg.stage in ("dpo", "kto") else "sft"
    seed = cfg.train.seed
    if uses_validation_split(cfg):  # the validation rows exactly as training splits them off
        groups = [load_examples(cfg.data, name, kind, seed).examples for name in cfg.data.dataset]
        examples = split_validation(mix(groups, cfg.data.mix_strategy, cfg.data.interleave_probs, seed),
                                    cfg.data.val_size, seed)[1]
    else:
        examples = [e for name in eval_dataset_names(cfg) for e in load_examples(cfg.data, name, kind, seed).examples]
    out = []
    for e in examples:
        if isinstance(e, PreferencePair):
            out.append(Conversation(e.prompt + [e.chosen], e.system, e.tools, e.origin))
        elif isinstance(e, KTOExample):
            out += [Conversation(e.messages, e.system, e.tools, e.origin)] if e.label else []
        elif isinstance(e, Conversation):
            out.append(e)
        else:
            raise DataError(f"{e.origin}: predict mode needs conversation rows (sft, dpo or kto datasets)")
    return out


def predict_mode(engine: ChatEngine, adapter: bool, cfg: RunConfig, path: Path) -> dict[str, Any]:
    """Generate for every row, appending to predictions.jsonl as it goes (a rerun of the same model, adapters,
    data and settings continues; any other run starts the file over), then score."""
    examples = prediction_examples(cfg)
    key = path.with_name(path.name + ".key")
    fingerprint = prediction_fingerprint(cfg, adapter)
    if not key.is_file() or key.read_text(encoding="utf-8") != fingerprint:
        path.unlink(missing_ok=True)
        write_text_atomic(key, fingerprint)
    done = read_predictions(path)
    todo = examples[len(done):]
    batch = cfg.eval.batch_size
    with path.open("a", encoding="utf-8") as handle, \
            tqdm(total=len(examples), initial=len(done), desc=f"predict ({path.name})", unit="row") as bar:
        for start in range(0, len(todo), batch):
            part = todo[start:start + batch]
            gen = cfg.generation
            outputs = []
            for system in {e.system for e in part}:  # one system prompt per generate call
                group = [e for e in part if e.system == system]
                answers = engine.generate_batch([e.messages[:-1] for e in group],
                                                replace(gen, system=system or gen.system), adapter)
                outputs += list(zip(group, answers))
            for example, answer in sorted(outputs, key=lambda pair: part.index(pair[0])):
                record = {"origin": example.origin, "prompt": example.messages[-2].content,
                          "label": example.messages[-1].content, "predict": answer.text,
                          "finish_reason": answer.finish_reason}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                handle.flush()
                bar.update(1)
    return summarize_predictions(read_predictions(path), path)


def prediction_fingerprint(cfg: RunConfig, adapter: bool) -> str:
    """What a predictions file depends on: model, adapters (and their weights' size and time), data, template,
    generation settings."""
    weights = []
    for folder in cfg.model.adapter_path if adapter else []:
        for file in sorted(Path(folder).glob("*.safetensors")):
            weights.append([str(file), file.stat().st_size, file.stat().st_mtime_ns])
    data = cfg.data
    return json.dumps({"model": cfg.model.path, "adapters": weights, "stage": cfg.stage,
                       "data": [data.eval_dataset or data.dataset, data.val_size, data.max_samples, data.template,
                                data.default_system, data.cutoff_len, data.dataset_dir, cfg.train.seed],
                       "generation": repr(cfg.generation)}, sort_keys=True)


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """Complete lines of a predictions file (a half-written last line of a crash is dropped and rewritten)."""
    if not path.exists():
        return []
    records, good = [], 0
    text = path.read_text(encoding="utf-8")
    for line in text.split("\n"):
        try:
            records.append(json.loads(line))
            good += len(line) + 1
        except json.JSONDecodeError:
            break
    if good < len(text):
        path.write_text(text[:good], encoding="utf-8")
    return records


def summarize_predictions(records: list[dict[str, Any]], path: Path) -> dict[str, Any]:
    """Mean BLEU-4 / ROUGE over rows, plus how often answers never stopped or looped."""
    scores = [score(r["predict"], r["label"]) for r in records]
    summary: dict[str, Any] = {k: round(statistics.fmean(s[k] for s in scores), 4) if scores else 0.0
                               for k in ("bleu-4", "rouge-1", "rouge-2", "rouge-l")}
    summary["rows"] = len(records)
    summary["never_stopped"] = sum(r.get("finish_reason") == "length" for r in records)
    summary["repetition_loops"] = sum(repeats_itself(r["predict"]) for r in records)
    summary["file"] = str(path)
    return summary


def choice_mode(engine: ChatEngine, adapter: bool, cfg: RunConfig) -> dict[str, Any]:
    """Accuracy per subject and overall; the option whose letter is most likely next is the model's answer."""
    questions, shots = mc.load_task(mc.task_folder(cfg.eval.task, cfg.eval.task_dir))
    letters = mc.letter_ids(engine.tokenizer)
    per_subject: dict[str, list[bool]] = {}
    with engine.adapter_context(adapter):
        for q in tqdm(questions, desc=f"choice ({cfg.eval.task})", unit="question"):
            turns, system = mc.build_prompt(q, shots.get(q.subject, []), cfg.eval.n_shot, cfg.eval.lang)
            logps = mc.score_question(engine.model, engine.prompt_ids(turns, system), letters)
            per_subject.setdefault(q.subject, []).append(mc.LETTERS[logps.index(max(logps))] == q.answer)
    total = [hit for hits in per_subject.values() for hit in hits]
    return {"task": cfg.eval.task, "accuracy": round(100 * sum(total) / len(total), 2), "questions": len(total),
            "subjects": {s: round(100 * sum(h) / len(h), 2) for s, h in sorted(per_subject.items())}}


def report_markdown(results: dict[str, Any], out: Path, samples: int) -> str:
    """Metric table (with deltas when the base was evaluated), sample predictions side by side, and flags."""
    names = list(results)
    lines = ["# Evaluation report", ""]
    rows = metric_rows(results)
    header = "| metric | " + " | ".join(names) + (" | delta |" if len(names) == 2 else " |")
    lines += [header, "|" + "---|" * (len(names) + 1 + (len(names) == 2))]
    for metric, values in rows:
        cells = [f"{values[n]:.4g}" if n in values else "-" for n in names]
        both = len(names) == 2 and all(n in values for n in names)
        delta = (f" | {values[names[0]] - values[names[1]]:+.4g}" if both else " | -") if len(names) == 2 else ""
        lines.append(f"| {metric} | " + " | ".join(cells) + delta + " |")
    lines += ["", "## Flags", ""] + (flags(results) or ["none"])
    if "predict" in results[names[0]]:
        lines += ["", "## Sample predictions", ""] + sample_lines(results, samples)
    return "\n".join(lines) + "\n"


def sample_lines(results: dict[str, Any], samples: int) -> list[str]:
    """The first predictions of each model side by side: answers, or a reward model's pair scores."""
    files = {n: read_predictions(Path(m["predict"]["file"])) for n, m in results.items() if "predict" in m}
    names = list(files)
    lines: list[str] = []
    for i in range(min(samples, len(files[names[0]]))):
        first = files[names[0]][i]
        if "predict" in first:
            lines += [f"**{first['prompt']}** (reference: {first['label']})", ""]
            lines += [f"- {n}: {files[n][i]['predict']}" for n in names if i < len(files[n])]
        else:  # reward-model scores of a pair
            lines += [f"**{first['origin']}**", ""]
            lines += [f"- {n}: chosen {files[n][i]['chosen']}, rejected {files[n][i]['rejected']}"
                      for n in names if i < len(files[n])]
        lines.append("")
    return lines


def metric_rows(results: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """(metric name, value per evaluated model that has it) for every numeric result, choice subjects included;
    a metric only one model has (e.g. the reward accuracy of a model with a value head) still gets its row."""
    rows: dict[str, dict[str, float]] = {}
    for name, modes in results.items():
        for mode, metrics in modes.items():
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key not in COUNT_KEYS:
                    rows.setdefault(f"{mode} {key}", {})[name] = value
            if mode == "choice":
                for subject, value in metrics["subjects"].items():
                    rows.setdefault(f"choice {subject}", {})[name] = value
    return list(rows.items())


def flags(results: dict[str, Any]) -> list[str]:
    """Plain warnings: choice accuracy dropping more than 5 points, answers that never stop, repetition loops."""
    out = []
    if "tuned" in results and "base" in results and "choice" in results["tuned"]:
        drop = results["base"]["choice"]["accuracy"] - results["tuned"]["choice"]["accuracy"]
        if drop > CHOICE_DROP_FLAG:
            out.append(f"- REGRESSION: choice accuracy fell {drop:.1f} points after tuning (forgetting?)")
    for name, modes in results.items():
        predict = modes.get("predict", {})
        if predict.get("never_stopped"):
            out.append(f"- {name}: {predict['never_stopped']} of {predict['rows']} answers never stopped "
                       "(hit max_new_tokens)")
        if predict.get("repetition_loops"):
            out.append(f"- {name}: {predict['repetition_loops']} answers repeat themselves in a loop")
    return out
