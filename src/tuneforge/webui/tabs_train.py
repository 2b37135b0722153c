"""The Train tab: data and preview, hyperparameters, method panels, and the run with live progress."""

from __future__ import annotations

import html
import time
from typing import Any

from tuneforge.io import write_text_atomic
from tuneforge.train.plan import format_seconds
from tuneforge.webui import actions
from tuneforge.webui.form import (
    DS_STAGES,
    GRPO_KEYS,
    PPO_KEYS,
    PREFERENCE_KEYS,
    TOP_KEYS,
    load_args,
    save_args,
    train_command,
)
from tuneforge.webui.runner import JobStatus, TrainJob, curve_keys

TERMINAL = ("finished", "failed", "aborted")
TRAIN_KEYS = ["stage", "dataset_dir", "dataset", "identity_name", "identity_author", "learning_rate", "epochs",
              "max_steps", "cutoff_len", "max_samples", "batch_size", "grad_accum", "scheduler", "warmup_ratio",
              "precision", "max_grad_norm", "val_size", "packing", "logging_steps", "save_steps", "seed",
              "ds_stage", "ds_offload",
              "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "rslora", "dora", "pissa", "freeze_layers",
              "freeze_modules", "quant_type", "double_quant", *PREFERENCE_KEYS, *GRPO_KEYS,
              *PPO_KEYS, "report_to", "output_dir",
              "overwrite", "resume", "extra_args"]


def default_output_dir() -> str:
    """A fresh run folder name per start: runs/train_YYYYmmdd-HHMMSS."""
    return time.strftime("runs/train_%Y%m%d-%H%M%S")


def build(board: Any) -> tuple[Any, list[Any]]:
    """Lay out the tab and wire its buttons; returns the page-load handler (shows a run already in progress)
    and its outputs."""
    import gradio as gr

    with board.block(gr.Tab, "tab_train"):
        parts = _data_section(board)
        _hyperparameters(board)
        _method_panels(board)
        _preference_panel(board)
        _grpo_panel(board)
        _ppo_panel(board)
        parts.update(_run_section(board))
        parts["timer"] = gr.Timer(1.0, active=False)
    return _wire(board, parts)


def _data_section(board: Any) -> dict[str, Any]:
    import gradio as gr

    from tuneforge.stages import STAGES

    with gr.Row():
        # custom values: a loaded config may name a stage that is planned but not built; the run then says so
        board.field("stage", gr.Dropdown, choices=STAGES.names(), value="sft", allow_custom_value=True, scale=1)
        board.field("dataset_dir", gr.Textbox, value="data", scale=1)
        board.field("dataset", gr.Dropdown, choices=actions.dataset_names(board.ws, None), value=[],
                    multiselect=True, allow_custom_value=True, scale=3)
        refresh = board.button("refresh_datasets", scale=1)
    with gr.Row():
        board.field("identity_name", gr.Textbox, value="tuneforge")
        board.field("identity_author", gr.Textbox, value="the tuneforge team")
    with board.block(gr.Accordion, "preview_data", open=False):
        with gr.Row():
            board.field("page", gr.Number, value=1, precision=0, minimum=1, scale=1)
            preview = board.button("preview_data", scale=1)
        summary = gr.Markdown(elem_id="tf-preview-summary")
        with gr.Row():
            board.field("raw_rows", gr.JSON)
            board.field("encoded_rows", gr.HTML)
    return {"refresh_datasets": refresh, "preview_data": preview, "summary": summary}


