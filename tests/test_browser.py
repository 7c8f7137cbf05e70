"""The demo page and the documented SDK example in a real headless Chromium (Debian's
package, driven by Playwright), against a gateway process, through a TCP proxy that the
test cuts mid-answer."""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import require_modules
from tests.fake_upstream import FakeUpstream, Plan
from tests.support import ROOT, SECRET, ServerProcess, metric_value, mint
from tests.tcp_proxy import CuttableProxy
from tests.test_fidelity import expected_from, recorded

pytestmark = pytest.mark.slow

ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
WAIT_MS = 30_000


def words(prefix: str, count: int) -> str:
    """Distinct words, so that a duplicated or a missing token changes the text."""
    return " ".join(f"{prefix}{i:04d}" for i in range(count))


@pytest.fixture(scope="module")
def gateway() -> Iterator[ServerProcess]:
    # Application pings every 0.3 s and no protocol pings: only the SDK's pongs keep a
    # connection alive past 1.5 s, and every test here runs longer than that.
    env = {"GATEWAY_JWT_SECRET": SECRET, "GATEWAY_BACKEND": "echo", "GATEWAY_ECHO_DELAY_MS": "15",
           "GATEWAY_RESUME_GRACE_S": "30", "GATEWAY_WS_PING_INTERVAL_S": "0",
           "GATEWAY_HEARTBEAT_INTERVAL_S": "0.3", "GATEWAY_HEARTBEAT_TIMEOUT_S": "1.5"}
    with ServerProcess(env) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require_modules("playwright")
    executable = shutil.which("chromium")
    if executable is None:
        message = "Chromium is not installed (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " and CI=true")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 900, "height": 1100})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        context.close()
    assert errors == [], errors


def answer_text(page: Any, index: int) -> str:
    return str(page.locator(".answer .text").nth(index).text_content())


def ask(page: Any, prompt: str, max_tokens: int = 4000) -> Any:
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")
    return page.locator(".answer").last


def test_demo_page_streams_cancels_and_survives_a_dropped_connection(gateway: ServerProcess, page: Any) -> None:
    with CuttableProxy(gateway.port) as proxy:
        page.goto(proxy.http + "/")
        page.fill("#token", mint("alice"))
        page.click("#connect")
        page.wait_for_function("document.getElementById('state').textContent === 'connected as alice'",
                               timeout=WAIT_MS)

        # A short answer, streamed and finished.
        short = "hello there from a real browser"
        answer = ask(page, short)
        page.wait_for_selector(".answer[data-state='stop']", timeout=WAIT_MS)
        assert answer_text(page, 0) == short
        assert re.search(r"first token \d+ ms · [\d.]+ tokens/s · 6 tokens · finished: stop",
                         answer.locator(".stats").text_content())

        # A long answer, cancelled while it streams.
        long_prompt = words("c", 1500)
        ask(page, long_prompt)
        page.wait_for_function("document.querySelectorAll('.answer .text')[1].textContent.length > 40",
                               timeout=WAIT_MS)
        page.click("#cancel")
        page.wait_for_selector(".answer[data-state='cancelled']", timeout=WAIT_MS)
        cancelled = answer_text(page, 1)
        assert 40 < len(cancelled) < len(long_prompt) and long_prompt.startswith(cancelled)

        # The network drops mid-answer: the answer resumes and ends whole.
        dropped_prompt = words("d", 250)
        ask(page, dropped_prompt)
        page.wait_for_function(
            "(() => { const a = document.querySelectorAll('.answer')[2];"
            " return !a.dataset.state && a.querySelector('.text').textContent.length > 100; })()",
            timeout=WAIT_MS)
        assert proxy.cut() >= 1
        page.wait_for_selector(".answer[data-state='stop']:nth-child(6)", timeout=WAIT_MS)
        assert answer_text(page, 2) == dropped_prompt
        assert "Reconnected after close 1006" in str(page.text_content("#close-message"))
        assert page.text_content("#state") == "connected as alice"
        assert "250 tokens · finished: stop" in str(page.locator(".answer .stats").nth(2).text_content())
        assert proxy.cuts == 1

        stale = metric_value(httpx.get(gateway.http + "/metrics").text, 'gateway_closes_total{reason="stale"}')
        assert stale == 0, "the page did not answer the server's pings"

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "demo-page.png"), full_page=True)


def connect_page(page: Any, url: str, user: str = "alice") -> None:
    page.goto(url)
    page.fill("#token", mint(user))
    page.click("#connect")
    page.wait_for_function(f"document.getElementById('state').textContent === 'connected as {user}'",
                           timeout=WAIT_MS)


HOSTILE = ('<script>window.__pwned = "script"</script> <img src=x onerror="window.__pwned = \'img\'"> '
           '<svg onload="window.__pwned = \'svg\'"></svg> [link](javascript:window.__pwned=\'link\') **bold**')


