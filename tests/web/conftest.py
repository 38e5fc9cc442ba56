"""Fixtures for the browser tests: a Chrome/Chromium on the machine through Playwright, the stack, pages.

The browser is a Chrome or Chromium found on the machine (tests/tools.py: $KILN_CHROMIUM, Debian's
`chromium` that `make chromium` installs, Ubuntu's `chromium-browser`, Google Chrome, the macOS app
bundles), launched by path: Playwright never downloads a browser. Without one the tests fail in CI
(`CI` set: a missing browser must not turn the suite green) and are skipped elsewhere, with the
command that installs one on this platform.

Each page records uncaught script errors and failed console messages; a test fails if its
page threw. A screenshot of every page is saved to test-artifacts/web/<test>.png, pass or fail.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from tests.tools import chromium_executable
from tests.web.stack import ROOT, Stack, running_stack

ARTIFACTS = ROOT / "test-artifacts" / "web"
#: Flags that work on a headless machine without a GPU; WebGL runs on SwiftShader.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
]
#: Admission as in production (one job at a time) but a queue of one, so a third job is refused.
STACK_SETTINGS = {
    "KILN_IMG2IMG__RUNTIME__MAX_CONCURRENCY": "1",
    "KILN_IMG2IMG__RUNTIME__MAX_QUEUE": "1",
}


@pytest.fixture(scope="session")
def chromium_path() -> str:
    return chromium_executable()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("web-stack"), **STACK_SETTINGS) as running:
        yield running


@pytest.fixture(scope="module")
def browser(chromium_path: str) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Tab:
    """A page of the app, with what its scripts reported."""

    page: Page
    context: BrowserContext
    errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)


class Tabs:
    """Opens pages of the app for one test; screenshots and checks them at the end."""

    def __init__(self, browser: Browser, stack: Stack, name: str) -> None:
        self.browser = browser
        self.stack = stack
        self.name = name
        self.opened: list[Tab] = []

    def open(self, *, color_scheme: str = "light", width: int = 1360, height: int = 1000) -> Tab:
        context = self.browser.new_context(
            viewport={"width": width, "height": height},
            color_scheme=color_scheme,  # type: ignore[arg-type]
            accept_downloads=True,
        )
        context.set_default_timeout(30_000)
        page = context.new_page()
        tab = Tab(page, context)
        page.on("pageerror", lambda error: tab.errors.append(str(error)))
        page.on("console", lambda message: tab.console.append(f"{message.type}: {message.text}"))
        page.goto(self.stack.url)
        # The page asks both servers for their limits and parameter ranges on load.
        page.wait_for_function("() => window.kiln && window.kiln.info.img2img && window.kiln.info.mesh")
        self.opened.append(tab)
        return tab

    def screenshot(self, tab: Tab, label: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{self.name}-{label}.png"
        tab.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        for index, tab in enumerate(self.opened):
            try:
                self.screenshot(tab, "final" if len(self.opened) == 1 else f"tab{index + 1}-final")
            finally:
                tab.context.close()


@pytest.fixture
def tabs(browser: Browser, stack: Stack, request: pytest.FixtureRequest) -> Iterator[Tabs]:
    name = re.sub(r"[^\w-]+", "_", request.node.name.removeprefix("test_"))
    opened = Tabs(browser, stack, name)
    try:
        yield opened
        for tab in opened.opened:
            assert not tab.errors, f"uncaught errors in the page: {tab.errors}\nconsole: {tab.console}"
    finally:
        opened.close()
