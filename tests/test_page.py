"""The search page in headless Chromium (Debian's, driven by playwright) against a live uvicorn server.

Types a query, sees thumbnails, opens a result with the keyboard, asks a question and reads the
streamed answer, searches by an example image, and checks the phone layout. Screenshots go to the
test's tmp folder (and to $F2B_SCREENSHOT_DIR when set). Without chromium the test skips locally and
fails in CI (CI=true), saying how to install it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from fwd2bot_index.api import make_server
from fwd2bot_index.api.testing import LiveServer, demo_collection, free_port

CHROMIUM = os.environ.get("F2B_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-dev-shm-usage"]


def _need_browser():
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        message = (f"Chromium not found at {CHROMIUM}: install Debian's package (apt-get install -y chromium) "
                   "or set F2B_CHROMIUM to its path")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -e '.[test]'")
    return sync_playwright


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server ``serve()`` runs (what ``f2b serve`` runs), in a thread on a free loopback port."""
    demo = demo_collection(tmp_path_factory.getbasetemp() / "api-demo", n=40, seed=0)
    live = LiveServer(server=make_server(demo.collection, port=free_port(), writable=False, log_level="warning"))
    with live as url:
        live.wait_ready()
        yield url, demo


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _need_browser()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def _shot(page, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    page.screenshot(path=str(target), full_page=True)
    keep = os.environ.get("F2B_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(target, Path(keep) / name)
    assert target.stat().st_size > 1000
    return target


def _thumbnails_loaded(page) -> None:
    """Every thumbnail in the viewport has loaded (the rest load lazily on scroll)."""
    page.wait_for_function("""() => {
        const imgs = [...document.querySelectorAll('#results .hit img')]
            .filter((i) => i.getBoundingClientRect().top < window.innerHeight);
        return imgs.length > 0 && imgs.every((i) => i.complete && i.naturalWidth > 0);
    }""", timeout=15000)


def test_search_ask_and_example_search_in_chromium(server, browser, tmp_path):
    url, demo = server
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_selector("#model-status.ready", timeout=15000)
    assert "40 images" in page.inner_text("#collection-info")

    # Type a query and press Enter: a grid of thumbnails with scores, best first.
    page.get_by_label("Search images by description").fill("a red circle")
    page.keyboard.press("Enter")
    page.wait_for_selector("#results .hit")
    _thumbnails_loaded(page)
    hits = page.locator("#results .hit")
    assert hits.count() == 24
    scores = [float(s) for s in page.locator("#results .hit .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)
    expected = httpx.post(url + "/v1/search", json={"query": "a red circle", "k": 24}).json()["results"]
    assert [int(h.get_attribute("data-id")) for h in hits.all()] == [h["id"] for h in expected]
    assert "24 results" in page.inner_text("#status")
    _shot(page, tmp_path, "search-results.png")

    # Keyboard only: focus the first result, Enter opens it, the question box has focus.
    hits.first.focus()
    page.keyboard.press("Enter")
    page.wait_for_selector("dialog#detail[open]")
    assert page.evaluate("document.activeElement.id") == "question"
    page.keyboard.type("What color is the circle?")
    page.keyboard.press("Enter")
    page.wait_for_function("""() => {
        const out = document.querySelector('#answer');
        return out.textContent.length > 0 && !out.classList.contains('streaming');
    }""", timeout=20000)
    shown = page.evaluate("document.querySelector('#answer').textContent")
    first_id = expected[0]["id"]
    direct = httpx.post(f"{url}/v1/images/{first_id}/ask",
                        json={"question": "What color is the circle?", "max_new_tokens": 48}).json()["answer"]
    assert not shown.startswith("Error"), shown
    assert shown.strip() == (direct or "(no answer)").strip(), (shown, direct)
    _shot(page, tmp_path, "ask-answer.png")
    page.keyboard.press("Escape")
    page.wait_for_selector("dialog#detail", state="hidden")

    # Search by an example image: that image comes first with score 1.000.
    example = demo.images[5]
    page.set_input_files("#example-file", str(example))
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('like')", timeout=15000)
    _thumbnails_loaded(page)
    first = page.locator("#results .hit").first
    assert first.locator(".name").inner_text() == example.name
    assert first.locator(".score").inner_text() == "1.000"
    assert not errors, errors
    page.close()


def test_page_is_readable_on_a_phone(server, browser, tmp_path):
    url, _ = server
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                            has_touch=True)
    page.goto(url + "/?q=a+blue+square")
    page.wait_for_selector("#results .hit")
    _thumbnails_loaded(page)
    assert page.input_value("#query") == "a blue square"
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    tops = page.evaluate("[...document.querySelectorAll('#results .hit')].slice(0, 3).map(e => e.getBoundingClientRect().top)")
    assert tops[0] == tops[1], "at least two results per row on a phone"
    box = page.locator("#results .hit").first.bounding_box()
    assert box["width"] >= 100
    _shot(page, tmp_path, "phone.png")
    page.close()
