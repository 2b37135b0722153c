"""The board driven in headless Chromium (Debian's chromium through playwright): language switch, data
preview, a short training with live progress, adapters, chat, evaluation and export, with a screenshot per tab."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tuneforge.train.distributed import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                reason="Debian's chromium is not installed (scripts/test.sh installs it)")


@pytest.fixture
def board_url(workspace):
    """The board served in-process on a free loopback port."""
    from tuneforge.webui.app import create_app, launch

    demo, board = create_app(workspace)
    port = free_port()
    launch(demo, workspace, "127.0.0.1", port)
    yield f"http://127.0.0.1:{port}"
    if board.job is not None:  # never leave a training child behind a failed test
        board.job.abort()
    demo.close()


@pytest.fixture
def page(board_url):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "chromium is missing: apt-get install chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                                                    "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.set_default_timeout(60_000)
        page.goto(board_url)
        page.wait_for_selector("#tf-start")
        yield page
        browser.close()


@pytest.fixture
def shots(tmp_path) -> Path:
    folder = Path(os.environ.get("TUNEFORGE_SCREENSHOTS", tmp_path / "screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def choose(page, key: str, *labels: str) -> None:
    """Pick options of a gradio dropdown by their shown labels."""
    for label in labels:
        page.click(f"#tf-{key} input")
        page.click(f"#tf-{key} li[role=option][aria-label='{label}']")
    page.keyboard.press("Escape")


def fill(page, key: str, value: str) -> None:
    """Type into a textbox or number field and commit it."""
    box = page.locator(f"#tf-{key} input, #tf-{key} textarea").first
    box.fill(value)
    box.press("Tab")


def text_of(page, key: str) -> str:
    box = page.locator(f"#tf-{key} input, #tf-{key} textarea").first
    return box.input_value()


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def test_board_end_to_end(page, workspace, shots):
    # language: switch to Chinese and back, every label follows
    choose(page, "lang", "中文")
    page.wait_for_selector("#tf-title:has-text('看板')")
    assert page.get_by_role("tab", name="训练").is_visible()
    assert "学习率" in page.inner_text("#tf-learning_rate")
    assert text_of(page, "status") == "就绪。"
    page.screenshot(path=str(shots / "train_zh.png"))
    choose(page, "lang", "English")
    page.wait_for_selector("#tf-title:has-text('board')")
    assert "Learning rate" in page.inner_text("#tf-learning_rate")

    # model, template, dataset, preview
    choose(page, "model", "models/tiny")
    choose(page, "template", "chatml")
    choose(page, "dataset", "identity")
    page.click("#tf-preview_data-panel")
    page.click("#tf-preview_data")
    page.wait_for_selector("#tf-encoded_rows mark.trained")
    assert "64 raw rows" in page.inner_text("#tf-preview-summary")  # the built-in identity set
    assert page.locator("#tf-encoded_rows .tf-row").count() == 5  # one page

    # a short run: the progress bar and the loss plot update while it runs, then it finishes
    # ~12 s of training on the tiny model here: long enough for several 1-second polls to see it run
    for key, value in {"max_steps": "400", "logging_steps": "1", "cutoff_len": "64", "max_samples": "8",
                       "grad_accum": "2", "learning_rate": "0.05", "output_dir": "runs/browser"}.items():
        fill(page, key, value)
    choose(page, "precision", "fp32")
    empty_plot = page.locator("#tf-loss_plot").screenshot()
    page.evaluate("""() => {
        window.seenSteps = [];
        new MutationObserver(() => {
            const state = document.querySelector('#tf-progress-state');
            if (state) window.seenSteps.push([state.dataset.state, Number(state.dataset.step)]);
        }).observe(document.querySelector('#tf-progress'), {subtree: true, childList: true, attributes: true});
    }""")
    page.click("#tf-start")
    page.wait_for_selector("#tf-progress-state[data-state='running']", timeout=120_000)
    page.screenshot(path=str(shots / "train_running.png"), full_page=True)
    page.wait_for_selector("#tf-progress-state[data-state='finished']", timeout=300_000)
    assert page.get_attribute("#tf-progress-state", "data-step") == "400"
    assert page.get_attribute("#tf-progress-fill", "style") == "width:100.0%"
    seen = page.evaluate("window.seenSteps")
    running = sorted({step for state, step in seen if state == "running" and 0 < step < 400})
    assert len(running) >= 2, seen  # it moved while running, not only at the end
    assert "runs/browser" in text_of(page, "status")
    page.wait_for_timeout(1000)
    assert page.locator("#tf-loss_plot").screenshot() != empty_plot  # the curve was drawn
    assert (workspace.runs_dir / "browser" / "adapter" / "adapter_config.json").is_file()
    page.screenshot(path=str(shots / "train_finished.png"), full_page=True)

    # a bad setting shows its error in the tab within seconds
    choose(page, "dataset", "broken")
    fill(page, "output_dir", "runs/broken")
    page.click("#tf-start")
    page.wait_for_selector("#tf-progress-state[data-state='failed']", timeout=10_000)
    assert "missing.json" in text_of(page, "status")

    # adapters: the finished run is listed (the list refreshes when a run ends, and on the button)
    page.click("#tf-refresh_adapters")
    choose(page, "adapters", "runs/browser")

    # chat with the result
    open_tab(page, "Chat")
    page.click("#tf-load_model")
    page.wait_for_function("document.querySelector('#tf-model_status textarea, #tf-model_status input')"
                           ".value.startsWith('Loaded')")
    fill(page, "max_new_tokens", "12")
    page.locator("#tf-message textarea").fill("Who are you?")
    page.click("#tf-send")
    page.wait_for_selector("#tf-chat_tuned .message-row.bot-row, #tf-chat_tuned [data-testid='bot']")
    page.wait_for_timeout(800)
    page.screenshot(path=str(shots / "chat.png"), full_page=True)
    page.click("#tf-compare input")
    page.wait_for_selector("#tf-chat_base", state="visible")
    page.locator("#tf-message textarea").fill("你是谁？")
    page.click("#tf-send")
    page.wait_for_function("document.querySelectorAll('#tf-chat_base .bot-row, #tf-chat_base "
                           "[data-testid=\"bot\"]').length >= 1")
    page.wait_for_timeout(800)
    page.screenshot(path=str(shots / "chat_compare.png"), full_page=True)

    # evaluate (loss mode) on the identity set
    open_tab(page, "Evaluate & Predict")
    choose(page, "eval_dataset", "identity")
    fill(page, "eval_max_samples", "4")
    page.click("#tf-run_eval")
    page.wait_for_selector("#tf-metrics:has-text('perplexity')", timeout=120_000)
    page.wait_for_selector("#tf-eval-status:has-text('Evaluation written to runs/eval')")
    page.wait_for_timeout(800)  # the pending overlay fades out
    assert "report\n.md" in page.inner_text("#tf-result_files")  # name and extension are drawn apart
    page.screenshot(path=str(shots / "evaluate.png"), full_page=True)

    # export with verification
    open_tab(page, "Export")
    fill(page, "export_dir", "exports/browser")
    page.click("#tf-run_export")
    page.wait_for_selector("#tf-export_result:has-text('every check passed')", timeout=300_000)
    page.screenshot(path=str(shots / "export.png"), full_page=True)
    assert (workspace.exports_dir / "browser" / "Modelfile").is_file()
    for name in ("train_zh", "train_running", "train_finished", "chat", "chat_compare", "evaluate", "export"):
        assert (shots / f"{name}.png").stat().st_size > 10_000


def test_a_run_survives_a_reload_and_aborts(page, workspace, board_url):
    choose(page, "lang", "中文")
    page.wait_for_selector("#tf-title:has-text('看板')")
    choose(page, "model", "models/tiny")
    choose(page, "template", "chatml")
    choose(page, "dataset", "identity")
    for key, value in {"max_steps": "100000", "logging_steps": "1", "cutoff_len": "64", "max_samples": "8",
                       "save_steps": "0", "output_dir": "runs/long"}.items():
        fill(page, key, value)
    page.click("#tf-start")
    page.wait_for_selector("#tf-progress-state[data-state='running']", timeout=120_000)
    page.reload()  # the page reconnects to the run in progress, in the language chosen before
    page.wait_for_selector("#tf-progress-state[data-state='running']", timeout=30_000)
    page.wait_for_selector("#tf-title:has-text('看板')")
    page.wait_for_function("document.querySelector('#tf-status textarea, #tf-status input').value"
                           ".startsWith('训练中')")
    step = int(page.get_attribute("#tf-progress-state", "data-step"))
    page.wait_for_function(f"Number(document.querySelector('#tf-progress-state').dataset.step) > {step}")
    page.click("#tf-abort")
    page.wait_for_selector("#tf-progress-state[data-state='aborted']", timeout=60_000)
    assert text_of(page, "status").startswith("已中断")
    checkpoints = list((workspace.runs_dir / "long" / "checkpoints").glob("step-*"))
    assert checkpoints, "Abort saves a checkpoint, as Ctrl-C does"
