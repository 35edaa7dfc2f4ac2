"""The labelling page in a real headless Chromium (Playwright + Debian's chromium).

Starts uvicorn on a free localhost port in a thread, labels three pairs with the
keyboard only, and finds all three judgments in the JSONL export. Set
MOEFORGE_SCREENSHOT=docs/img/label.png to also save a screenshot of the page.
"""

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} missing (apt-get install -y chromium); the browser test needs Debian's chromium",
                allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="pip install playwright (no `playwright install` needed)")
uvicorn = pytest.importorskip("uvicorn")
from playwright.sync_api import sync_playwright  # noqa: E402

from moeforge.feedback.app import create_app  # noqa: E402
from moeforge.feedback.db import FeedbackDB, export_pairs  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
XSS = "<script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\">"
CANNED = {
    "What is 17 + 25? Show your working.": (
        "Add the tens, then the ones:\n  10 + 20 = 30\n  7 + 5 = 12\n  30 + 12 = 42\nSo 17 + 25 = 42.",
        "17 + 25 = 32, because 7 + 5 = 12 and we carry nothing."),
    "How do I read a file line by line in Python?": (
        "with open(\"notes.txt\", encoding=\"utf-8\") as f:\n    for line in f:\n        print(line.rstrip())",
        f"Use f.read() and split it yourself. {XSS}"),
    "Give three tips for writing clear documentation.": (
        "1. Say what it is for before how it works.\n2. Show one runnable example.\n3. Keep it next to the code.",
        "Documentation is important. Write it."),
}


def canned(prompt):
    return CANNED[prompt]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    db = tmp_path / "labels.db"
    token = FeedbackDB(db).add_labeller("tester")
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(db, canned, list(CANNED)), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", token, db
    srv.should_exit = True
    thread.join(timeout=10)


def test_label_three_pairs_with_the_keyboard(server, tmp_path):
    url, token, db = server
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.set_default_timeout(30_000)
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)  # CSP violations too
            page.goto(f"{url}/#token={token}")
            page.wait_for_selector("body[data-pair-id]")
            assert "token" not in page.url  # the token left the address bar

            def next_pair(old: str) -> str:
                # selector waits, not wait_for_function: the page's CSP (rightly) forbids eval
                page.wait_for_selector(f'body[data-pair-id]:not([data-pair-id="{old}"])')
                return page.get_attribute("body", "data-pair-id")

            # pair 1: rate with the keyboard (focus a radio, arrows move within its group), then "1" = A better
            first = page.get_attribute("body", "data-pair-id")
            page.focus('input[name="a-accuracy"][value="3"]')
            page.keyboard.press("Space")
            page.keyboard.press("ArrowRight")  # 3 -> 4
            page.focus('input[name="b-accuracy"][value="2"]')
            page.keyboard.press("Space")
            page.keyboard.press("1")
            second = next_pair(first)

            # pair 2: the model's <script> is shown as text and never runs; "b" = B better
            shown = page.text_content("#answer-b")
            assert "<script>" in shown and page.locator("#answer-b img, #answer-b script").count() == 0
            assert page.evaluate("window.pwned") is None
            page.keyboard.press("b")
            third = next_pair(second)

            # pair 3: write a better answer (typing "a" or "x" must not trigger a shortcut), Esc, "x" = both bad
            page.focus("#better")
            page.keyboard.type("Three tips: lead with purpose, show an example, keep docs close to code.")
            page.keyboard.press("Escape")
            assert page.get_attribute("body", "data-pair-id") == third  # nothing submitted while typing
            if os.environ.get("MOEFORGE_SCREENSHOT"):
                page.focus('input[name="b-relevance"][value="2"]')
                page.keyboard.press("Space")
                page.evaluate("document.activeElement.blur()")
                page.screenshot(path=os.environ["MOEFORGE_SCREENSHOT"], full_page=True)
            page.keyboard.press("x")
            page.wait_for_selector(f'#status:has-text("Saved pair #{third}")')
            # the counter comes from a second request (refreshProgress) after the status line:
            # wait for it (reading at once failed once on a loaded host: "2 judged")
            page.wait_for_selector('#who:has-text("3 judged")', timeout=10_000)
            assert "3 judged" in page.text_content("#who")
            assert errors == []
        finally:
            browser.close()

    out = tmp_path / "export.jsonl"
    assert export_pairs(db, out) == 1 + 1 + 2  # both bad + a better answer -> (better, A) and (better, B)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    p1, p2 = list(CANNED)[0], list(CANNED)[1]
    assert rows[0]["prompt"] == p1 and rows[0]["chosen"] == CANNED[p1][0] and rows[0]["choice"] == "a"
    assert rows[0]["ratings"]["chosen"]["accuracy"] == 4 and rows[0]["ratings"]["rejected"]["accuracy"] == 2
    assert rows[1]["prompt"] == p2 and rows[1]["chosen"] == CANNED[p2][1] and rows[1]["choice"] == "b"
    assert XSS in rows[1]["chosen"]  # stored and exported verbatim
    assert {r["choice"] for r in rows[2:]} == {"both_bad"}
    assert all(r["chosen"].startswith("Three tips") and r["labeller"] == "tester" for r in rows[2:])