def _run_section(board: Any) -> dict[str, Any]:
    import gradio as gr

    with gr.Row():
        board.field("report_to", gr.CheckboxGroup, choices=["tensorboard", "wandb", "swanlab", "mlflow"],
                    value=[], scale=2)
        board.field("output_dir", gr.Textbox, value=default_output_dir, scale=2)
        board.field("overwrite", gr.Checkbox, value=False, scale=1)
        board.field("resume", gr.Checkbox, value=False, scale=1)
    board.field("extra_args", gr.Textbox, lines=2, placeholder="train.weight_decay=0.01")
    buttons = {}
    with gr.Row():
        buttons["preview_cmd"] = board.button("preview_cmd")
        board.field("args_file", gr.Textbox, value="my_args.yaml", scale=1)
        for key in ("save_args", "load_args", "plan"):
            buttons[key] = board.button(key)
        buttons["start"] = board.button("start", variant="primary")
        buttons["abort"] = board.button("abort", variant="stop")
    board.field("progress", gr.HTML, value=progress_html(JobStatus("idle"), board))
    status = board.field("status", gr.Textbox, value=board.say("idle"), interactive=False)
    board.live.append((status, lambda: status_line(board.job.status() if board.job else JobStatus("idle"), board)))
    with gr.Row():
        board.field("log", gr.Textbox, lines=14, max_lines=14, interactive=False, autoscroll=True)
        board.field("loss_plot", gr.LinePlot, x="step", y="value", color="series", value=loss_frame([]))
    with gr.Row():
        board.field("command", gr.Code, language="yaml", interactive=False, lines=12, max_lines=24)
        board.field("plan_output", gr.Textbox, lines=12, interactive=False)
    return buttons


def _wire(board: Any, parts: dict[str, Any]) -> tuple[Any, list[Any]]:
    f = board.fields
    keys = [*TOP_KEYS, *TRAIN_KEYS]
    form = board.inputs(keys)
    handlers = TrainHandlers(board, keys)
    parts["refresh_datasets"].click(lambda folder: dataset_choices(board, folder), inputs=f["dataset_dir"], outputs=f["dataset"])
    parts["preview_data"].click(handlers.preview, inputs=[*form, f["page"]],
                                outputs=[f["raw_rows"], f["encoded_rows"], parts["summary"], f["page"]])
    parts["preview_cmd"].click(handlers.command, inputs=form, outputs=f["command"])
    parts["save_args"].click(handlers.save, inputs=[*form, f["args_file"]], outputs=f["status"])
    parts["load_args"].click(handlers.load, inputs=f["args_file"], outputs=[*form, f["status"]])
    parts["plan"].click(handlers.plan, inputs=form, outputs=f["plan_output"])
    views = [f["progress"], f["status"], f["log"], f["loss_plot"], parts["timer"], f["adapters"]]
    parts["start"].click(handlers.start, inputs=form, outputs=[*views, f["command"]])
    parts["abort"].click(handlers.abort, outputs=views)
    parts["timer"].tick(handlers.poll, outputs=views)
    return handlers.poll, views


