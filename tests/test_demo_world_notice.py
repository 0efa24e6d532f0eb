"""Issue 23: the demo model says where it is blind, on every surface. A collection on `demo` that holds
images from outside the shapes world makes `search`, `ask`, `info` (text and JSON), the REST responses
and the page warn; a collection of shapes scenes stays quiet; the record is made at each commit, so an
interrupted `f2b index` already knows."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fwd2bot_index.api import create_app
from fwd2bot_index.cli.main import app
from fwd2bot_index.synthetic import write_demo_data

runner = CliRunner()
LOCAL = "http://127.0.0.1:8000"
CHROMIUM = os.environ.get("F2B_CHROMIUM", "/usr/bin/chromium")


def _indexed(root: Path, photos: int, scenes: int, write_photo=None) -> Path:
    images = root / "images"
    if scenes:
        write_demo_data(root / "d", n=scenes, seed=1)
        shutil.copytree(root / "d" / "images", images)
    images.mkdir(exist_ok=True)
    for i in range(photos):
        write_photo(images / f"IMG_{i}.jpg", seed=i)
    coll = root / "c"
    done = runner.invoke(app, ["index", str(images), "-c", str(coll), "--device", "cpu"])  # the demo model
    assert done.exit_code == 0, done.output
    return coll


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, write_photo) -> Path:
    return _indexed(tmp_path_factory.mktemp("mixed"), photos=3, scenes=4, write_photo=write_photo)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return _indexed(tmp_path_factory.mktemp("shapes"), photos=0, scenes=5)


def _warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("warning: ")]


def test_info_search_and_ask_warn_on_a_mixed_collection(mixed):
    info = runner.invoke(app, ["info", "-c", str(mixed), "--json"])
    data = json.loads(info.stdout)
    assert data["demo_world"] == {"checked": 7, "outside": 3}
    assert "3 of the 7 images" in data["warning"] and "--model" in data["warning"]
    text = runner.invoke(app, ["info", "-c", str(mixed)])
    assert text.exit_code == 0 and len(_warnings(text.stderr)) == 1 and "indexed      7 images" in text.stdout
    search = runner.invoke(app, ["search", "a red circle", "-c", str(mixed), "-k", "3", "--local", "--json"])
    assert search.exit_code == 0, search.output
    assert len(json.loads(search.stdout)) == 3  # stdout stays the hit list
    assert [w[len("warning: "):] for w in _warnings(search.stderr)] == [data["warning"]]
    ask = runner.invoke(app, ["ask", "1", "what color is the shape?", "-c", str(mixed), "--local"])
    assert ask.exit_code == 0 and len(_warnings(ask.stderr)) == 1, ask.output


def test_indexing_more_shapes_into_a_mixed_collection_still_warns(mixed, tmp_path):
    coll = tmp_path / "c"
    shutil.copytree(mixed, coll)
    write_demo_data(tmp_path / "more", n=3, seed=9)
    more = runner.invoke(app, ["index", str(tmp_path / "more" / "images"), "-c", str(coll), "--device", "cpu"])
    assert more.exit_code == 0 and "indexed 3 new" in more.stdout, more.output
    assert len(_warnings(more.stderr)) == 1 and "3 of the 10 images" in more.stderr, more.stderr


def test_a_shapes_collection_is_quiet(shapes):
    data = json.loads(runner.invoke(app, ["info", "-c", str(shapes), "--json"]).stdout)
    assert data["demo_world"] == {"checked": 5, "outside": 0} and data["warning"] is None
    search = runner.invoke(app, ["search", "a red circle", "-c", str(shapes), "-k", "2", "--local"])
    assert search.exit_code == 0 and not _warnings(search.stderr), search.output


def test_removing_the_photos_ends_the_warning(mixed, tmp_path):
    coll = tmp_path / "c"
    shutil.copytree(mixed, coll)
    photos = sorted(str(p) for p in (mixed.parent / "images").glob("IMG_*.jpg"))
    assert runner.invoke(app, ["remove", *photos, "-c", str(coll)]).exit_code == 0
    data = json.loads(runner.invoke(app, ["info", "-c", str(coll), "--json"]).stdout)
    assert data["demo_world"] == {"checked": 4, "outside": 0} and data["warning"] is None


def test_rest_responses_carry_the_warning(mixed, shapes):
    from fastapi.testclient import TestClient

    from fwd2bot_index.service import open_service

    for coll, warned in ((mixed, True), (shapes, False)):
        with open_service(collection=coll, device="cpu") as service:
            service.preload()  # as `f2b serve` does before it answers
            client = TestClient(create_app(service), base_url=LOCAL)
            search = client.post("/v1/search", json={"query": "a red circle", "k": 2}).json()
            assert len(search["results"]) == 2
            like = client.post("/v1/search", json={"like": 1, "k": 2}).json()
            ask = client.post("/v1/images/1/ask", json={"question": "what color?", "max_new_tokens": 4}).json()
            info = client.get("/v1/collection").json()
            if warned:
                assert "not from the shapes world" in search["warning"]
                assert like["warning"] == search["warning"] == ask["warning"] == info["warning"]
            else:
                assert "warning" not in search and "warning" not in like
                assert ask["warning"] is None and info["warning"] is None


def test_an_interrupted_index_already_knows(tmp_path, write_photo, interrupt_after_first_commit):
    """The check is recorded with each commit: Ctrl-C after the first batch of photos, and both the
    interrupted run and `info` warn (the hold hook makes the interruption land after that commit)."""
    (tmp_path / "photos").mkdir()
    for i in range(6):
        write_photo(tmp_path / "photos" / f"IMG_{i}.jpg", seed=10 + i)
    coll, marker = tmp_path / "c", tmp_path / "held"
    cmd = [sys.executable, "-m", "fwd2bot_index.cli", "index", str(tmp_path / "photos"), "-c", str(coll),
           "--batch-size", "2", "--device", "cpu"]
    returncode, stderr, committed = interrupt_after_first_commit(cmd, marker)
    assert returncode == 130, stderr
    assert len(_warnings(stderr)) == 1 and f"{committed} of the {committed} images" in stderr, stderr
    data = json.loads(runner.invoke(app, ["info", "-c", str(coll), "--json"]).stdout)
    assert data["indexed"] == committed and data["demo_world"]["outside"] == committed


def test_the_page_shows_a_banner(mixed, shapes):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"Chromium not found at {CHROMIUM}: apt-get install -y chromium (or set F2B_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    from fwd2bot_index.api import make_server
    from fwd2bot_index.api.testing import LiveServer, free_port

    args = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        try:
            for coll, warned in ((mixed, True), (shapes, False)):
                live = LiveServer(server=make_server(coll, port=free_port(), writable=False, log_level="warning",
                                                     device="cpu"))
                with live as url:
                    live.wait_ready()
                    page = browser.new_page()
                    page.goto(url + "/")
                    page.wait_for_function("() => !document.querySelector('#collection-info')"
                                           ".textContent.startsWith('Loading')", timeout=15000)
                    page.get_by_label("Search images by description").fill("a red circle")
                    page.keyboard.press("Enter")
                    page.wait_for_selector("#results .hit", timeout=15000)
                    banner = page.locator("#demo-warning")
                    if warned:
                        assert banner.is_visible() and "not from the shapes world" in banner.inner_text()
                    else:
                        assert not banner.is_visible()
                    page.close()
        finally:
            browser.close()
