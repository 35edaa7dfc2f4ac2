"""Fuzzing the labelling app (hypothesis + FastAPI's TestClient).

``test_feedback.py`` checks a fixed list of bad requests; here hypothesis generates them:
bodies of every JSON shape and type, near-valid judgments with wrong types, huge or
non-finite numbers, lone surrogates, script tags and SQL metacharacters, raw bytes,
oversized bodies, and random or wrong ``Authorization`` headers. Proves, per request:
- no 5xx, ever;
- a judgment is stored (201) only when the request is valid by an independent check of
  the API contract, and then stored verbatim (the text is data, never SQL); an invalid
  request changes no table;
- every response carries the JSON/no-sniff/CSP headers, and no response is HTML that
  reflects input; the page's script inserts text with ``textContent`` only;
- SQL metacharacters and markup in labeller names, prompts and answers are stored and
  served verbatim, and the export after the fuzzing is valid JSONL of valid judgments.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi", reason="the feedback app needs the [app] extra (fastapi, uvicorn, httpx)")
from fastapi.testclient import TestClient  # noqa: E402

from moeforge.feedback.app import MAX_ANSWER_CHARS, STATIC, create_app  # noqa: E402
from moeforge.feedback.db import CHOICES, CRITERIA, FeedbackDB, export_pairs  # noqa: E402

EVIL = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "'; DROP TABLE judgments;--",
        "a' OR '1'='1", '"><svg onload=alert(1)>', "\ud800", "\x00", "Robert'); DELETE FROM pairs;--", "%s%n{0}"]
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                           HealthCheck.too_slow])


def answers(prompt: str) -> tuple[str, str]:
    return f"A {prompt} {EVIL[0]}", f"B {prompt} {EVIL[2]}"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    db = tmp_path_factory.mktemp("fb") / "fb.db"
    token = FeedbackDB(db).add_labeller("Robert'); DROP TABLE labellers;--")
    client = TestClient(create_app(db, answers, [EVIL[0], EVIL[2], "plain"]), raise_server_exceptions=False)
    auth = {"Authorization": f"Bearer {token}"}
    first = client.get("/api/next", headers=auth)
    assert first.status_code == 200 and first.json()["prompt"] == EVIL[0]  # served verbatim, as data
    assert first.json()["answer_a"].endswith(EVIL[0])
    return client, db, auth


def _count(db) -> int:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]


def _strict_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def valid(body) -> bool:
    """The API contract, written independently of the app's pydantic models."""
    if not isinstance(body, dict) or not set(body) <= {"pair_id", "choice", "a", "b", "better_answer"}:
        return False
    if not (_strict_int(body.get("pair_id")) and 1 <= body["pair_id"] <= 2**62 and body.get("choice") in CHOICES):
        return False
    for side in "ab":
        r = body.get(side, {})
        if not isinstance(r, dict) or not set(r) <= set(CRITERIA):
            return False
        if any(v is not None and not (_strict_int(v) and 1 <= v <= 5) for v in r.values()):
            return False
    text = body.get("better_answer", "")
    return isinstance(text, str) and len(text) <= MAX_ANSWER_CHARS and not re.search("[\ud800-\udfff]", text)


def _check_headers(r) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code == 413:  # FastAPI's body limit answers before the app's middleware: fixed text only
        assert r.text == "Content Too Large" and r.headers["content-type"].startswith("text/plain")
        return
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    assert not r.headers.get("content-type", "").startswith("text/html")  # API answers are never HTML


texts = st.one_of(st.sampled_from(EVIL), st.text(max_size=30), st.just("x" * (MAX_ANSWER_CHARS + 1)))
numbers = st.one_of(st.integers(-5, 8), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                    st.none(), texts)
ratings = st.one_of(st.dictionaries(st.sampled_from([*CRITERIA, "vibes", EVIL[0]]), numbers, max_size=3), numbers)
judgments = st.fixed_dictionaries({}, optional={
    "pair_id": st.one_of(st.integers(0, 4), numbers, st.just(2**70)), "choice": st.one_of(st.sampled_from(CHOICES), texts),
    "a": ratings, "b": ratings, "better_answer": texts, EVIL[1]: numbers})
json_any = st.recursive(st.one_of(numbers, texts), lambda c: st.lists(c, max_size=3) | st.dictionaries(texts, c, max_size=3),
                        max_leaves=8)


