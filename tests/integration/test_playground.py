"""The playground page at `/`, driven by a real browser (Debian's chromium through Playwright)
against the real app: stream a generation, watch the Output grow, find it in History, give
feedback and find it stored. Writes docs/img/playground.png for the README."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, start_app, stop_app

pytestmark = pytest.mark.integration
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the dev extra) missing")
expect = sync_api.expect

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = ROOT / "docs" / "img" / "playground.png"
API_KEY = "playground-test-key"
WAIT_MS = 60_000


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: apt-get install chromium (.ci/run installs it)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def keyed_app(tmp_path_factory, redis_server):
    """The tiny app with API keys configured (env API_KEYS), started for this module."""
    workdir = tmp_path_factory.mktemp("keyed-app")
    proc, app = start_app(
        ROOT / "configs" / "tiny.yaml",
        workdir,
        redis_server.url,
        env={"API_KEYS": f"playground={API_KEY}"},
    )
    try:
        yield app
    finally:
        stop_app(proc)


@pytest.fixture(params=["keys-off", "keys-on"])
def served(request):
    """(app, key): the session app without keys, or one that needs `key`."""
    if request.param == "keys-off":
        return request.getfixturevalue("tiny_app"), None
    return request.getfixturevalue("keyed_app"), API_KEY


class Watched:
    """A page whose script errors, console errors and off-origin requests are collected."""

    def __init__(self, browser, base_url: str) -> None:
        self.base_url = base_url
        self.context = browser.new_context(viewport={"width": 1280, "height": 720})
        self.page = self.context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.problems: list[str] = []
        self.page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        self.page.on("console", self._console)
        self.page.on("request", self._request)

    def _console(self, message) -> None:
        # A failed fetch logs its status (e.g. a 422 on bad input, a 401 before the key):
        # those the page shows; any other console error is a defect.
        if message.type == "error" and "Failed to load resource" not in message.text:
            self.problems.append(f"console: {message.text}")

    def _request(self, request) -> None:
        if not request.url.startswith(self.base_url + "/"):
            self.problems.append(f"off-origin request: {request.url}")

    def open(self, key: str | None):
        page = self.page
        page.goto(self.base_url + "/")
        if key is not None:
            # Keys on: the first API call is refused, and the page asks for a key.
            key_field = page.get_by_label("API key")
            key_field.wait_for()
            refusal = httpx.get(self.base_url + "/v1/models").json()["error"]["message"]
            alert = page.get_by_role("alert")
            assert alert.inner_text() == refusal
            key_field.fill("not-the-key")  # refused again, with the API's message
            page.get_by_role("button", name="Use key").click()
            expect(alert).to_have_text(refusal)
            key_field.fill(key)
            page.get_by_role("button", name="Use key").click()
            expect(alert).to_be_hidden()
            # Kept for this tab only: sessionStorage, never localStorage.
            stored = page.evaluate("() => Object.values(sessionStorage)")
            assert stored == [key] and page.evaluate("() => localStorage.length") == 0
        picker = page.get_by_label("Model", exact=True)
        page.wait_for_function("() => document.getElementById('model').options.length > 0")
        assert picker.locator("option").all_inner_texts() == ["tiny-a", "tiny-b", "tiny-c"]
        return page


@pytest.fixture
def watched(browser):
    made: list[Watched] = []

    def make(base_url: str) -> Watched:
        made.append(Watched(browser, base_url))
        return made[-1]

    yield make
    for w in made:
        w.context.close()
        assert w.problems == []


def api(app, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return app.client(headers=headers)


def watch_output_lengths(page) -> None:
    """Record the Output's text length at every change of it (from inside the page, so no
    step of the stream is missed between two polls)."""
    page.get_by_role("region", name="Output").evaluate(
        """el => {
            window.outputLengths = [];
            new MutationObserver(() => window.outputLengths.push(el.textContent.length))
                .observe(el, {childList: true, characterData: true, subtree: true});
        }"""
    )


def fill_and_generate(page, prompt: str, model: str, max_tokens: int, seed: int | None = 7):
    page.get_by_label("Prompt").fill(prompt)
    page.get_by_label("Model", exact=True).select_option(model)
    page.get_by_label("Max tokens").fill(str(max_tokens))
    page.get_by_label("Temperature").fill("0.9")
    page.get_by_label("Top p").fill("0.95")
    page.get_by_label("Seed").fill("" if seed is None else str(seed))
    shown = page.get_by_role("list", name="History").get_by_text(prompt, exact=True)
    before = shown.count()
    page.get_by_role("button", name="Generate").click()
    # Done when the History (reloaded after the stream's last event) shows one more of it.
    expect(shown).to_have_count(before + 1, timeout=WAIT_MS)
    return page.get_by_role("list", name="Stats")


def test_stream_history_feedback(served, watched):
    app, key = served
    with api(app, key) as client:  # load the model first: the badges then show a warm TTFT
        warm = {"prompts": [unique("warm up")], "model": "tiny-c", "max_new_tokens": 1}
        assert client.post("/generate", json=warm).status_code == 200
    page = watched(app.base_url).open(key)
    prompt = unique("The lighthouse keeper")
    watch_output_lengths(page)
    stats = fill_and_generate(page, prompt, "tiny-c", max_tokens=120)

    with api(app, key) as client:
        newest = client.get("/history", params={"model": "tiny-c", "limit": 1}).json()["items"]
    (record,) = newest
    assert record["prompt"] == prompt and record["cached"] is False
    output = page.get_by_role("region", name="Output")
    assert output.inner_text() == prompt + record["completion"]

    # The Output grew in steps while the tokens streamed in, not all at once at the end.
    lengths = page.evaluate("window.outputLengths")
    growing = [n for n in lengths if n > len(prompt)]
    assert growing == sorted(growing), lengths
    assert len(set(growing)) >= 5, lengths
    assert growing[-1] == len(prompt + record["completion"])

    assert stats.get_by_text("cache miss").is_visible()
    ttft = stats.get_by_text(re.compile(r"^TTFT \d+ ms$")).inner_text()
    assert abs(int(ttft.split()[1]) - record["ttft_ms"]) <= 1
    assert re.fullmatch(r"\d+\.\d tokens/s", stats.locator("li").nth(2).inner_text())

    # Newest first: the generation heads the History, with its own feedback buttons.
    history = page.get_by_role("list", name="History")
    first = history.get_by_role("listitem").first
    assert prompt in first.inner_text()
    good = first.get_by_role("button", name="Good")
    good.click()
    first.get_by_text("Saved").wait_for()
    assert good.get_attribute("aria-pressed") == "true"
    assert first.get_by_role("button", name="Bad").get_attribute("aria-pressed") == "false"
    with api(app, key) as client:
        stored = client.get(f"/history/{record['id']}").json()
    assert stored["feedback"]["rating"] == 5

    if key is None:
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))


def test_repeat_shows_cache_hit_and_bad_feedback(tiny_app, watched):
    page = watched(tiny_app.base_url).open(None)
    prompt = unique("Repeat after me")
    fill_and_generate(page, prompt, "tiny-a", max_tokens=12)
    stats = fill_and_generate(page, prompt, "tiny-a", max_tokens=12)
    assert stats.get_by_text("cache hit").is_visible()
    items = page.get_by_role("list", name="History").get_by_role("listitem")
    assert prompt in items.nth(0).inner_text() and prompt in items.nth(1).inner_text()
    assert "cached" in items.nth(0).inner_text()

    items.nth(0).get_by_role("button", name="Bad").click()
    items.nth(0).get_by_text("Saved").wait_for()
    record_id = items.nth(0).get_attribute("data-id")
    with tiny_app.client() as client:
        assert client.get(f"/history/{record_id}").json()["feedback"]["rating"] == 1


def test_history_filters_by_model_and_pages(tiny_app, watched):
    prompts = [unique(f"page {i}") for i in range(11)]
    with tiny_app.client() as client:
        # Eleven on tiny-b (more than a page), then the newest of all on tiny-a.
        for chunk, model in (
            (prompts[:10], "tiny-b"),
            (prompts[10:], "tiny-b"),
            ([unique("other")], "tiny-a"),
        ):
            body = {"prompts": chunk, "model": model, "max_new_tokens": 2}
            assert client.post("/generate", json=body).status_code == 200
    page = watched(tiny_app.base_url).open(None)
    items = page.get_by_role("list", name="History").get_by_role("listitem")
    expect(items.first).to_contain_text(" · tiny-a · ")
    page.get_by_label("Filter by model").select_option("tiny-b")
    expect(items.filter(has_not_text=" · tiny-b · ")).to_have_count(0)
    expect(items).to_have_count(10)
    page.get_by_role("button", name="Older").click()
    page.wait_for_function("() => document.querySelectorAll('#history li').length > 10")
    texts = items.all_inner_texts()
    assert all(" · tiny-b · " in t for t in texts), texts
    assert all(any(p in t for t in texts) for p in prompts)
    ids = [items.nth(i).get_attribute("data-id") for i in range(items.count())]
    assert len(set(ids)) == len(ids)


def test_bad_input_shows_the_api_message(tiny_app, watched):
    page = watched(tiny_app.base_url).open(None)
    with tiny_app.client() as client:
        expected = client.post(
            "/generate", json={"prompts": ["hi"], "temperature": 5, "stream": True}
        ).json()["error"]["message"]
    page.get_by_label("Prompt").fill("hi")
    page.get_by_label("Temperature").fill("5")
    page.get_by_role("button", name="Generate").click()
    alert = page.get_by_role("alert")
    alert.get_by_text(expected).wait_for()
    assert page.get_by_role("button", name="Generate").is_enabled()

    page.get_by_label("Temperature").fill("0.5")
    page.get_by_label("Prompt").fill("   ")
    page.get_by_role("button", name="Generate").click()
    alert.get_by_text("empty").wait_for()


def test_page_and_assets_are_plain_files(tiny_app):
    with tiny_app.client() as client:
        page = client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
            assert client.get(asset).status_code == 200, asset
        assert "http://" not in page.text and "https://" not in page.text
        missing = client.get("/static/nope.js")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
        assert client.get("/docs").status_code == 200


def test_page_is_public_when_keys_are_on(keyed_app):
    with keyed_app.client() as client:
        assert client.get("/").status_code == 200
        assert client.get("/static/playground.js").status_code == 200
        refused = client.get("/v1/models")
        assert refused.status_code == 401 and refused.json()["error"]["message"]
