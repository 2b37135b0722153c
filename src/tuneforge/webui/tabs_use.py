"""The Evaluate & Predict, Chat and Export tabs: each acts on the top bar's model and adapters."""

from __future__ import annotations

from typing import Any

from tuneforge.webui import actions
from tuneforge.webui.chat import generation, respond
from tuneforge.webui.form import STAGE_KEYS, TOP_KEYS

TOP = [*TOP_KEYS, "dataset_dir"]
EVAL_KEYS = ["eval_dataset", "eval_modes", "eval_task", "eval_cutoff_len", "eval_max_samples", "eval_batch",
             "eval_max_new_tokens", "eval_temperature", "eval_top_p", "eval_dir", "compare_base"]
EXPORT_KEYS = ["export_dir", "export_size", "export_dtype", "modelfile", "gguf", "verify", "export_overwrite"]


def build_eval(board: Any) -> None:
    """Dataset, modes, limits and generation settings; the metric table and the written files."""
    import gradio as gr

    with board.block(gr.Tab, "tab_eval"):
        with gr.Row():
            board.field("eval_dataset", gr.Dropdown, choices=actions.dataset_names(board.ws, None), value=[],
                        multiselect=True, allow_custom_value=True, scale=3)
            board.field("eval_modes", gr.CheckboxGroup, choices=["loss", "predict", "choice"], value=["loss"],
                        scale=2)
            board.field("eval_task", gr.Dropdown, choices=["mmlu_demo", "ceval_demo", "cmmlu_demo"],
                        value="mmlu_demo", allow_custom_value=True, scale=1)
        with gr.Row():
            board.field("eval_cutoff_len", gr.Number, "cutoff_len", value=1024, precision=0)
            board.field("eval_max_samples", gr.Number, "max_samples", value=100, precision=0)
            board.field("eval_batch", gr.Number, value=4, precision=0)
            board.field("eval_max_new_tokens", gr.Number, "max_new_tokens", value=128, precision=0)
            board.field("eval_temperature", gr.Slider, "temperature", minimum=0, maximum=1.5, value=0, step=0.05)
            board.field("eval_top_p", gr.Slider, "top_p", minimum=0.05, maximum=1, value=1, step=0.05)
        with gr.Row():
            board.field("eval_dir", gr.Textbox, value="runs/eval", scale=3)
            board.field("compare_base", gr.Checkbox, value=False, scale=1)
            run = board.button("run_eval", variant="primary", scale=1)
        note = gr.Markdown(elem_id="tf-eval-status")
        table = board.field("metrics", gr.Dataframe, interactive=False)
        files = board.field("result_files", gr.File, file_count="multiple", interactive=False)

    keys = TOP + STAGE_KEYS + EVAL_KEYS  # the Train tab's stage: loss mode measures what that stage trains
    shown: dict[str, Any] = {}  # the last results, re-said when the language changes

    def on_run(*args: Any) -> tuple[Any, Any, str]:
        values = board.values(keys, args)
        shown.clear()
        try:
            shown["rows"], written, shown["folder"] = actions.evaluate(values, values, board.ws)
        except Exception as err:  # shown in the page, never a traceback (Board.error)
            return None, None, board.error(err)
        return metric_frame(shown["rows"], board), written, done_note()

    def done_note() -> str:
        return board.say("eval_done", folder=board.ws.relative(shown["folder"])) if shown else ""

    run.click(on_run, inputs=board.inputs(keys), outputs=[table, files, note])
    board.live.append((note, done_note))
    board.live.append((table, lambda: metric_frame(shown.get("rows"), board)))


def metric_frame(rows: list[list[Any]] | None, board: Any) -> Any:
    """The metric table (first row: headers) with its first header in the page's language."""
    import pandas as pd

    if not rows:
        return None
    return pd.DataFrame(rows[1:], columns=[board.t("col_metric"), *rows[0][1:]])