def test_the_demo_page_shows_markup_in_an_answer_as_text_and_never_runs_it(gateway: ServerProcess, page: Any) -> None:
    connect_page(page, gateway.http + "/")
    ask(page, HOSTILE)
    page.wait_for_selector(".answer[data-state='stop']", timeout=WAIT_MS)
    # The same markup, put into this page as HTML, does run: the browser would have run it.
    page.evaluate("""() => { const probe = document.createElement('div');
        probe.innerHTML = '<img src=x onerror="window.__control = true">'; document.body.append(probe); }""")
    page.wait_for_function("window.__control === true", timeout=WAIT_MS)
    assert page.evaluate("window.__pwned") is None
    text = page.locator(".answer .text").first
    assert text.locator("script, img, svg, a").count() == 0
    assert text.locator("strong").text_content() == "bold"
    shown = str(text.text_content())
    assert '<script>window.__pwned = "script"</script>' in shown and 'onerror="window.__pwned' in shown
    assert "[link](javascript:" in shown


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def model_gateway(upstream: FakeUpstream) -> Iterator[ServerProcess]:
    """A gateway on the openai backend, whose upstream replays recorded event streams."""
    env = {"GATEWAY_JWT_SECRET": SECRET, "GATEWAY_BACKEND": "openai", "GATEWAY_OPENAI_BASE_URL": upstream.base_url,
           "GATEWAY_WS_PING_INTERVAL_S": "0"}
    with ServerProcess(env) as server:
        yield server


def test_the_demo_page_shows_reasoning_folded_tool_calls_as_cards_and_markdown(
        model_gateway: ServerProcess, upstream: FakeUpstream, page: Any) -> None:
    connect_page(page, model_gateway.http + "/")
    reasoning_body, call_body = recorded("vllm_reasoning"), recorded("ollama_tool_call")
    upstream.plans.extend([Plan(kind="replay", body=reasoning_body), Plan(kind="replay", body=call_body)])

    answer = ask(page, "how many r in strawberry?")
    page.wait_for_selector(".answer[data-state='stop']", timeout=WAIT_MS)
    want = expected_from(reasoning_body)
    assert answer.locator(".reasoning .reasoning-text").text_content() == want.reasoning
    assert answer.locator(".reasoning").evaluate("details => details.open") is False
    text = answer.locator(".text")
    assert text.locator("strong").all_text_contents() == ["3", "r", "rr"]
    assert text.locator("em").all_text_contents() == ["strawberry"]
    assert text.locator("ul > li").count() == 1

    answer = ask(page, "weather in Paris?")
    page.wait_for_selector(".answer[data-state='tool_calls']", timeout=WAIT_MS)
    want = expected_from(call_body)
    assert answer.locator(".reasoning .reasoning-text").text_content() == want.reasoning
    card = answer.locator(".tool-card")
    assert card.count() == 1 and card.get_attribute("data-complete") == "true"
    assert card.locator(".tool-name").text_content() == want.calls[0]["name"]
    assert card.locator(".tool-id").text_content() == want.calls[0]["call_id"]
    assert json.loads(str(card.locator(".tool-args").text_content())) == json.loads(want.calls[0]["arguments"])
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo-page-reasoning-and-tools.png"), full_page=True)


def test_the_demo_page_explains_a_refused_token_and_a_policy_close(gateway: ServerProcess, page: Any) -> None:
    page.goto(gateway.http + "/")
    page.fill("#token", mint("bob", secret="not-the-gateway-secret-0123456789abcdef"))
    page.click("#connect")
    page.wait_for_function("document.getElementById('close-message').textContent.includes('refused the token')",
                           timeout=WAIT_MS)
    # A token that expires while connected: 4001, explained, and no reconnect with the same token.
    page.fill("#token", mint("bob", ttl=-4))  # within the server's 10 s leeway, so accepted at first
    page.click("#disconnect")
    page.click("#connect")
    page.wait_for_function("document.getElementById('state').textContent === 'closed'", timeout=WAIT_MS)
    message = str(page.text_content("#close-message"))
    assert "4001" in message and "get a new token" in message


@pytest.fixture
def other_origin(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A static file server on another port: another origin than the gateway's."""
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def documented_example() -> str:
    text = (ROOT / "docs" / "client-js.md").read_text()
    block = re.search(r"## Ten lines.*?```html\n(.*?)```", text, flags=re.S)
    assert block is not None
    return block.group(1)


def test_the_documented_example_streams_from_another_origin_through_a_drop(
        gateway: ServerProcess, page: Any, other_origin: tuple[str, Path]) -> None:
    example = documented_example()
    assert len(example.strip().splitlines()) == 10
    origin, directory = other_origin
    with CuttableProxy(gateway.port) as proxy:
        # The reader's edits: the gateway's address (here the proxy's) and a token; and a
        # longer prompt, so that the drop lands mid-answer.
        prompt = words("e", 200)
        page_source = (example.replace("127.0.0.1:8000", f"127.0.0.1:{proxy.port}")
                       .replace("PASTE-A-TOKEN", mint("carol"))
                       .replace("Tokens stream into the page one word at a time", prompt)
                       .replace("max_tokens: 64", "max_tokens: 500"))
        (directory / "example.html").write_text(page_source)
        page.goto(origin + "/example.html")
        page.wait_for_function("document.getElementById('out').textContent.length > 80", timeout=WAIT_MS)
        assert proxy.cut() >= 1
        page.wait_for_function("document.getElementById('out').dataset.finish === 'stop'", timeout=WAIT_MS)
        assert page.text_content("#out") == prompt
        assert proxy.cuts == 1
