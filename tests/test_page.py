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

    # Type a query and press Enter: a grid of thumbnails with scores, verified by default (issue 21): the
    # model's relevance beside each score, best first.
    page.get_by_label("Search images by description").fill("a red circle")
    page.keyboard.press("Enter")
    page.wait_for_selector("#results .hit")
    _thumbnails_loaded(page)
    hits = page.locator("#results .hit")
    assert hits.count() == 24
    relevance = [float(s.split()[-1]) for s in page.locator("#results .hit .relevance").all_inner_texts()]
    assert len(relevance) == 24 and relevance == sorted(relevance, reverse=True)
    expected = httpx.post(url + "/v1/search", json={"query": "a red circle", "k": 24, "verify": 24}).json()["results"]
    assert [int(h.get_attribute("data-id")) for h in hits.all()] == [h["id"] for h in expected]
    shown = [float(s) for s in page.locator("#results .hit .score").all_inner_texts()]
    assert shown == [round(h["score"], 3) for h in expected]  # the cosine stays what the score says
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


@pytest.fixture(scope="module")
def panorama_server(tmp_path_factory):
    """A private copy of the demo collection plus one 1200x100 panorama, served read-only."""
    from PIL import Image

    from fwd2bot_index.service import open_service

    demo = demo_collection(tmp_path_factory.getbasetemp() / "api-demo", n=40, seed=0)
    root = tmp_path_factory.mktemp("pano")
    coll = demo.copy(root / "collection")
    (root / "wide").mkdir()
    strip = Image.linear_gradient("L").resize((1200, 100)).convert("RGB")
    strip.save(root / "wide" / "panorama.png")
    with open_service(collection=coll, model=str(demo.model_dir), writable=True) as service:
        assert service.index([root / "wide"]).indexed == 1
    live = LiveServer(server=make_server(coll, model=str(demo.model_dir), port=free_port(), writable=False,
                                         log_level="warning"))
    with live as url:
        live.wait_ready()
        yield url, root / "wide" / "panorama.png"


def test_no_good_match_state_and_panorama_keeps_its_shape(panorama_server, browser, tmp_path):
    """Issue 14: below the score floor the page says "no good match" and dims results; thumbnails are
    letterboxed in their square tiles, not cropped or stretched."""
    url, panorama = panorama_server
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url + "/?q=a+red+circle&floor=2")  # no cosine reaches 2: nothing is a good match
    page.wait_for_selector("#results .hit")
    status = page.inner_text("#status")
    assert "no good match" in status and "24 results" in status, status
    assert page.locator("#results .hit.weak").count() == 24 and page.locator("#results .divider").count() == 0
    page.goto(url + "/?q=a+red+circle&floor=-2")  # everything passes: no dimming, no divider
    page.wait_for_selector("#results .hit")
    assert page.locator("#results .hit.weak").count() == 0 and "no good match" not in page.inner_text("#status")
    scores = httpx.post(url + "/v1/search", json={"query": "a red circle", "k": 24}).json()["results"]
    middle = (scores[3]["score"] + scores[4]["score"]) / 2
    if scores[3]["score"] > scores[4]["score"]:  # a floor between the 4th and 5th result
        page.goto(url + f"/?q=a+red+circle&floor={middle}")
        page.wait_for_selector("#results .hit")
        assert page.locator("#results .hit:not(.weak)").count() == 4
        assert page.locator("#results .divider").count() == 1 and "4 above score" in page.inner_text("#status")
    page.set_input_files("#example-file", str(panorama))
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('like')", timeout=15000)
    _thumbnails_loaded(page)
    first = page.locator("#results .hit").first
    assert first.locator(".name").inner_text() == "panorama.png"
    shape = first.locator("img").evaluate("""(img) => {
        const box = img.getBoundingClientRect();
        return {fit: getComputedStyle(img).objectFit, natural: img.naturalWidth / img.naturalHeight,
                box: box.width / box.height};
    }""")
    assert shape["fit"] == "contain" and abs(shape["box"] - 1) < 0.02, shape
    assert shape["natural"] > 10, shape  # the server kept the 12:1 shape; `contain` shows all of it
    _shot(page, tmp_path, "panorama.png")
    page.close()


