"""`tuneforge webui`: the board. Builds the gradio page (top bar and four tabs) over a Workspace."""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.webui.chat import ChatSession
from tuneforge.webui.i18n import LANGUAGES, message, text
from tuneforge.webui.runner import TrainJob
from tuneforge.webui.workspace import Workspace

log = logging.getLogger(__name__)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page must not call out to the internet

CSS = """
mark.trained { background: #c8f7c5; color: #0b5d1e; }
.tf-row { margin-bottom: 0.8em; } .tf-row-head { font-weight: 600; color: #1e5aa8; }
.tf-row-text { white-space: pre-wrap; margin: 0.2em 0; }
#tf-progress-bar { width: 100%; height: 14px; background: #e5e7eb; border-radius: 7px; overflow: hidden; }
#tf-progress-fill { height: 100%; background: #f97316; transition: width 0.5s; }
"""
LANGUAGE_NAMES = {"en": "English", "zh": "中文"}


class Board:
    """The page's components by key, the strings they show, and the state behind them (one job, one chat)."""

    def __init__(self, ws: Workspace, lang: str = "en") -> None:
        self.ws, self.lang = ws, lang
        self.fields: dict[str, Any] = {}
        self.buttons: dict[str, Any] = {}
        self.translated: list[tuple[Any, str, str]] = []  # (component, string key, attribute it shows)
        self.live: list[tuple[Any, Callable[[], str]]] = []  # run-time messages, re-said in a new language
        self.job: TrainJob | None = None
        self.chat = ChatSession()

    def t(self, key: str) -> str:
        """The string in the page's current language."""
        return text(key, self.lang)

    def field(self, key: str, factory: Callable[..., Any], label: str | None = None, **kwargs: Any) -> Any:
        """An input or output component with a translated label, reachable as fields[key] and #tf-key."""
        component = factory(label=self.t(label or key), elem_id=f"tf-{key}", **kwargs)
        self.translated.append((component, label or key, "label"))
        self.fields[key] = component
        return component

    def button(self, key: str, **kwargs: Any) -> Any:
        """A button whose caption is translated."""
        import gradio as gr

        component = gr.Button(self.t(key), elem_id=f"tf-{key}", **kwargs)
        self.translated.append((component, key, "value"))
        self.buttons[key] = component
        return component

    def block(self, factory: Callable[..., Any], key: str, **kwargs: Any) -> Any:
        """A tab or accordion with a translated title."""
        component = factory(label=self.t(key), elem_id=f"tf-{key}-panel", **kwargs)
        self.translated.append((component, key, "label"))
        return component

    def values(self, keys: list[str], args: tuple[Any, ...]) -> dict[str, Any]:
        """The handler's positional arguments by UI key."""
        return dict(zip(keys, args))

    def inputs(self, keys: list[str]) -> list[Any]:
        """Components for the keys, in order."""
        return [self.fields[k] for k in keys]

    def relabel(self, lang: str) -> list[Any]:
        """Updates that show every translated string, and the current status messages, in `lang`."""
        import gradio as gr

        self.lang = lang
        return [gr.update(**{attr: text(key, lang)}) for _, key, attr in self.translated] + \
            [gr.update(value=say()) for _, say in self.live]

    def say(self, key: str, **fields: Any) -> str:
        """A run-time message in the current language."""
        return message(key, self.lang, **fields)

    def error(self, err: Exception) -> str:
        """Any failure as one line in the current language; a non-user error (a bug or an environment problem, not
        a setting to fix) also has its traceback appended to the board's log file (and the server's console)."""
        if not isinstance(err, TuneforgeError):
            log.error("web UI handler failed", exc_info=err)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            trace = "".join(traceback.format_exception(err))
            with self.ws.log_file.open("a", encoding="utf-8") as handle:
                handle.write(f"[{stamp}] web UI handler failed\n{trace}\n")
            err = TuneforgeError(f"unexpected {type(err).__name__}: {err} (traceback in {self.ws.log_file.name})")
        return message("error", self.lang, error=str(err))


