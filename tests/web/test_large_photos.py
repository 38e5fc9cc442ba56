"""Photo-sized uploads in the page, in Chromium through Envoy to the tiny-model servers.

A 10 MiB JPEG gives a result over gRPC-Web; a 25 MiB one is stopped by the page's own check
(GetInfo's `limits.max_image_bytes`) with the limit next to the drop zone, and when that check
is bypassed the server's refusal lands in the same place, in the server's words, never "busy".
"""

from __future__ import annotations

from playwright.sync_api import FilePayload

from kiln_client.limits import DEFAULT_MAX_IMAGE_BYTES
from tests.photos import MiB, photo_jpeg
from tests.web.conftest import Tab, Tabs
from tests.web.stack import Stack
from tests.web.test_page import fill_generate_form, kinds

EVENTS_JS = "(job) => window.kiln.events.filter(e => e.job === job)"


def choose(tab: Tab, data: bytes) -> None:
    payload: FilePayload = {"name": "photo.jpg", "mimeType": "image/jpeg", "buffer": data}
    tab.page.set_input_files("#file", files=[payload])


def test_a_ten_mib_photo_gives_a_result(tabs: Tabs, stack: Stack) -> None:
    tab = tabs.open()
    page = tab.page
    choose(tab, photo_jpeg(10 * MiB))
    page.wait_for_selector("#input-preview:not([hidden])")
    assert "10.0 MB" in (page.text_content("#file-meta") or "")
    fill_generate_form(tab, steps=4)
    page.click("#generate")
    page.wait_for_selector("#result-img:not([hidden])", timeout=120_000)
    names = kinds(page.evaluate(EVENTS_JS, "img2img"))
    assert names[0] == "accepted" and names[-1] == "result", names
    assert not (page.text_content("#err-image") or "").strip()


def test_a_25_mib_photo_shows_the_limit_next_to_the_drop_zone(tabs: Tabs, stack: Stack) -> None:
    tab = tabs.open()
    page = tab.page
    assert page.evaluate("() => Number(window.kiln.info.img2img.limits.maxImageBytes)") == DEFAULT_MAX_IMAGE_BYTES
    photo = photo_jpeg(25 * MiB)
    choose(tab, photo)
    page.wait_for_function("() => document.getElementById('err-image').textContent.length > 0")
    text = page.text_content("#err-image") or ""
    assert "25.0 MB" in text and "more than the 20.0 MB the server accepts" in text, text
    assert page.is_hidden("#input-preview")  # the file was not taken
    tabs.screenshot(tab, "page-check")

    # Without the page's check (an older page, a changed limit) the server refuses by field,
    # and its own words appear in the same place. The page refreshes GetInfo every 15 s, so the
    # limit it checks against is raised again after each refresh.
    page.evaluate(
        """() => {
             const raise = () => { const limits = window.kiln.info.img2img?.limits;
                                   if (limits) limits.maxImageBytes = 1n << 40n; };
             raise();
             window.setInterval(raise, 10);
           }"""
    )
    choose(tab, photo)
    page.wait_for_selector("#input-preview:not([hidden])")
    fill_generate_form(tab, steps=4)
    page.click("#generate")
    page.wait_for_function("() => /allowed/.test(document.getElementById('err-image').textContent)", timeout=60_000)
    text = page.text_content("#err-image") or ""
    assert f"is {len(photo)} bytes, more than the {DEFAULT_MAX_IMAGE_BYTES} allowed (20 MiB)" in text, text
    assert page.get_attribute("#drop", "aria-invalid") == "true"
    alert = page.text_content("#gen-alert") or ""
    assert "busy" not in alert.lower(), alert
    assert stack.img2img.metric("kiln_requests_total", method="Generate", code="INVALID_ARGUMENT") >= 1
