"""A real browser for the UI tests: Debian's headless Chromium driven by Playwright, and screenshots kept as artifacts.

Playwright launches the system ``chromium`` (``make install`` adds it); ``playwright install`` is never needed. Each
``chromium_page`` has a fresh profile (a new temporary one per launch), a default timeout for every wait, and on an
exception a screenshot ``<name>-failure.png`` before the error goes on. ``shot`` saves a full-page screenshot under
the artifacts folder: ``$COGUMI_TEST_ARTIFACTS``, default ``test-artifacts/`` in the repository (git-ignored).

    with chromium_page("airflow-ui") as page:
        page.goto(url)
        shot(page, "airflow-ui/01-login")
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import Page

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]


def artifacts_dir() -> Path:
    """Where screenshots go: ``$COGUMI_TEST_ARTIFACTS`` or ``<repo>/test-artifacts``; created."""
    path = Path(os.environ.get("COGUMI_TEST_ARTIFACTS") or REPO / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def shot(page: Page, name: str, timeout_ms: float = 30_000) -> Path:
    """Save a full-page PNG of ``page`` as ``<artifacts>/<name>.png`` (``name`` may hold ``/`` for a subfolder)."""
    safe = "/".join(re.sub(r"[^A-Za-z0-9._-]+", "-", part) for part in name.split("/") if part not in ("", ".", ".."))
    path = artifacts_dir() / f"{safe}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True, timeout=timeout_ms)
    return path


def chromium_path() -> str:
    """The system Chromium's path; a clear error when it is missing."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise RuntimeError("no chromium on PATH: `make install` adds Debian's chromium (never `playwright install`)")
    return path


@contextmanager
def chromium_page(name: str, timeout_ms: float = 20_000, width: int = 1400, height: int = 900) -> Iterator[Page]:
    """A page in headless Chromium with a fresh profile and ``timeout_ms`` as its default timeout; on an exception
    inside the block, ``<name>-failure.png`` is saved first."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            page = context.new_page()
            page.set_default_timeout(timeout_ms)
            try:
                yield page
            except BaseException:
                try:
                    print(f"failure screenshot: {shot(page, f'{name}-failure')}")
                except Exception as exc:  # the page may be gone; the original error matters more
                    print(f"no failure screenshot: {exc}")
                raise
        finally:
            browser.close()