def create_app(ws: Workspace, lang: str = "en") -> tuple[Any, Board]:
    """Build the page; returns the gradio Blocks and the Board behind it (tests call the Board's handlers)."""
    import gradio as gr

    from tuneforge.webui import tabs_train, tabs_use

    board = Board(ws, lang)
    with gr.Blocks(title="tuneforge board") as demo:
        with gr.Row(equal_height=True):
            title = gr.Markdown(board.t("title"), elem_id="tf-title")
            lang_box = gr.Dropdown(choices=[(LANGUAGE_NAMES[c], c) for c in LANGUAGES], value=lang,
                                   label=board.t("lang"), elem_id="tf-lang", scale=0, min_width=160)
        board.translated.append((title, "title", "value"))
        board.translated.append((lang_box, "lang", "label"))
        top_bar(board)
        on_load, views = tabs_train.build(board)
        tabs_use.build_eval(board)
        tabs_use.build_chat(board)
        tabs_use.build_export(board)
        # the dataset folder's list feeds the Evaluate tab too
        board.buttons["refresh_datasets"].click(lambda folder: tabs_train.dataset_choices(board, folder),
                                                inputs=board.fields["dataset_dir"],
                                                outputs=board.fields["eval_dataset"])
        translated = [c for c, _, _ in board.translated] + [c for c, _ in board.live]
        lang_box.change(board.relabel, inputs=lang_box, outputs=translated)
        demo.load(on_load, outputs=views)
        # The page is built in the starting language; a reload shows the language chosen since.
        demo.load(lambda: [board.lang, *board.relabel(board.lang)], outputs=[lang_box, *translated])
    return demo, board


def top_bar(board: Board) -> None:
    """Language, model, hub, method, adapters (with refresh), template."""
    import gradio as gr

    from tuneforge.models.embedded import ALIAS
    from tuneforge.templates import template_names
    from tuneforge.webui.form import METHODS

    ws = board.ws
    with gr.Row():
        board.field("model", gr.Dropdown, choices=[ALIAS, *ws.local_models()], value=ALIAS,
                    allow_custom_value=True, scale=3)
        board.field("hub", gr.Dropdown, choices=["auto", "huggingface", "modelscope"], value="auto", scale=1)
        board.field("method", gr.Dropdown, choices=list(METHODS), value="lora", scale=1)
        board.field("template", gr.Dropdown, choices=template_names(), value="auto", allow_custom_value=True,
                    scale=1)
    with gr.Row():
        adapters = board.field("adapters", gr.Dropdown, choices=ws.adapters(), value=[], multiselect=True,
                               allow_custom_value=True, scale=4)
        refresh = board.button("refresh_adapters", scale=1)
    refresh.click(lambda: gr.update(choices=ws.adapters()), outputs=adapters)


def serve(root: Path, host: str, port: int, share: bool, lang: str, auth: tuple[str, str] | None = None) -> None:
    """Build the board over `root` and serve it until interrupted."""
    ws = Workspace.at(root)
    demo, board = create_app(ws, lang)
    if (share or host not in ("127.0.0.1", "localhost", "::1")) and auth is None:
        print(f"warning: the board is reachable beyond this machine ({'share link' if share else host}) without "
              "a login; anyone who reaches it can train and read your working folder. Add --auth USER:PASSWORD.")
    print(f"tuneforge board on http://{host}:{port} (working folder {ws.root})")
    try:
        launch(demo, ws, host, port, share, block=True, auth=auth)
    finally:
        if board.job is not None and board.job.running:
            print("stopping the training run (a checkpoint is saved) ...")
            board.job.abort()


def launch(demo: Any, ws: Workspace, host: str, port: int, share: bool = False, block: bool = False,
           auth: tuple[str, str] | None = None) -> Any:
    """Start serving; with block=False it returns at once (tests drive the page from a browser)."""
    # Only the runs folder is served as files (the Evaluate tab links its predictions and report there).
    try:
        return demo.queue().launch(server_name=host, server_port=port, share=share, css=CSS, quiet=not block,
                                   allowed_paths=[str(ws.runs_dir)], footer_links=[], show_error=True,
                                   prevent_thread_lock=not block, auth=auth)
    except OSError as err:
        raise ConfigError(f"cannot serve on {host}:{port} ({err}); choose another --port or --host") from None
