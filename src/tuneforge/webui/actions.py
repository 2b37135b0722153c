"""What the web UI's buttons do, as plain functions over form values (unit-tested without a browser)."""

from __future__ import annotations

import html
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.config import RunConfig, load_tree
from tuneforge.webui.form import STAGE_KEYS, TOP_KEYS, build_config, config_tree, confine
from tuneforge.webui.workspace import PathRefused, Workspace

PAGE_SIZE = 5
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name
TASK_NAME = re.compile(r"[\w-]+(\.[\w-]+)*")  # a folder name, never a path
PLAN_TIMEOUT_S = 600


@dataclass
class DataPreview:
    """One page of encoded rows and the raw rows they came from, with the number of pages."""

    raw: list[dict[str, Any]]
    encoded_html: str
    page: int
    pages: int
    counts: dict[str, Any]  # raw, encoded, template, truncated, dropped: the summary line's fields


def dataset_names(ws: Workspace, dataset_dir: str | None) -> list[str]:
    """Datasets the catalog knows: built-ins plus the dataset folder's dataset_info.json."""
    from tuneforge.data.catalog import load_catalog

    folder = ws.inside(dataset_dir, ws.data_dir, "dataset folder") if dataset_dir else ws.data_dir
    return sorted(load_catalog(folder))


def preview_data(values: dict[str, Any], ws: Workspace, page: int, head: str = "",
                 parts: dict[str, str] | None = None) -> DataPreview:
    """One page of encoded training rows (trained text marked) beside the raw rows they came from; `head` is the
    format of each row's heading (default: ROW_HEAD) and `parts` names its parts (default: PART_NAMES)."""
    from tuneforge.data.build import build_datasets
    from tuneforge.data.readers import read_rows
    from tuneforge.stages import data_kind

    cfg = build_config(values, ws)
    specs = check_datasets(cfg, ws, training_datasets(cfg))
    raw = [r for name in cfg.data.dataset for r in read_rows(specs[name])]
    template = _template(cfg)
    encoded = build_datasets(cfg.data, data_kind(cfg.stage), template, cfg.train.seed)
    pages = max(1, -(-len(encoded.train) // PAGE_SIZE))
    page = min(max(1, int(page or 1)), pages)
    lo, hi = (page - 1) * PAGE_SIZE, min(page * PAGE_SIZE, len(encoded.train))
    rows = encoded.train.select(range(lo, hi))
    sources = raw_sources(raw, rows) or raw[lo:hi]
    report = encoded.report
    counts = {"raw": len(raw), "encoded": len(encoded.train), "template": template.name,
              "truncated": len(report.truncated), "dropped": len(report.dropped)}
    shown = "".join(encoded_html(row, template.tokenizer, head, parts) for row in rows)
    return DataPreview([{"origin": r.origin, **r.data} for r in sources], shown, page, pages, counts)


def raw_sources(raw: list[Any], rows: Any) -> list[Any]:
    """The raw row each encoded row came from, in order and once each; a kto row split off a preference pair
    is found by the pair's origin (its own adds the side: "file: row 3 (chosen)")."""
    by_origin = {r.origin: r for r in raw}
    found: list[Any] = []
    for row in rows:
        origin = row.get("origin") or ""
        source = by_origin.get(origin) or by_origin.get(origin.rsplit(" (", 1)[0])
        if source is not None and all(source is not f for f in found):
            found.append(source)
    return found


ROW_HEAD = "{origin} [{part}: {tokens} tokens, {trained} trained]"
PART_NAMES = {p: p for p in ("row", "chosen", "rejected", "desirable", "undesirable", "prompt")}


def row_sequences(row: dict[str, Any]) -> list[tuple[str, list[int], list[int]]]:
    """(part, input ids, labels) of an encoded row: a preference pair's chosen and rejected sequences, a kto
    row's one sequence named by its label, a grpo prompt (nothing trained: the completions are generated), or the
    row itself."""
    from tuneforge.data.encode import IGNORE_INDEX

    if "input_ids" not in row:
        return [(side, row[f"{side}_input_ids"], row[f"{side}_labels"]) for side in ("chosen", "rejected")]
    if "labels" not in row:
        return [("prompt", row["input_ids"], [IGNORE_INDEX] * len(row["input_ids"]))]
    part = "row" if "kto_label" not in row else "desirable" if row["kto_label"] else "undesirable"
    return [(part, row["input_ids"], row["labels"])]


def encoded_html(row: dict[str, Any], tokenizer: Any, head_format: str = "",
                 parts: dict[str, str] | None = None) -> str:
    """One encoded row as HTML: trained text in <mark class="trained">, masked context plain; a preference pair
    shows its chosen and its rejected sequence, each with its own heading."""
    from tuneforge.data.encode import IGNORE_INDEX, trained_spans

    names = parts or PART_NAMES
    shown = []
    for part, ids, labels in row_sequences(row):
        trained = sum(1 for t in labels if t != IGNORE_INDEX)
        head = (head_format or ROW_HEAD).format(origin=row.get("origin", ""), tokens=len(ids), trained=trained,
                                                 part=names[part])
        body = "".join(f'<mark class="trained">{html.escape(tokenizer.decode(t))}</mark>' if is_trained
                       else html.escape(tokenizer.decode(t)) for is_trained, t in trained_spans(ids, labels))
        shown.append(f'<div class="tf-row"><div class="tf-row-head">{html.escape(head)}</div>'
                     f'<pre class="tf-row-text">{body}</pre></div>')
    return "".join(shown)


def plan(argv: list[str], cwd: Path) -> str:
    """`tuneforge train CONFIG --plan` in a child process: its plan table; its error message is raised."""
    import os

    from tuneforge.errors import TuneforgeError
    from tuneforge.webui.runner import error_line

    env = dict(os.environ, COLUMNS="140")  # the table is drawn for a terminal this wide
    done = subprocess.run([*argv, "--plan"], cwd=cwd, capture_output=True, text=True, timeout=PLAN_TIMEOUT_S,
                          stdin=subprocess.DEVNULL, env=env)
    output = done.stdout + "\n" + done.stderr
    if done.returncode != 0:
        raise TuneforgeError(error_line(output))
    return plan_table(output)


def plan_table(output: str) -> str:
    """The plan table out of everything the child printed (progress bars and warnings left out)."""
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if "training plan" in line), None)
    if start is None:
        return output.strip()
    end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("└")), len(lines) - 1)
    return "\n".join(lines[start:end + 1])


