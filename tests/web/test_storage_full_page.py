"""The page in headless Chromium when the servers' artifact storage is full (its own stack: a budget
no job fits in): the refusal is worded as storage, not as a busy server, and the status says why."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.web.conftest import Tabs
from tests.web.stack import Stack, running_stack
from tests.web.test_page import fill_generate_form, picture, upload

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # One byte of budget: every job would cross it, so each is refused before it runs.
    with running_stack(tmp_path_factory.mktemp("full-stack"), KILN_STORAGE__BUDGET_BYTES="1") as running:
        yield running


def test_storage_full_is_explained_not_called_busy(tabs: Tabs, stack: Stack) -> None:
    tab = tabs.open()
    page = tab.page
    # GetInfo's readiness reason is in the server pill's tooltip.
    assert "KILN_STORAGE__BUDGET_BYTES" in (page.get_attribute("#status-img2img", "title") or "")

    upload(tab, picture(96))
    fill_generate_form(tab, steps=4)
    page.click("#generate")
    alert = page.wait_for_selector("#gen-alert:not([hidden])", timeout=30_000)
    assert alert is not None
    assert page.get_attribute("#gen-alert", "data-code") == "RESOURCE_EXHAUSTED"
    assert page.get_attribute("#gen-alert", "data-kind") == "error"  # not "busy": no countdown
    text = alert.text_content() or ""
    assert "no room to save results" in text and "nothing was kept" in text, text
    assert "KILN_STORAGE__BUDGET_BYTES" in text, text  # the server's own message is shown too
    assert "Retry in" not in text, text
    tabs.screenshot(tab, "storage-full")
    assert stack.img2img.metric("kiln_storage_full_total", when="admission") >= 1
    assert stack.img2img.metric("kiln_requests_total", method="Generate", code="OK") == 0
