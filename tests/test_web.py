"""The chat page of `ovchat serve`, in a real browser (Debian's chromium, driven by Playwright)
against a real server on the demo model and Qwen2.5-Coder-0.5B: the key asked for once, a reply
streaming in, Stop and Esc, switching models (one loading on demand), conversations kept across a
reload and exported in `/save`'s format, the busy server's 429 shown as a message, a phone's width
in dark mode, and the Content-Security-Policy that keeps scripts to the page's own files.

The browser is found at $OVCHAT_CHROMIUM or as `chromium` on PATH; without one these tests skip,
unless OVCHAT_REQUIRE_BROWSER is set (CI sets it: `.ci/run` installs chromium when missing).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time

import httpx2
import pytest

from server_helpers import KEY, in_process_app, start_server

pytestmark = pytest.mark.slow

SOURCE_LIMIT = 100 * 1024
CAPITAL = "What is the capital of France?"
COUNTING = "Count from 1 to 500, one number per line."


def expect(locator):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def _chromium() -> str:
    found = os.environ.get("OVCHAT_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if found is None or not os.path.exists(found):
        message = "no chromium to drive: install Debian's chromium (apt-get install chromium) or set OVCHAT_CHROMIUM"
        if os.environ.get("OVCHAT_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("OVCHAT_REQUIRE_BROWSER"):
            pytest.fail("playwright is not installed (it is in the test extra)")
        pytest.skip("playwright is not installed (it is in the test extra)")
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start.
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(demo_model, qwen_model):
    """The store (demo and qwen, nothing loaded at start) behind an API key."""
    s = start_server(None, "--api-key", KEY, "--keep-alive", "-1")
    yield s
    s.proc.kill()


class Page:
    """One browser tab on the chat page, with what the tests look at."""

    def __init__(self, context, url: str):
        self.context = context
        self.page = context.new_page()
        self.errors = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: self.errors.append(f"a dialog opened: {d.message}"))
        self.response = self.page.goto(url + "/")

    def give_key(self, key: str = KEY) -> None:
        self.page.locator("#key-dialog[open]").wait_for(timeout=15_000)
        self.page.fill("#key", key)
        self.page.press("#key", "Enter")

    def models(self):
        self.page.locator("#model option").first.wait_for(state="attached", timeout=30_000)
        return self.page.locator("#model option").all_inner_texts()

    def ask(self, text: str) -> None:
        self.page.fill("#prompt", text)
        self.page.press("#prompt", "Enter")

    def replies(self):
        return self.page.locator(".msg.assistant:not(.pending) .body")

    def wait_done(self, count: int, timeout: float = 180_000) -> str:
        """The count-th reply's text, once its statistics line shows it is finished."""
        self.page.locator(".msg.assistant .stats").nth(count - 1).wait_for(timeout=timeout)
        return self.replies().nth(count - 1).inner_text()

    def stats(self, n: int) -> str:
        return self.page.locator(".msg.assistant .stats").nth(n - 1).inner_text()

    def settings(self, **values: str) -> None:
        if self.page.locator("#settings").is_hidden():
            self.page.click("#toggle-settings")
        for field, value in values.items():
            self.page.fill(f"#{field}", value)
            self.page.locator(f"#{field}").dispatch_event("change")


@pytest.fixture
def context(browser):
    context = browser.new_context(accept_downloads=True)
    yield context
    context.close()


def test_the_page_is_one_small_offline_page_under_a_strict_policy(demo_model):
    """No browser needed: what the server sends for / and its files."""
    from starlette.testclient import TestClient

    client = TestClient(in_process_app(demo_model, api_key=KEY))
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "unsafe" not in policy
    assert "frame-ancestors 'none'" in policy and page.headers["x-content-type-options"] == "nosniff"
    # Everything the page loads comes from the server itself (the box may be offline).
    linked = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert linked and all(u.startswith("/web/") for u in linked), linked
    total = len(page.content)
    for url in linked:
        got = client.get(url)  # no key: the page must load before it can ask for one
        assert got.status_code == 200, url
        assert got.headers["content-security-policy"] == policy
        total += len(got.content)
        for imported in re.findall(r'from "\./([\w.]+)"', got.text):
            total += len(client.get("/web/" + imported).content)
    assert total < SOURCE_LIMIT, total
    assert "<script>" not in page.text and not re.search(r"\son\w+=", page.text)  # no inline script or handler
    # The API itself still wants the key, and a path outside the page's files is not a file.
    assert client.get("/v1/models").status_code == 401
    assert client.get("/web/../pyproject.toml").status_code in (401, 404)
    assert client.get("/web/chat.js.map").status_code == 401  # not a page file: behind the key like the API
    off = TestClient(in_process_app(demo_model, web=False))
    assert off.get("/").status_code == 404


