"""Headless Chromium for the console's tests: Debian's `chromium` package driven by
Playwright's Python package (its own driver only; no browser is ever downloaded).

Without either, the tests that need a browser skip, saying what to install; `.ci/run`
installs Chromium when it can. Screenshots go to var/test-artifacts/console/.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "var" / "test-artifacts" / "console"


def chromium_path() -> str | None:
    for candidate in (os.environ.get("CHROMIUM_PATH"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def require_browser() -> str:
    """Chromium's path, or the test is skipped with what is missing."""
    path = chromium_path()
    if path is None:
        pytest.skip("headless Chromium is not installed: `apt-get install chromium` (Debian's package; "
                    ".ci/run installs it) or set CHROMIUM_PATH")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("the playwright Python package is not installed: pip install -e '.[dev]'")
    return path


class Browser:
    """One Chromium for a test module; a fresh context (its own sessionStorage) per page."""

    def __init__(self, executable: str):
        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        try:
            self._browser = self._playwright.chromium.launch(
                executable_path=executable, headless=True,
                # No sandbox as root in CI containers; videos may start without a click.
                args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required", "--disable-gpu"])
        except Exception:
            self._playwright.stop()
            raise
        self.contexts = []

    def page(self, *, width: int = 1400, height: int = 1100):
        context = self._browser.new_context(viewport={"width": width, "height": height})
        self.contexts.append(context)
        page = context.new_page()
        page.messages = []  # what the page logged and threw, for failure messages
        page.on("console", lambda message: page.messages.append(f"console.{message.type}: {message.text}"))
        page.on("pageerror", lambda error: page.messages.append(f"pageerror: {error}"))
        page.set_default_timeout(30_000)
        return page

    def close_pages(self) -> None:
        for context in self.contexts:
            context.close()
        self.contexts.clear()

    def close(self) -> None:
        self.close_pages()
        self._browser.close()
        self._playwright.stop()


def screenshot(page, name: str) -> Path:
    """Keeps the page as it is now under var/test-artifacts/console/<name>.png."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
