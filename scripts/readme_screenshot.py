"""Make docs/images/webui-train.png: the board's Train tab while the embedded model trains on `identity`.

Run from the repository root with the venv active and Debian's chromium installed:
    python scripts/readme_screenshot.py
"""

from __future__ import annotations

import shutil
import socket
import sys
import tempfile
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

from tuneforge.webui.app import create_app, launch
from tuneforge.webui.workspace import Workspace

OUT = Path("docs/images/webui-train.png")
WIDTH = 1200  # pixels in the README image


def main() -> int:
    ws = Workspace.at(tempfile.mkdtemp(prefix="tuneforge-board-"))
    demo, _ = create_app(ws)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(demo, ws, "127.0.0.1", port)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        page.goto(f"http://127.0.0.1:{port}")
        page.wait_for_selector("#tf-start")
        page.click("#tf-dataset input")
        page.click("#tf-dataset li[role=option][aria-label='identity']")
        page.keyboard.press("Escape")
        for key, value in {"identity_name": "Orbweaver", "identity_author": "Kestrel Labs", "max_steps": "60",
                           "logging_steps": "1", "grad_accum": "2", "cutoff_len": "256", "learning_rate": "0.0005",
                           "output_dir": "runs/identity_demo"}.items():
            box = page.locator(f"#tf-{key} input, #tf-{key} textarea").first
            box.fill(value)
            box.press("Tab")
        page.click("#tf-hyperparams-panel > button, #tf-hyperparams-panel .label-wrap")  # fold the settings
        page.click("#tf-start")
        page.wait_for_function("Number(document.querySelector('#tf-progress-state').dataset.step) >= 25",
                               timeout=600_000)
        page.wait_for_timeout(1500)  # let the plot redraw
        shot = Path(tempfile.mkdtemp()) / "train.png"
        bottom = page.evaluate("document.querySelector('#tf-loss_plot').getBoundingClientRect().bottom"
                               " + window.scrollY")
        page.screenshot(path=str(shot), full_page=True, clip={"x": 0, "y": 0, "width": 1400, "height": bottom + 16})
        page.click("#tf-abort")
        browser.close()
    image = Image.open(shot)
    image = image.resize((WIDTH, round(image.height * WIDTH / image.width)), Image.LANCZOS)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    image.convert("RGB").save(OUT, optimize=True)
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