class TrainHandlers:
    """The Train tab's event handlers over the board (form values arrive positionally, in `keys` order)."""

    def __init__(self, board: Any, keys: list[str]) -> None:
        self.board, self.keys = board, keys

    def preview(self, *args: Any) -> tuple[Any, str, str, int]:
        """One page of raw and encoded rows."""
        values, page = self.board.values(self.keys, args[:-1]), args[-1]
        head = self.board.say("row_head", origin="{origin}", part="{part}", tokens="{tokens}", trained="{trained}")
        parts = {part: self.board.say(f"part_{part}") for part in actions.PART_NAMES}
        try:
            shown = actions.preview_data(values, self.board.ws, page, head, parts)
        except Exception as err:  # shown in the page, never a traceback (Board.error)
            return [], "", self.board.error(err), page
        summary = self.board.say("preview_summary", page=shown.page, pages=shown.pages, **shown.counts)
        return shown.raw, shown.encoded_html, summary, shown.page

    def command(self, *args: Any) -> str:
        """The exact YAML and command Start would run."""
        try:
            return train_command(self.board.values(self.keys, args), self.board.ws).shown()
        except Exception as err:  # shown in the page, never a traceback (Board.error)
            return f"# {self.board.error(err)}"

    def save(self, *args: Any) -> str:
        """Write the form as YAML into the config folder."""
        try:
            path = save_args(self.board.values(self.keys, args[:-1]), self.board.ws, args[-1])
        except Exception as err:  # shown in the page, never a traceback (Board.error)
            return self.board.error(err)
        return self.board.say("saved", path=self.board.ws.relative(path))

    def load(self, file_name: str) -> list[Any]:
        """Fill the form from a YAML in the config folder."""
        import gradio as gr

        try:
            values = load_args(self.board.ws, file_name)
        except Exception as err:  # shown in the page, never a traceback (Board.error)
            return [gr.update() for _ in self.keys] + [self.board.error(err)]
        updates = [gr.update(value=values[k]) if k in values else gr.update() for k in self.keys]
        return updates + [self.board.say("loaded", path=file_name)]

    def plan(self, *args: Any) -> str:
        """The plan (steps, memory, time) from a child `tuneforge train --plan`."""
        if self.board.job is not None and self.board.job.running:
            return self.board.say("busy")  # its two measured steps would compete with the run (and skew both)
        try:
            command = train_command(self.board.values(self.keys, args), self.board.ws)
            write_text_atomic(command.config_path, command.yaml_text)
            return actions.plan(command.argv, self.board.ws.root)
        except Exception as err:  # shown in the page, never a traceback (Board.error)
            return self.board.error(err)

    def start(self, *args: Any) -> list[Any]:
        """Write the YAML, launch the child process, and start polling."""
        import gradio as gr

        from tuneforge.run import prepare_run_dir

        board = self.board
        if board.job is not None and board.job.running:
            return [gr.update(), board.say("busy"), gr.update(), gr.update(), gr.Timer(active=True), gr.update(),
                    gr.update()]
        try:
            values = board.values(self.keys, args)
            command = train_command(values, board.ws)
            cfg = command.config
            actions.check_datasets(cfg, board.ws, actions.training_datasets(cfg))
            run_dir = prepare_run_dir(cfg.output, cfg.train, plan_only=False, main=True)
        except Exception as err:  # shown in the page, never a traceback (Board.error)
            failed = JobStatus("failed", error=str(err))
            return [progress_html(failed, board), board.say("failed", error=str(err)), "", loss_frame([]),
                    gr.Timer(active=False), gr.update(), gr.update()]
        write_text_atomic(command.config_path, command.yaml_text)
        board.job = TrainJob(command.argv, board.ws.root, run_dir, run_dir / "train.log")
        return [*self.views(board.job.status()), command.shown()]

    def abort(self) -> list[Any]:
        """Stop the run (checkpoint first) and show the final state."""
        job = self.board.job
        if job is None:
            return self.views(JobStatus("idle"))
        job.abort()
        return self.views(job.status())

    def poll(self) -> list[Any]:
        """Progress, status, log tail and loss curve of the current job; stops the timer once it ends."""
        return self.views(self.board.job.status() if self.board.job else JobStatus("idle"))

    def views(self, status: JobStatus) -> list[Any]:
        """What the tab shows for a job status: progress, status line, log tail, loss curve, whether to keep
        polling, and (once a run has ended) the adapter list with the new run in it."""
        import gradio as gr

        ended = status.state in TERMINAL
        adapters = gr.update(choices=self.board.ws.adapters()) if ended else gr.update()
        return [progress_html(status, self.board), status_line(status, self.board), status.log_tail,
                loss_frame(status.losses), gr.Timer(active=not ended and status.state != "idle"), adapters]


def dataset_choices(board: Any, dataset_dir: str) -> Any:
    """The dataset dropdown's choices for a folder; a bad folder is a warning and the list stays as it was."""
    import gradio as gr

    try:
        return gr.update(choices=actions.dataset_names(board.ws, dataset_dir))
    except Exception as err:  # shown in the page (Board.error)
        gr.Warning(board.error(err))
        return gr.update()


def status_line(status: JobStatus, board: Any) -> str:
    """One sentence for the status box."""
    if status.state == "running":
        eta = format_seconds(status.eta) if status.eta is not None else "?"
        return board.say("running", step=status.step, total=status.total or "?", loss=f"{status.loss:.4f}", eta=eta)
    if status.state == "finished":
        return board.say("finished", folder=board.ws.relative(board.ws.resolve(status.run_dir)))
    if status.state == "failed":
        return board.say("failed", error=status.error)
    return board.say(status.state if status.state in ("starting", "aborted") else "idle")


