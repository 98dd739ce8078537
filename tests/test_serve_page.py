"""serve's web page, driven in a real headless Chromium: type, ask, see both answers."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import running_server

from instructlm.serve.app import create_app
from instructlm.serve.settings import ServeSettings

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                "google-chrome"))), None)
# Flags for a sandboxed machine with no network: no first-run, sync or update traffic.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def models(tiny_models):
    return tiny_models


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        message = "no Chromium found: install Debian's chromium package to test the page"
        if os.environ.get("INSTRUCTLM_BROWSER_TESTS") == "required":
            pytest.fail(message)
        pytest.skip(message)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


def open_page(browser, url: str):
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda err: problems.append(str(err)))
    page.on("request", lambda r: None if r.url.startswith(url) else problems.append(r.url))
    page.goto(f"{url}/")
    return page, problems


def test_the_page_shows_the_tuned_answer_beside_the_untuned_one(browser, models, tmp_path):
    with running_server(create_app(models, ServeSettings(max_tokens=24))) as url:
        page, problems = open_page(browser, url)
        assert page.locator("#api_key").is_hidden()
        page.fill("#instruction", "Say hello.")
        page.click("#ask")
        tuned = page.locator('.answer[data-model="facts"]')
        base = page.locator('.answer[data-model="facts:base"]')
        expect = sync_api.expect
        expect(tuned.locator(".status")).to_have_attribute("data-finish", "stop")
        expect(base.locator(".status")).to_have_attribute("data-finish", re.compile("stop|length"))
        assert tuned.locator(".text").inner_text() == "Hello!"
        assert "stopped by itself" in tuned.locator(".status").inner_text()
        assert base.locator(".text").inner_text() != "Hello!"
        assert tuned.locator("h2").inner_text() == "facts"
        assert "untuned" in base.locator("h2").inner_text()
        expect(page.locator("#ask")).to_be_enabled()
        page.screenshot(path=str(Path(tmp_path) / "page.png"))
        assert problems == []  # no script errors, nothing fetched from elsewhere


def test_the_page_asks_for_the_key_when_the_server_needs_one(browser, models):
    app = create_app({"facts": models["facts"]}, ServeSettings(max_tokens=24, api_key="sesame"))
    with running_server(app) as url:
        page, _ = open_page(browser, url)
        answer = page.locator('.answer[data-model="facts"]')
        page.fill("#instruction", "Tell me a spell.")
        page.fill("#api_key", "wrong")
        page.click("#ask")
        sync_api.expect(answer.locator(".status")).to_contain_text("API key")
        page.fill("#api_key", "sesame")
        page.click("#ask")
        sync_api.expect(answer.locator(".status")).to_have_attribute("data-finish", "stop")
        assert answer.locator(".text").inner_text() == "Hocus Pocus!"