def test_chat_streams_stops_and_keeps_conversations(server, context):
    tab = Page(context, server.url)
    assert tab.response.status == 200
    assert "script-src 'self'" in tab.response.headers["content-security-policy"]
    tab.give_key()
    assert set(tab.models()) >= {"smollm2-135m", "qwen2.5-coder-0.5b"}
    tab.page.select_option("#model", "smollm2-135m")

    # A reply streams in: its text grows through several states, each a prefix of the last.
    tab.settings(**{"max-tokens": "48"})
    tab.ask("Write a short poem about the sea.")
    seen = []
    stats = tab.page.locator(".msg.assistant .stats")
    deadline = time.monotonic() + 180
    while stats.count() == 0 and time.monotonic() < deadline:
        text = tab.page.locator(".msg.assistant .body").first.inner_text()
        if text and text not in ("…", "Loading smollm2-135m…") and (not seen or seen[-1] != text):
            seen.append(text)
        time.sleep(0.01)
    final = tab.wait_done(1)
    assert len(seen) >= 3, seen
    assert len(seen[0]) < len(seen[-1]) <= len(final) and seen[0].split()[0] in final, (seen, final)
    assert re.search(r"\d+ tokens · [\d.]+ tok/s · first token [\d.]+ s · smollm2-135m", tab.stats(1)), tab.stats(1)

    # Shift+Enter is a new line, not a send.
    tab.page.fill("#prompt", "one")
    tab.page.press("#prompt", "Shift+Enter")
    tab.page.type("#prompt", "two")
    assert tab.page.input_value("#prompt") == "one\ntwo"
    assert tab.page.locator(".msg.user").count() == 1

    # A long reply, stopped by Esc: the text stops growing, the server is told (the request ends
    # as "client left mid-stream"), and the page is ready for the next message.
    tab.page.click("#new-chat")
    tab.settings(**{"max-tokens": "2000"})
    tab.ask(COUNTING)
    tab.page.locator(".msg.assistant:not(.pending)").wait_for(timeout=180_000)
    tab.page.locator("#stop").wait_for(state="visible")
    tab.page.keyboard.press("Escape")
    tab.wait_done(1)
    assert "stopped" in tab.stats(1)
    assert tab.page.locator("#send").is_visible() and tab.page.locator("#stop").is_hidden()
    cut = tab.replies().first.inner_text()
    time.sleep(1.0)
    assert tab.replies().first.inner_text() == cut
    deadline = time.monotonic() + 30
    while "client left mid-stream" not in server.log():
        assert time.monotonic() < deadline, server.log()[-2000:]
        time.sleep(0.2)
    assert len(cut.split()) < 1000

    # Switch models: Qwen is not loaded yet, so the page says it is loading, then it answers.
    tab.page.click("#new-chat")
    tab.settings(**{"max-tokens": "64"})
    tab.page.select_option("#model", "qwen2.5-coder-0.5b")
    assert tab.page.inner_text("#model-state") == "loads on first message"
    tab.ask(CAPITAL)
    assert tab.page.inner_text("#model-state") == "loading…"
    assert "Paris" in tab.wait_done(1, timeout=300_000)
    assert tab.stats(1).endswith("qwen2.5-coder-0.5b")
    expect(tab.page.locator("#model-state")).to_have_text("ready")

    # A reload keeps every conversation (this browser's localStorage), the key (this tab's
    # session) and each conversation's model.
    tab.page.reload()
    titles = tab.page.locator("#conversations .title")
    titles.first.wait_for()
    assert titles.all_inner_texts() == [CAPITAL, COUNTING, "Write a short poem about the sea."]
    assert tab.page.locator("#key-dialog[open]").count() == 0
    expect(tab.replies().first).to_contain_text("Paris")
    assert tab.page.input_value("#model") == "qwen2.5-coder-0.5b"
    tab.page.click("#conversations li:nth-child(3) .title")
    assert tab.page.locator(".msg.user").first.inner_text() == "Write a short poem about the sea."
    assert tab.page.input_value("#model") == "smollm2-135m"

    # Rename, then delete one.
    tab.page.click("#conversations li:nth-child(2) .rename")
    tab.page.fill("#conversations li:nth-child(2) input", "Counting")
    tab.page.press("#conversations li:nth-child(2) input", "Enter")
    tab.page.click("#conversations li:nth-child(1) .delete")
    expect(titles).to_have_count(2)
    assert titles.all_inner_texts() == ["Counting", "Write a short poem about the sea."]
    assert tab.errors == []


def test_an_exported_conversation_loads_in_ovchat_chat(server, context, session, tmp_path):
    """Export writes `/save`'s format: ChatSession.load (what `/load` calls) takes it."""
    tab = Page(context, server.url)
    tab.give_key()
    tab.models()
    tab.page.select_option("#model", "smollm2-135m")
    tab.settings(system="You are a geography teacher.", temperature="0.5", **{"max-tokens": "64"})
    tab.ask(CAPITAL)
    answer = tab.wait_done(1)
    with tab.page.expect_download() as download:
        tab.page.click("#conversations li:nth-child(1) .export")
    path = tmp_path / "exported.json"
    download.value.save_as(path)
    data = json.loads(path.read_text())
    assert data["format"] == "ovchat-conversation" and data["model"] == "smollm2-135m"
    session.load(path)
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    assert session.messages[0]["content"] == "You are a geography teacher."
    assert session.messages[1]["content"] == CAPITAL
    plain = re.compile(r"[*_`#]")  # the page shows markdown rendered; the file keeps the reply as written
    assert plain.sub("", session.messages[2]["content"]).split() == plain.sub("", answer).split()
    assert session.options.temperature == 0.5 and session.options.max_new_tokens == 64