def _template(cfg: RunConfig) -> Any:
    from tuneforge.models.load import load_tokenizer
    from tuneforge.templates import get_template

    return get_template(cfg.data.template, load_tokenizer(cfg.model), cfg.data.default_system,
                        cfg.data.enable_thinking)


def top_tree(values: dict[str, Any], ws: Workspace) -> dict[str, Any]:
    """The config sections the top bar sets (model, method, adapters, template), the dataset folder, and the
    stage with its preference settings where `values` has them (the Evaluate tab: loss mode is the stage's own)."""
    keep = {k: values.get(k) for k in (*TOP_KEYS, "dataset_dir", *STAGE_KEYS)}
    tree = config_tree(keep, ws)
    tree.pop("finetune", None)  # what was trained is fixed by the adapter; eval and export only read it
    return tree


def evaluate(values: dict[str, Any], ev: dict[str, Any], ws: Workspace) -> tuple[list[list[Any]], list[str], Path]:
    """Run `tuneforge eval` in-process for the top bar's model: metric rows, written files, the results folder."""
    from tuneforge.evaluate.run import evaluate as run_evaluate
    from tuneforge.evaluate.run import metric_rows

    tree = top_tree(values, ws)
    out = ws.inside(ev.get("eval_dir") or "runs/eval", ws.runs_dir, "results folder")
    tree.setdefault("data", {}).update({k: v for k, v in {
        "eval_dataset": list(ev.get("eval_dataset") or []), "cutoff_len": ev.get("eval_cutoff_len"),
        "max_samples": ev.get("eval_max_samples") or None}.items() if v})
    tree["eval"] = {"modes": list(ev.get("eval_modes") or ["loss"]), "dir": str(out),
                    "batch_size": ev.get("eval_batch") or 4, "task": ev.get("eval_task") or "mmlu_demo"}
    tree["generation"] = {"max_new_tokens": ev.get("eval_max_new_tokens") or 128,
                          "temperature": ev.get("eval_temperature") or 0.0, "top_p": ev.get("eval_top_p") or 1.0}
    if not TASK_NAME.fullmatch(tree["eval"]["task"]):
        raise PathRefused(f"benchmark '{tree['eval']['task']}' must be a task name such as mmlu_demo, not a path")
    confine(tree, ws)
    cfg = load_tree(tree, "web UI evaluate tab")
    check_datasets(cfg, ws, cfg.data.eval_dataset or cfg.data.dataset)
    results = run_evaluate(cfg, compare_base=bool(ev.get("compare_base")) and bool(cfg.model.adapter_path))
    names = list(results)
    table = [[metric, *[round(v.get(n, float("nan")), 4) for n in names]] for metric, v in metric_rows(results)]
    written = [out / "results.json", out / "report.md"]
    written += [Path(results[n]["predict"]["file"]) for n in names if "predict" in results[n]]
    return [["metric", *names], *table], [str(p) for p in written], out