def progress_html(status: JobStatus, board: Any) -> str:
    """A progress bar with step count and ETA; data attributes let tests read the state."""
    share = 100 * status.step / status.total if status.total else (100 if status.state == "finished" else 0)
    eta = format_seconds(status.eta) if status.eta is not None and status.state == "running" else ""
    label = f"{status.step} / {status.total or '?'}" + (f" · {board.say('eta', eta=eta)}" if eta else "")
    return (f'<div id="tf-progress-state" data-state="{status.state}" data-step="{status.step}" '
            f'data-total="{status.total}"><div id="tf-progress-bar"><div id="tf-progress-fill" '
            f'style="width:{share:.1f}%"></div></div><span>{html.escape(label)}</span></div>')


def loss_frame(points: list[dict[str, Any]]) -> Any:
    """The curves as the long table gr.LinePlot draws (one line per series): the loss, for preference stages
    the reward accuracy (or the reward model's accuracy) and the reward margins, for grpo the mean reward and
    each reward function's mean."""
    import pandas as pd

    keys = dict.fromkeys(key for p in points for key in curve_keys(p))
    rows = [(p["step"], key, p[key]) for key in keys for p in points if p.get(key) is not None]
    return pd.DataFrame(rows, columns=["step", "series", "value"])


def _hyperparameters(board: Any) -> None:
    import gradio as gr

    with board.block(gr.Accordion, "hyperparams", open=True):
        with gr.Row():
            board.field("learning_rate", gr.Number, value=1e-4)
            board.field("epochs", gr.Number, value=3.0)
            board.field("max_steps", gr.Number, value=-1, precision=0)
            board.field("cutoff_len", gr.Number, value=1024, precision=0)
            board.field("max_samples", gr.Number, value=100000, precision=0)
            board.field("val_size", gr.Number, value=0.0, minimum=0)
        with gr.Row():
            board.field("batch_size", gr.Number, value=1, precision=0, minimum=1)
            board.field("grad_accum", gr.Number, value=8, precision=0, minimum=1)
            board.field("scheduler", gr.Dropdown, value="cosine",
                        choices=["cosine", "linear", "constant", "constant_with_warmup", "polynomial"])
            board.field("warmup_ratio", gr.Slider, minimum=0, maximum=0.5, value=0.0, step=0.01)
            board.field("precision", gr.Dropdown, choices=["auto", "bf16", "fp16", "fp32"], value="auto")
            board.field("max_grad_norm", gr.Number, value=1.0)
        with gr.Row():
            board.field("packing", gr.Dropdown, choices=["auto", "true", "false"], value="auto")
            board.field("logging_steps", gr.Number, value=5, precision=0, minimum=1)
            board.field("save_steps", gr.Number, value=100, precision=0, minimum=0)
            board.field("seed", gr.Number, value=42, precision=0)
            board.field("ds_stage", gr.Dropdown, choices=list(DS_STAGES), value="none")
            board.field("ds_offload", gr.Checkbox, value=False)


def _method_panels(board: Any) -> None:
    import gradio as gr

    with board.block(gr.Accordion, "lora_panel", open=False):
        with gr.Row():
            board.field("lora_rank", gr.Number, value=8, precision=0, minimum=1)
            board.field("lora_alpha", gr.Number, value=0, precision=0, minimum=0)
            board.field("lora_dropout", gr.Number, value=0.0, minimum=0)
            board.field("lora_targets", gr.Textbox, value="all")
            board.field("rslora", gr.Checkbox, value=False)
            board.field("dora", gr.Checkbox, value=False)
            board.field("pissa", gr.Checkbox, value=False)
    with board.block(gr.Accordion, "freeze_panel", open=False):
        with gr.Row():
            board.field("freeze_layers", gr.Number, value=2, precision=0)
            board.field("freeze_modules", gr.Textbox, value="all")
    with board.block(gr.Accordion, "quant_panel", open=False):
        with gr.Row():
            board.field("quant_type", gr.Dropdown, choices=["nf4", "fp4"], value="nf4")
            board.field("double_quant", gr.Checkbox, value=True)


