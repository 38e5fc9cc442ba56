"""The page over HTTPS behind a gateway that checks API keys, in headless Chromium.

The gateway runs with a certificate from the development CA and `auth.mode=api_key`; Chromium
trusts that one certificate by its public key hash (not a blanket "ignore certificate errors").
The static files load without a key; the first Generate asks for one in the page's dialog; a
wrong key is refused and asked for again with the gateway's message; the right one runs the job
and the image shows. A key that may use only the 3D server gets the gateway's 403 message once,
without being asked again. The page's Content-Security-Policy is the gateway's, and nothing on
the page violates it.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from playwright.sync_api import Browser, BrowserContext, FilePayload, Page, sync_playwright

from deploy.dev_ca import issue, make_ca
from tests.web.conftest import ARTIFACTS, CHROMIUM_ARGS, STACK_SETTINGS
from tests.web.stack import Stack, running_stack
from tests.web.test_page import DISTINCT_COLOURS_JS, picture

pytestmark = pytest.mark.timeout(240)

#: Keys of the gateway's keys file: one for every service, one for the 3D server only.
ALICE_KEY = "alice-" + secrets.token_hex(16)
MESH_ONLY_KEY = "meshy-" + secrets.token_hex(16)

#: Collects `securitypolicyviolation` events from the first script on (Playwright injects it
#: through the DevTools protocol, which the page's CSP does not govern).
CSP_WATCH = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) =>
  window.__cspViolations.push(`${e.violatedDirective} blocked ${e.blockedURI || "inline"}`));
"""