def export(values: dict[str, Any], ex: dict[str, Any], ws: Workspace) -> tuple[Any, list[list[Any]]]:
    """Run `tuneforge export` in-process for the top bar's model and adapter: the report and its check rows
    (artifact, max |logit diff|, greedy agreement, tolerance, passed)."""
    from tuneforge.export.merge import export as run_export

    tree = top_tree(values, ws)
    folder = ws.inside(ex.get("export_dir") or "exports/latest", ws.exports_dir, "export folder")
    tree["export"] = {"dir": str(folder), "size": ex.get("export_size") or 5.0,
                      "dtype": ex.get("export_dtype") or "auto", "modelfile": bool(ex.get("modelfile")),
                      "gguf": list(ex.get("gguf") or []), "verify": bool(ex.get("verify")),
                      "overwrite": bool(ex.get("export_overwrite"))}
    confine(tree, ws)
    report = run_export(load_tree(tree, "web UI export tab"))
    rows = [[c.artifact, f"{c.max_abs_diff:.3g}", f"{c.greedy_agreement:.0%}", c.tolerance, c.passed]
            for c in report.checks]
    return report, rows


def check_datasets(cfg: RunConfig, ws: Workspace, names: list[str]) -> dict[str, Any]:
    """Before a run, preview or evaluation: each dataset is registered; a local file exists and lies in the
    dataset folder (or is a built-in one); a hub dataset is named by an id, not a local path. Returns the specs."""
    from tuneforge.data.catalog import BUILTIN_DIR, get_spec, load_catalog
    from tuneforge.errors import DataError
    from tuneforge.webui.workspace import within

    catalog = load_catalog(cfg.data.dataset_dir, cfg.data.inline)
    specs = {name: get_spec(catalog, name, cfg.data.dataset_dir) for name in names}
    for name, spec in specs.items():
        if spec.source != "file":
            if not HUB_ID.fullmatch(spec.location) or ws.resolve(spec.location).exists():
                raise PathRefused(f"dataset '{name}': '{spec.location}' is not a hub id (owner/name); the web UI "
                                  "reads local data only from its dataset folder")
            continue
        location = ws.resolve(spec.location)
        if not within(location, ws.resolve(BUILTIN_DIR)):
            ws.inside(location, ws.data_dir, f"dataset '{name}' file")
        if not location.exists():
            raise DataError(f"dataset '{name}': file not found: {spec.location}. Check file_name in "
                            f"{spec.defined_in or 'dataset_info.json'} or put the file there")
    return specs


def training_datasets(cfg: RunConfig) -> list[str]:
    """The training and validation datasets of a run (at least one training dataset)."""
    from tuneforge.errors import DataError

    if not cfg.data.dataset:
        raise DataError("choose at least one dataset (Train tab: Datasets)")
    return [*cfg.data.dataset, *cfg.data.eval_dataset]