def _preference_panel(board: Any) -> None:
    """dpo and kto settings; the form puts each into the chosen stage's section (see form.PREFERENCE)."""
    from typing import get_args

    import gradio as gr

    from tuneforge.config import RunConfig
    from tuneforge.config.typed import field_type

    losses = list(get_args(field_type(RunConfig, "dpo.loss")))
    with board.block(gr.Accordion, "pref_panel", open=False):
        with gr.Row():
            board.field("pref_beta", gr.Number, value=None, minimum=0)
            board.field("pref_loss", gr.Dropdown, choices=losses, value=losses[0])
            board.field("pref_ftx", gr.Number, value=0.0, minimum=0)
            board.field("label_smoothing", gr.Number, value=0.0, minimum=0, maximum=0.5)
            board.field("simpo_gamma", gr.Number, value=None)
        with gr.Row():
            board.field("ref_model", gr.Textbox, value="", scale=3)
            board.field("precompute_ref", gr.Checkbox, value=False, scale=1)
            board.field("kto_chosen_weight", gr.Number, value=1.0, minimum=0, scale=1)
            board.field("kto_rejected_weight", gr.Number, value=1.0, minimum=0, scale=1)


def _grpo_panel(board: Any) -> None:
    """grpo settings (see form.GRPO): group size, loss, clipping, KL, and the reward functions with weights."""
    from typing import get_args

    import gradio as gr

    from tuneforge.config import RunConfig
    from tuneforge.config.typed import field_type
    from tuneforge.webui.form import grpo_form

    shown = grpo_form()
    losses = list(get_args(field_type(RunConfig, "grpo.loss_type")))
    scales = list(get_args(field_type(RunConfig, "grpo.scale_rewards")))
    with board.block(gr.Accordion, "grpo_panel", open=False):
        with gr.Row():
            board.field("num_generations", gr.Number, value=shown["num_generations"], precision=0, minimum=2)
            board.field("grpo_loss", gr.Dropdown, choices=losses, value=shown["grpo_loss"])
            board.field("grpo_beta", gr.Number, value=shown["grpo_beta"], minimum=0)
            board.field("grpo_epsilon", gr.Number, value=shown["grpo_epsilon"], minimum=0)
            board.field("grpo_epsilon_high", gr.Number, value=shown["grpo_epsilon_high"], minimum=0)
            board.field("scale_rewards", gr.Dropdown, choices=scales, value=shown["scale_rewards"])
        with gr.Row():
            board.field("num_iterations", gr.Number, value=shown["num_iterations"], precision=0, minimum=1)
            board.field("max_completion_length", gr.Number, value=shown["max_completion_length"], precision=0,
                        minimum=1)
            board.field("mask_truncated", gr.Checkbox, value=shown["mask_truncated"])
        with gr.Row():
            board.field("reward_funcs", gr.Textbox, value="", lines=3, scale=3,
                        placeholder="accuracy\nformat\nrewards.py:my_reward")
            board.field("reward_weights", gr.Textbox, value="", scale=1, placeholder="1.0, 0.5")


def _ppo_panel(board: Any) -> None:
    """ppo settings (see form.PPO): the reward model and LLaMA-Factory's ppo_* keys."""
    from typing import get_args

    import gradio as gr

    from tuneforge.config import RunConfig
    from tuneforge.config.typed import field_type
    from tuneforge.webui.form import ppo_form

    shown = ppo_form()
    with board.block(gr.Accordion, "ppo_panel", open=False):
        with gr.Row():
            board.field("reward_model", gr.Textbox, value="", scale=3, placeholder="runs/rm")
            board.field("reward_model_type", gr.Dropdown, value=shown["reward_model_type"],
                        choices=list(get_args(field_type(RunConfig, "reward_model.type"))), scale=1)
        with gr.Row():
            board.field("ppo_buffer_size", gr.Number, value=shown["ppo_buffer_size"], precision=0, minimum=1)
            board.field("ppo_epochs", gr.Number, value=shown["ppo_epochs"], precision=0, minimum=1)
            board.field("ppo_target", gr.Number, value=shown["ppo_target"], minimum=0)
            board.field("ppo_score_norm", gr.Checkbox, value=shown["ppo_score_norm"])
            board.field("ppo_whiten_rewards", gr.Checkbox, value=shown["ppo_whiten_rewards"])