def build_chat(board: Any) -> None:
    """Load/unload, system prompt, decoding settings, streaming chat, and base-vs-tuned compare mode."""
    import gradio as gr

    with board.block(gr.Tab, "tab_chat"):
        with gr.Row():
            load = board.button("load_model", variant="primary")
            unload = board.button("unload_model")
            state = board.field("model_status", gr.Textbox, value=board.say("model_unloaded"), interactive=False,
                                scale=3)
            board.live.append((state, lambda: board.say("model_loaded", model=board.say("model_desc", **board.chat.description))
                               if board.chat.engine is not None else board.say("model_unloaded")))
        with gr.Row():
            system = board.field("system_prompt", gr.Textbox, scale=3)
            temperature = board.field("temperature", gr.Slider, minimum=0, maximum=1.5, value=0, step=0.05)
            top_p = board.field("top_p", gr.Slider, minimum=0.05, maximum=1, value=1, step=0.05)
            max_new = board.field("max_new_tokens", gr.Slider, minimum=8, maximum=2048, value=256, step=8)
            compare = board.field("compare", gr.Checkbox, value=False)
        with gr.Row():
            tuned = board.field("chat_tuned", gr.Chatbot, height=360)
            base = board.field("chat_base", gr.Chatbot, height=360, visible=False)
        with gr.Row():
            box = board.field("message", gr.Textbox, scale=5)
            send = board.button("send", variant="primary", scale=1)
            clear = board.button("clear", scale=1)

    keys = TOP

    def on_load(*args: Any) -> str:
        try:
            description = board.chat.load(board.values(keys, args), board.ws)
        except Exception as err:  # shown in the page, never a traceback (Board.error)
            return board.error(err)
        return board.say("model_loaded", model=board.say("model_desc", **description))

    def on_unload() -> str:
        board.chat.unload()
        return board.say("model_unloaded")

    def on_send(message: str, tuned_history: list, base_history: list, system_prompt: str, temp: float,
                p: float, new_tokens: int, side_by_side: bool) -> Any:
        if board.chat.engine is None:
            yield tuned_history, base_history, message, board.say("load_first")
            return
        if not message.strip():
            yield tuned_history, base_history, message, gr.update()
            return
        gen = generation(system_prompt, temp, p, new_tokens)
        try:
            for tuned_now, base_now in respond(board.chat, message, tuned_history or [], base_history or [], gen,
                                               side_by_side):
                yield tuned_now, base_now, "", gr.update()
        except Exception as err:  # e.g. unloaded meanwhile, or out of memory: one line in the status box
            yield tuned_history, base_history, message, board.error(err)

    load.click(on_load, inputs=board.inputs(keys), outputs=state)
    unload.click(on_unload, outputs=state)
    chat_inputs = [box, tuned, base, system, temperature, top_p, max_new, compare]
    send.click(on_send, inputs=chat_inputs, outputs=[tuned, base, box, state])
    box.submit(on_send, inputs=chat_inputs, outputs=[tuned, base, box, state])
    clear.click(lambda: ([], []), outputs=[tuned, base])
    compare.change(lambda on: gr.update(visible=on), inputs=compare, outputs=base)


def build_export(board: Any) -> None:
    """Folder, shard size, dtype, Modelfile and GGUF toggles, verification; the result table."""
    import gradio as gr

    with board.block(gr.Tab, "tab_export"):
        with gr.Row():
            board.field("export_dir", gr.Textbox, value="exports/latest", scale=3)
            board.field("export_size", gr.Number, value=5.0, minimum=0.01)
            board.field("export_dtype", gr.Dropdown, choices=["auto", "fp32", "bf16", "fp16"], value="auto")
        with gr.Row():
            board.field("modelfile", gr.Checkbox, value=True)
            board.field("gguf", gr.CheckboxGroup, choices=["f16", "bf16", "q8_0"], value=[])
            board.field("verify", gr.Checkbox, value=True)
            board.field("export_overwrite", gr.Checkbox, value=False)
            run = board.button("run_export", variant="primary")
        result = board.field("export_result", gr.Markdown)
        checks = gr.Dataframe(check_frame([], board), interactive=False, elem_id="tf-export-checks")

    keys = TOP + EXPORT_KEYS
    shown: dict[str, Any] = {}  # the last export, re-said when the language changes

    def summary() -> str:
        report = shown.get("report")
        if report is None:
            return ""
        folder = board.ws.relative(report.folder.resolve())
        key = "export_unverified" if not report.checks else "export_passed" if report.passed else "export_failed"
        files = ", ".join(f"`{f}`" for f in report.files)
        return board.say(key, folder=folder) + "\n\n" + board.say("files", files=files)

    def on_run(*args: Any) -> tuple[str, Any]:
        shown.clear()
        try:
            shown["report"], shown["rows"] = actions.export(board.values(keys, args), board.values(keys, args),
                                                            board.ws)
        except Exception as err:  # shown in the page, never a traceback (Board.error)
            return board.error(err), check_frame([], board)
        return summary(), check_frame(shown["rows"], board)

    run.click(on_run, inputs=board.inputs(keys), outputs=[result, checks])
    board.live.append((result, summary))
    board.live.append((checks, lambda: check_frame(shown.get("rows", []), board)))


def check_frame(rows: list[list[Any]], board: Any) -> Any:
    """The verification table with headers and verdicts in the page's language."""
    import pandas as pd

    columns = [board.t(k) for k in ("col_artifact", "col_diff", "col_agreement", "col_tolerance", "col_result")]
    return pd.DataFrame([[*r[:4], board.t("pass" if r[4] else "fail")] for r in rows], columns=columns)