def spki_hash(cert_file: Path) -> str:
    """Base64 SHA-256 of a certificate's SubjectPublicKeyInfo: Chromium's way to trust exactly one key."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@dataclass
class SecureStack:
    stack: Stack
    gateway_cert: Path


@pytest.fixture(scope="module")
def secure_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureStack]:
    work = tmp_path_factory.mktemp("web-auth")
    certs = work / "certs"
    certs.mkdir()
    ca = make_ca(certs)
    gateway_cert = issue(ca, certs, "gateway", hosts=["127.0.0.1", "localhost"])
    keys = work / "api_keys"
    keys.write_text(f"# name key [services]\nalice {ALICE_KEY}\nmeshy {MESH_ONLY_KEY} mesh\n")
    gateway: dict[str, Any] = {
        "auth": {"mode": "api_key", "api_keys_file": keys},
        "tls": {"cert_file": gateway_cert.cert, "key_file": gateway_cert.key},
    }
    servers = {
        **STACK_SETTINGS,
        # Signed links relative to the page's origin: results looked up later download without a key.
        "KILN_STORAGE__PUBLIC_BASE_URL": "/v1/artifacts",
        "KILN_STORAGE__URL_SIGNING_KEY": secrets.token_hex(32),
    }
    with running_stack(work, gateway, **servers) as stack:
        assert stack.url.startswith("https://"), stack.url
        yield SecureStack(stack, gateway_cert.cert)


@pytest.fixture(scope="module")
def browser(chromium_path: str, secure_stack: SecureStack) -> Iterator[Browser]:
    trust = f"--ignore-certificate-errors-spki-list={spki_hash(secure_stack.gateway_cert)}"
    with sync_playwright() as playwright:
        args = [*CHROMIUM_ARGS, trust]
        launched = playwright.chromium.launch(executable_path=chromium_path, args=args, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class SecureTab:
    page: Page
    context: BrowserContext
    errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    def csp_problems(self) -> list[str]:
        reported: list[str] = self.page.evaluate("() => window.__cspViolations")
        logged = [line for line in self.console if "Content Security Policy" in line]
        return [*reported, *logged]


@pytest.fixture
def open_tab(browser: Browser, secure_stack: SecureStack, request: pytest.FixtureRequest) -> Iterator[Any]:
    opened: list[SecureTab] = []

    def open_() -> SecureTab:
        context = browser.new_context(viewport={"width": 1360, "height": 1000})
        context.set_default_timeout(30_000)
        page = context.new_page()
        tab = SecureTab(page, context)
        page.add_init_script(CSP_WATCH)
        page.on("pageerror", lambda error: tab.errors.append(str(error)))
        page.on("console", lambda message: tab.console.append(f"{message.type}: {message.text}"))
        response = page.goto(secure_stack.stack.url)
        assert response is not None and response.ok, response
        tab.headers = response.all_headers()
        opened.append(tab)
        return tab

    try:
        yield open_
        for tab in opened:
            assert not tab.errors, f"uncaught errors in the page: {tab.errors}\nconsole: {tab.console}"
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for index, tab in enumerate(opened):
            name = request.node.name.removeprefix("test_")
            tab.page.screenshot(path=str(ARTIFACTS / f"{name}-tab{index + 1}.png"), full_page=True)
            tab.context.close()


def wait_for_dialog(page: Page, times: int) -> str:
    """Wait until the key dialog is open for the `times`-th time; its message."""
    opened = "(n) => { const d = document.getElementById('key-dialog'); return d.open && +d.dataset.asked === n; }"
    page.wait_for_function(opened, arg=times)
    return (page.text_content("#key-message") or "").strip()


def enter_key(page: Page, key: str) -> None:
    page.fill("#key-input", key)
    page.click("#key-submit")


def start_generate(page: Page, *, size: int = 128, steps: int = 4) -> None:
    payload: FilePayload = {"name": "input.png", "mimeType": "image/png", "buffer": picture(size)}
    page.set_input_files("#file", files=[payload])
    page.wait_for_selector("#input-preview:not([hidden])")
    page.fill("#prompt", "a glazed ceramic bowl, studio light")
    page.fill("#steps", str(steps))
    page.fill("#seed", "7")
    page.click("#generate")


def stored_everywhere(page: Page) -> dict[str, Any]:
    return page.evaluate(
        """() => ({
          session: sessionStorage.getItem('kiln.apiKey'),
          local: JSON.stringify(Object.entries(localStorage)),
          url: location.href,
          cookies: document.cookie,
        })"""
    )


def test_page_over_https_asks_for_a_key_then_generates(open_tab: Any, secure_stack: SecureStack) -> None:
    tab: SecureTab = open_tab()
    page = tab.page
    csp = tab.headers.get("content-security-policy", "")
    assert "script-src 'self'" in csp and "style-src 'self'" in csp, tab.headers
    # HTTP/2 over TLS (ALPN), and the page's own files came without a key.
    protocol = page.evaluate("() => performance.getEntriesByType('navigation')[0].nextHopProtocol")
    assert protocol == "h2", protocol
    # The status pills asked in the background: they say a key is needed, without a dialog.
    page.wait_for_function(
        "() => /needs an API key/.test(document.querySelector('#status-img2img .service-detail').textContent)"
    )
    assert not page.evaluate("() => document.getElementById('key-dialog').open")

    start_generate(page)
    first = wait_for_dialog(page, 1)
    assert first, "the dialog shows the gateway's message"
    assert page.get_attribute("#key-input", "type") == "password"

    # A wrong key: refused by the gateway, dropped by the page, and the dialog comes back.
    enter_key(page, "not-a-key-" + secrets.token_hex(8))
    second = wait_for_dialog(page, 2)
    assert second, "the dialog shows the gateway's message again"
    assert stored_everywhere(page)["session"] is None
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page_over_https-key-dialog.png"))

    enter_key(page, ALICE_KEY)
    page.wait_for_selector("#result-img:not([hidden])", timeout=120_000)
    pixels = page.evaluate(DISTINCT_COLOURS_JS, "#result-img")
    assert pixels is not None and pixels["width"] == 128 and pixels["colours"] > 100, pixels
    assert not page.evaluate("() => document.getElementById('key-dialog').open")

    kept = stored_everywhere(page)
    assert kept["session"] == ALICE_KEY
    for place in ("local", "url", "cookies"):
        assert ALICE_KEY not in kept[place], (place, kept)
    page.wait_for_selector("#key-forget:not([hidden])")

    # After a reload the key from sessionStorage is used at once: the pills turn ready and the
    # finished job shows again from the jobs list (GetJob, then its signed link).
    page.reload()
    page.wait_for_function("() => document.getElementById('status-img2img').dataset.state === 'ready'")
    page.wait_for_selector("#result-img:not([hidden])", timeout=60_000)
    assert page.evaluate("() => document.getElementById('key-dialog').dataset.asked") is None
    # The stored image came by its signed link, which needs no key.
    fetched = page.evaluate("() => performance.getEntriesByType('resource').map((e) => e.name)")
    assert any("/v1/artifacts/" in url and "signature=" in url for url in fetched), fetched

    # A second tab shares the saved jobs (localStorage) but not the key (sessionStorage): it does
    # not open the dialog by itself, says why it cannot look the jobs up, and restores them once
    # a key is entered from the header.
    other = tab.context.new_page()
    other.goto(secure_stack.stack.url)
    other.wait_for_selector("#jobs-alert[data-code='UNAUTHENTICATED']")
    assert stored_everywhere(other)["session"] is None
    assert other.evaluate("() => document.getElementById('key-dialog').dataset.asked") is None
    other.click("#key-enter")
    wait_for_dialog(other, 1)
    enter_key(other, ALICE_KEY)
    other.wait_for_selector("#result-img:not([hidden])", timeout=60_000)
    other.wait_for_function("() => document.getElementById('status-img2img').dataset.state === 'ready'")
    other.close()

    assert tab.csp_problems() == [], tab.console
    # The policy is enforced and the watch above sees it: an inline style is refused and reported.
    page.evaluate("() => document.head.append(Object.assign(document.createElement('style'), {textContent: 'p{}'}))")
    page.wait_for_function("() => window.__cspViolations.length > 0")
    assert any("style-src" in problem for problem in tab.csp_problems()), tab.csp_problems()


def test_key_without_the_service_gets_the_gateways_403_once(open_tab: Any) -> None:
    tab: SecureTab = open_tab()
    page = tab.page
    start_generate(page)
    wait_for_dialog(page, 1)
    enter_key(page, MESH_ONLY_KEY)
    page.wait_for_selector("#gen-alert[data-code='PERMISSION_DENIED']")
    message = page.text_content("#gen-alert .alert-message") or ""
    assert message.strip(), page.text_content("#gen-alert")
    # Not asked again: the key is valid, it just may not use this service.
    assert page.evaluate("() => document.getElementById('key-dialog').dataset.asked") == "1"
    assert not page.evaluate("() => document.getElementById('key-dialog').open")
    assert stored_everywhere(page)["session"] == MESH_ONLY_KEY

    page.click("#key-forget")
    assert stored_everywhere(page)["session"] is None
    page.wait_for_selector("#key-enter:not([hidden])")
    assert tab.csp_problems() == [], tab.console


def test_reload_mid_generation_reattaches_with_the_key_of_the_tab(open_tab: Any) -> None:
    tab: SecureTab = open_tab()
    page = tab.page
    # The background lookups found out that a key is wanted: the header offers to enter one.
    page.click("#key-enter")
    wait_for_dialog(page, 1)
    enter_key(page, ALICE_KEY)
    page.wait_for_function("() => document.getElementById('status-img2img').dataset.state === 'ready'")
    # 60 steps on a 256 px image: long enough to be mid-run when the page reloads.
    start_generate(page, size=256, steps=60)
    page.wait_for_function("() => window.kiln.events.filter((e) => e.kind === 'progress').length >= 3")
    job = (page.text_content("#gen-job") or "").removeprefix("job ").strip()
    assert job

    page.reload()
    # WatchJob from the saved cursor, with the key from sessionStorage: no dialog, same job.
    page.wait_for_function("(job) => window.kiln.events.some((e) => e.kind === 'watch' && e.jobId === job)", arg=job)
    page.wait_for_selector("#result-img:not([hidden])", timeout=120_000)
    assert (page.text_content("#gen-job") or "").removeprefix("job ").strip() == job
    assert page.evaluate("() => document.getElementById('key-dialog').dataset.asked") is None
    assert tab.csp_problems() == [], tab.console