def test_a_hostile_reply_is_shown_as_text(server, context):
    """Model output is untrusted. No model here can be made to write an attack on demand, so the
    browser is handed this one reply in place of the server's (Playwright's request routing): the
    page's own rendering code is what is under test. Markdown still renders: code with its copy
    button, a list, a table; a javascript: link stays text."""
    hostile = ("Look: <img src=x onerror=\"document.title='pwned'\"> and <script>document.title='pwned'</script>\n\n"
               "- one\n- two\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
               "[click](javascript:document.title='pwned') and [docs](https://docs.openvino.ai)\n\n"
               "```html\n<b>bold</b>\n```\n")
    pieces = [hostile[i:i + 7] for i in range(0, len(hostile), 7)]
    events = "".join("data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]})
                     + "\n\n" for p in pieces)
    events += "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": len(pieces),
                                                               "total_tokens": 5 + len(pieces)}}) + "\n\ndata: [DONE]\n\n"
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    tab = Page(context, server.url)
    tab.give_key()
    tab.models()
    tab.page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=events))
    tab.ask("Say something nasty.")
    text = tab.wait_done(1)
    reply = tab.page.locator(".msg.assistant .body").first
    assert "<img src=x onerror=" in text and "<script>document.title='pwned'</script>" in text
    assert reply.locator("img, script").count() == 0
    assert tab.page.title() == "ovchat"
    assert reply.locator("li").all_inner_texts() == ["one", "two"]
    assert reply.locator("td").all_inner_texts() == ["1", "2"]
    assert reply.locator("a").count() == 1 and reply.locator("a").get_attribute("href") == "https://docs.openvino.ai/"
    assert "[click](javascript:" in text
    assert reply.locator("pre code").inner_text() == "<b>bold</b>" and reply.locator("pre b").count() == 0
    reply.locator(".copy").click()
    expect(reply.locator(".copy")).to_have_text("Copied")
    assert tab.page.evaluate("() => navigator.clipboard.readText()") == "<b>bold</b>"
    assert tab.errors == []


def test_serve_no_web_leaves_the_page_out(demo_model):
    s = start_server(None, "--no-web")
    try:
        assert httpx2.get(s.url + "/", timeout=10).status_code == 404
        assert "chat page" not in s.log()
    finally:
        s.proc.kill()


def test_a_busy_server_is_a_message_and_the_question_stays(demo_model, browser):
    """One slot, no queue: while another client holds the slot, the page's request gets the real
    server's 429, shown as a message; the question goes back into the box."""
    s = start_server(demo_model, "--max-concurrency", "1", "--max-queue", "0")
    holding = threading.Event()
    stop = threading.Event()

    def hold_the_slot() -> None:
        with httpx2.stream("POST", s.url + "/v1/chat/completions", timeout=300, json={
                "model": s.model, "stream": True, "max_tokens": 4000,
                "messages": [{"role": "user", "content": COUNTING}]}) as response:
            for _ in response.iter_lines():
                holding.set()
                if stop.is_set():
                    return

    holder = threading.Thread(target=hold_the_slot, daemon=True)
    holder.start()
    context = browser.new_context()
    try:
        assert holding.wait(180)
        tab = Page(context, s.url)
        tab.models()
        assert f"chat page: {s.url}/" in s.log()
        tab.ask(CAPITAL)
        error = tab.page.locator(".msg.error")
        error.wait_for(timeout=60_000)
        assert "busy" in error.inner_text() and "429" in error.inner_text()
        assert tab.page.input_value("#prompt") == CAPITAL
        assert tab.page.locator(".msg.user").count() == 0
        assert tab.errors == []
    finally:
        stop.set()
        context.close()
        holder.join(60)
        s.proc.kill()


def test_a_phone_in_dark_mode(server, browser):
    # Reduced motion: the list slides in without a transition, so what is measured has settled.
    context = browser.new_context(viewport={"width": 390, "height": 844}, color_scheme="dark", is_mobile=True,
                                  reduced_motion="reduce")
    try:
        tab = Page(context, server.url)
        tab.give_key()
        tab.models()
        page = tab.page
        background = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
        assert sum(map(int, re.findall(r"\d+", background)[:3])) < 150, background
        # The list of conversations is out of the way until asked for; the box fits the screen.
        assert not page.locator("#sidebar").is_visible() or page.locator("#sidebar").bounding_box()["x"] < -100
        page.click("#open-sidebar")
        page.locator("#new-chat").wait_for(state="visible")
        assert page.locator("#sidebar").bounding_box()["x"] == 0
        page.click("#close-sidebar")
        assert page.locator("#sidebar").bounding_box()["x"] < -100
        box = page.locator("#prompt").bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390
        width = page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= 390, width
        assert tab.errors == []
    finally:
        context.close()