def test_verified_search_says_no_good_match_by_relevance(server, browser, tmp_path):
    """Issue 21: the page verifies text searches; when no hit reaches the relevance cutoff it says "no good
    match" with the nearest hits dimmed; hits above it are not dimmed; ?verify=0 falls back to the cosine."""
    url, _ = server
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url + "/?q=a+red+circle&min_relevance=1")  # no probability reaches 1: nothing is a good match
    page.wait_for_selector("#results .hit")
    status = page.inner_text("#status")
    assert "no good match" in status and "relevance" in status and "24 results" in status, status
    assert page.locator("#results .hit.weak").count() == 24
    _shot(page, tmp_path, "verified-no-good-match.png")
    page.goto(url + "/?q=a+red+circle&min_relevance=0")  # every verified hit passes
    page.wait_for_selector("#results .hit")
    assert page.locator("#results .hit.weak").count() == 0 and "no good match" not in page.inner_text("#status")
    found = httpx.post(url + "/v1/search", json={"query": "a red circle", "k": 24, "verify": 24}).json()["results"]
    cut = (found[3]["relevance"] + found[4]["relevance"]) / 2
    if found[3]["relevance"] > found[4]["relevance"]:  # a cutoff between the 4th and 5th hit
        page.goto(url + f"/?q=a+red+circle&min_relevance={cut}")
        page.wait_for_selector("#results .hit")
        assert page.locator("#results .hit:not(.weak)").count() == 4
        assert "4 above relevance" in page.inner_text("#status")
    page.goto(url + "/?q=a+red+circle&verify=0")
    page.wait_for_selector("#results .hit")
    assert page.locator("#results .hit .relevance").count() == 0
    page.close()


def test_docs_work_with_no_network(server, browser, tmp_path):
    """/docs renders Swagger UI from the package's own assets while every non-local request is refused."""
    url, _ = server
    html = httpx.get(url + "/docs").text
    assert "cdn." not in html and "/docs-assets/swagger-ui-bundle.js" in html
    assert httpx.get(url + "/docs-assets/swagger-ui-bundle.js").status_code == 200
    page = browser.new_page()
    outside: list[str] = []

    def only_local(route):
        if route.request.url.startswith(url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.goto(url + "/docs")
    page.wait_for_selector(".swagger-ui .opblock", timeout=20000)
    assert page.locator(".swagger-ui .opblock").count() >= 5
    assert not [u for u in outside if not u.startswith("data:")], outside
    page.goto(url + "/redoc")
    page.wait_for_selector("redoc [role=navigation], .menu-content", timeout=20000)
    _shot(page, tmp_path, "docs.png")
    page.close()


@pytest.fixture(scope="module")
def unhelpful_relevance_server(tmp_path_factory):
    """The demo images indexed with a copy of the demo model whose config says its recipe measured that
    re-ranking by its relevance makes search worse (``relevance_ranks_well`` False, as earlier demo models'
    measurement wrote), served read-only."""
    import shutil

    import fwd2bot_index
    from fwd2bot_index.model.config import Fwd2BotConfig
    from fwd2bot_index.service import open_service

    shipped = Path(fwd2bot_index.__file__).parent / "demo_model"  # the package's, editable or installed
    model = tmp_path_factory.mktemp("unhelpful-model") / "demo_model"
    shutil.copytree(shipped, model)
    config = Fwd2BotConfig.read(model)
    config.relevance_ranks_well = False
    (model / "fwd2bot_config.json").write_text(config.to_json(), encoding="utf-8")
    demo = demo_collection(tmp_path_factory.getbasetemp() / "api-demo", n=40, seed=0)
    collection = tmp_path_factory.mktemp("unhelpful") / "collection"
    with open_service(collection=collection, model=str(model), create=True) as service:
        assert service.index([demo.data_dir / "images"]).indexed == 40
    live = LiveServer(server=make_server(collection, model=str(model), port=free_port(), writable=False,
                                         log_level="warning"))
    with live as url:
        live.wait_ready()
        yield url


def test_page_searches_unverified_when_the_model_says_its_relevance_does_not_help(unhelpful_relevance_server,
                                                                                   browser, server):
    """With a model whose relevance was measured to make ranking worse, text searches are not verified
    unless the address asks (?verify=N); a model that says nothing (the other server's) still verifies."""
    url = unhelpful_relevance_server
    assert httpx.get(url + "/v1/collection").json()["verify_by_default"] is False
    assert httpx.get(server[0] + "/v1/collection").json()["verify_by_default"] is True
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url + "/?q=a+red+circle")
    page.wait_for_selector("#results .hit")
    assert page.locator("#results .hit .relevance").count() == 0
    assert "relevance" not in page.inner_text("#status")
    page.goto(url + "/?q=a+red+circle&verify=24")
    page.wait_for_selector("#results .hit .relevance")
    assert page.locator("#results .hit .relevance").count() == 24
    page.close()