def _encode(body) -> bytes:
    return json.dumps(body, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")


@SETTINGS
@given(body=st.one_of(judgments, json_any))
def test_fuzzed_judgments_are_stored_only_when_valid_and_verbatim(app, body):
    client, db, auth = app
    before = _count(db)
    r = client.post("/api/judgments", content=_encode(body), headers={**auth, "Content-Type": "application/json"})
    _check_headers(r)
    if r.status_code == 201:
        assert valid(body), body
        assert _count(db) == before + 1
        with sqlite3.connect(db) as con:
            con.row_factory = sqlite3.Row
            row = con.execute("SELECT * FROM judgments WHERE id = ?", (r.json()["judgment_id"],)).fetchone()
        assert row["pair_id"] == body["pair_id"] and row["choice"] == body["choice"]
        assert row["better_answer"] == body.get("better_answer", "")  # verbatim
        for side in "ab":
            for c in CRITERIA:
                assert row[f"{side}_{c}"] == body.get(side, {}).get(c)
    else:
        assert _count(db) == before, (body, r.status_code)
        if valid(body):  # a valid request can only fail for the pair: unknown (404) or judged already (409)
            assert r.status_code in (404, 409), (body, r.status_code, r.text[:200])
        else:
            assert r.status_code in (400, 413, 422), (body, r.status_code, r.text[:200])


@SETTINGS
@given(raw=st.one_of(st.binary(max_size=300), st.sampled_from([b"", b"{", b"[" * 5000, b"1e400", b"NaN",
                                                               b'{"pair_id": 1e999, "choice": "a"}'])),
       ctype=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]))
def test_fuzzed_raw_bodies_never_fail_the_server(app, raw, ctype):
    client, db, auth = app
    before = _count(db)
    r = client.post("/api/judgments", content=raw, headers={**auth, "Content-Type": ctype})
    _check_headers(r)
    assert r.status_code != 201 and _count(db) == before


def test_oversized_body_is_refused(app):
    client, db, auth = app
    body = {"pair_id": 1, "choice": "a", "better_answer": "x" * (200 * 1024)}
    r = client.post("/api/judgments", content=_encode(body), headers={**auth, "Content-Type": "application/json"})
    _check_headers(r)
    assert r.status_code == 413


HEADER = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=60)


@SETTINGS
@given(header=st.one_of(HEADER, HEADER.map(lambda t: "Bearer " + t), st.sampled_from(["Bearer", "Basic abc", ""])),
       path=st.sampled_from(["/api/me", "/api/next", "/api/progress", "/api/judgments"]))
def test_wrong_tokens_get_401_on_every_endpoint(app, header, path):
    client, db, auth = app
    if header.split(" ", 1)[-1].strip() == auth["Authorization"].split()[1]:
        return  # hypothesis cannot guess a 256-bit token, but stay exact
    before = _count(db)
    method = client.post if path == "/api/judgments" else client.get
    kwargs = {"json": {"pair_id": 1, "choice": "a"}} if path == "/api/judgments" else {}
    r = method(path, headers={"Authorization": header.encode("latin-1")}, **kwargs)
    _check_headers(r)
    assert r.status_code == 401 and _count(db) == before


def test_page_renders_text_only_and_export_is_valid(app, tmp_path):
    client, db, auth = app
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert not any(e in page.text for e in EVIL)  # a static page: no model or user text in the HTML
    for js in STATIC.glob("*.js"):
        src = re.sub(r"/\*.*?\*/|//[^\n]*", "", js.read_text(), flags=re.S)  # code, not comments
        assert "textContent" in src
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|new Function", src), js
    n = export_pairs(db, tmp_path / "pairs.jsonl")
    rows = [json.loads(ln) for ln in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == n
    for row in rows:
        assert row["choice"] in CHOICES and isinstance(row["chosen"], str) and isinstance(row["rejected"], str)
        for side in ("chosen", "rejected"):
            r = row["ratings"][side]
            assert r is None or all(v is None or (_strict_int(v) and 1 <= v <= 5) for v in r.values())
            assert not any(isinstance(v, float) and math.isnan(v) for v in (r or {}).values())
    with sqlite3.connect(db) as con:  # the SQL-looking names and texts did nothing to the schema
        names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"labellers", "pairs", "shown", "judgments"} <= names
