"""Fixtures of the browser tests: Debian's chromium driven headless by Playwright (never a
downloaded browser), and live collectors on loopback serving the participant's page.

Skipped with the reason when chromium, Playwright or onnxruntime-web (node_modules, `make
setup`) are missing."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from collector.app import create_app
from collector.web import ORT_FILES, ORT_SUBDIR

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
IMAGES_DIR = ROOT / "docs" / "images"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request of the page


def _missing() -> str | None:
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} is missing (Debian's chromium package: apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[browser]')"
    if not all((ROOT / ORT_SUBDIR / name).is_file() for name in ORT_FILES):
        return "onnxruntime-web is not installed (make setup runs npm ci)"
    return None


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    why = _missing()
    if why:
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@dataclass
class Live:
    """A collector on 127.0.0.1 in a thread."""

    app: Any
    url: str
    server: Any
    requests: list[dict[str, Any]] = field(default_factory=list)

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def live() -> Iterator[Callable[..., Live]]:
    """live(**config) → a running collector; all are stopped after the test."""
    from werkzeug.serving import make_server

    running: list[Live] = []
    tmp = Path(tempfile.mkdtemp(prefix="pric-web-"))

    def start(**config: Any) -> Live:
        cfg = {"DATA_DIR": str(tmp / f"data{len(running)}"), "MODELS_DIR": str(ROOT / "exported_models"),
               "CURRENT_MODEL": "pric-male-decision@2", "RATE_LIMIT_PER_MIN": 0, "READ_LIMIT_PER_MIN": 0,
               "REGISTER_LIMIT_PER_MIN": 0, **config}
        app = create_app(cfg)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        lv = Live(app, f"http://127.0.0.1:{server.server_port}", server)
        running.append(lv)
        return lv

    yield start
    for lv in running:
        lv.stop()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def page_of(browser: Any) -> Iterator[Callable[[Live], Any]]:
    """page_of(live) → a fresh browser context's page with every request recorded in
    live.requests (url, method, headers, body bytes)."""
    contexts: list[Any] = []

    def make(lv: Live) -> Any:
        ctx = browser.new_context(viewport={"width": 1000, "height": 900})
        contexts.append(ctx)
        page = ctx.new_page()
        page.on("request", lambda r: lv.requests.append(
            {"url": r.url, "method": r.method, "headers": dict(r.headers), "body": r.post_data_buffer}))
        page.set_default_timeout(60_000)
        return page

    yield make
    for ctx in contexts:
        ctx.close()


def screenshot(page: Any, name: str) -> None:
    """web-<name>.png: into docs/images (shown in docs/participant.md) with
    PRIC_WEB_SCREENSHOTS=1, else into a temporary folder (a test run leaves the docs as they are)."""
    folder = IMAGES_DIR if os.environ.get("PRIC_WEB_SCREENSHOTS") == "1" else Path(tempfile.gettempdir()) / "pric-web-shots"
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"web-{name}.png"), full_page=True)
