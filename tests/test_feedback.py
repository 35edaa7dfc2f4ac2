"""The labelling app over HTTP (FastAPI TestClient): auth, validation, escaping, export."""

import json
import sqlite3

import pytest

pytest.importorskip("fastapi", reason="the feedback app needs the [app] extra (fastapi, uvicorn, httpx)")
from fastapi.testclient import TestClient  # noqa: E402

from moeforge.errors import UserError  # noqa: E402
from moeforge.feedback.app import create_app, load_prompts  # noqa: E402
from moeforge.feedback.db import FeedbackDB, export_pairs  # noqa: E402

XSS = "<script>alert('pwned')</script><img src=x onerror=alert(1)>"


def fake_answers(prompt: str) -> tuple[str, str]:
    return f"first answer to {prompt}", f"second answer to {prompt} {XSS}"


@pytest.fixture
def setup(tmp_path):
    db = tmp_path / "fb.db"
    alice = FeedbackDB(db).add_labeller("alice")
    bob = FeedbackDB(db).add_labeller("bob")
    client = TestClient(create_app(db, fake_answers, ["p1 " + XSS, "p2", "p3"]))
    return client, db, {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}


def count(db, table):
    with sqlite3.connect(db) as con:
        return con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def test_auth_required(setup):
    client, db, alice, _ = setup
    for method, path in [("get", "/api/next"), ("get", "/api/progress"), ("post", "/api/judgments"), ("get", "/api/me")]:
        assert getattr(client, method)(path).status_code == 401
        assert getattr(client, method)(path, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert getattr(client, method)(path, headers={"Authorization": "Basic abc"}).status_code == 401
    assert client.get("/api/me", headers=alice).json() == {"name": "alice"}
    assert count(db, "pairs") == 0  # nothing generated for strangers
    # the token is stored only as a digest
    token = alice["Authorization"].split()[1]
    assert token not in open(db, "rb").read().decode("latin-1")


def test_label_and_validation_never_500(setup):
    client, db, alice, _ = setup
    pair = client.get("/api/next", headers=alice).json()
    assert client.get("/api/next", headers=alice).json()["pair_id"] == pair["pair_id"]  # same until judged
    ok = {"pair_id": pair["pair_id"], "choice": "a", "a": {"accuracy": 4}, "b": {"coherence": 2}}
    bad_bodies = [
        {**ok, "choice": "c"}, {**ok, "pair_id": "x"}, {**ok, "pair_id": 0}, {**ok, "a": {"accuracy": 6}},
        {**ok, "a": {"accuracy": 0}}, {**ok, "a": {"accuracy": True}}, {**ok, "a": {"accuracy": 2.5}},
        {**ok, "b": {"vibes": 3}}, {**ok, "extra": 1}, {**ok, "better_answer": "x" * 20001}, {"choice": "a"},
        [], "a", {**ok, "pair_id": 2**70},
    ]
    for body in bad_bodies:
        r = client.post("/api/judgments", json=body, headers=alice)
        assert r.status_code == 422, (body, r.status_code, r.text[:200])
    raw_cases = [
        (b'{"pair_id": 1, "choice": "a", "better_answer": "\xff\xfe"}', 400),  # not UTF-8
        (b"{not json", 422),
        (json.dumps({**ok, "better_answer": "y" * 70000}).encode(), 413),  # over the body limit
    ]
    for raw, want in raw_cases:
        r = client.post("/api/judgments", content=raw, headers={**alice, "Content-Type": "application/json"})
        assert r.status_code == want, (raw[:40], r.status_code, r.text[:200])
    r = client.post("/api/judgments", content=b"choice=a", headers={**alice, "Content-Type": "text/plain"})
    assert 400 <= r.status_code < 500
    assert client.post("/api/judgments", json={**ok, "pair_id": 999}, headers=alice).status_code == 404
    assert count(db, "judgments") == 0  # none of that stored anything
    assert client.post("/api/judgments", json=ok, headers=alice).status_code == 201
    assert client.post("/api/judgments", json=ok, headers=alice).status_code == 409
    assert count(db, "judgments") == 1
    prog = client.get("/api/progress", headers=alice).json()
    assert {r["name"]: r["judged"] for r in prog["labellers"]} == {"alice": 1, "bob": 0}
    assert client.get("/api/next", headers=alice).json()["pair_id"] != pair["pair_id"]


def test_script_tags_stored_verbatim_rendered_escaped(setup):
    client, db, alice, _ = setup
    pair = client.get("/api/next", headers=alice).json()
    assert XSS in pair["prompt"] and XSS in pair["answer_b"]  # the API returns the text as it is
    r = client.post("/api/judgments", json={"pair_id": pair["pair_id"], "choice": "b", "better_answer": XSS},
                    headers=alice)
    assert r.status_code == 201
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT better_answer FROM judgments").fetchone()[0] == XSS
    page = client.get("/")
    assert page.status_code == 200 and "<script>alert" not in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp  # an injected script could not run
    js = client.get("/static/app.js").text
    assert "textContent" in js
    assert not any(sink in js for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write"))


def test_export_round_trip(setup, tmp_path):
    client, db, alice, bob = setup
    plan = [(alice, "a", ""), (alice, "b", "a better one"), (alice, "tie", ""), (bob, "both_bad", "rewrite")]
    expect = []
    for who, choice, better in plan:
        pair = client.get("/api/next", headers=who).json()
        body = {"pair_id": pair["pair_id"], "choice": choice, "a": {"accuracy": 5, "relevance": 4, "coherence": 3},
                "b": {"accuracy": 1}, "better_answer": better}
        assert client.post("/api/judgments", json=body, headers=who).status_code == 201
        expect.append((pair, choice, better))
    out = tmp_path / "pairs.jsonl"
    n = export_pairs(db, out)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert n == len(lines) == 1 + 2 + 0 + 2  # a: 1; b + rewrite: 2; tie: none; both bad + rewrite: 2
    first = lines[0]
    pair = expect[0][0]
    assert (first["prompt"], first["chosen"], first["rejected"]) == (pair["prompt"], pair["answer_a"], pair["answer_b"])
    assert first["ratings"] == {"chosen": {"accuracy": 5, "relevance": 4, "coherence": 3},
                                "rejected": {"accuracy": 1, "relevance": None, "coherence": None}}
    assert first["labeller"] == "alice" and first["time"].endswith("+00:00") and first["source"] == "judgment"
    b_pair = expect[1][0]
    assert lines[1]["chosen"] == b_pair["answer_b"] and lines[1]["rejected"] == b_pair["answer_a"]
    assert lines[2] == {**lines[2], "chosen": "a better one", "rejected": b_pair["answer_b"], "source": "rewrite"}
    assert lines[2]["ratings"]["chosen"] is None
    assert {(x["labeller"], x["rejected"]) for x in lines[3:]} == {
        ("bob", expect[3][0]["answer_a"]), ("bob", expect[3][0]["answer_b"])}


def test_generator_failures_are_skipped_and_counted(tmp_path):
    calls = []

    def flaky(prompt):
        calls.append(prompt)
        if prompt == "boom":
            raise RuntimeError("model fell over")
        return ("same", "same") if prompt == "dup" else ("", "x") if prompt == "empty" else ("one", "two")

    db = tmp_path / "fb.db"
    token = FeedbackDB(db).add_labeller("carol")
    client = TestClient(create_app(db, flaky, ["boom", "dup", "empty", "fine"]))
    h = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/next", headers=h).json()["prompt"] == "fine"
    assert client.get("/api/progress", headers=h).json()["skipped"] == {
        "generator error": 1, "identical answers": 1, "empty answer": 1}
    always_broken = TestClient(create_app(tmp_path / "fb2.db", lambda p: 1 / 0, ["x"]))
    t2 = FeedbackDB(tmp_path / "fb2.db").add_labeller("dan")
    assert always_broken.get("/api/next", headers={"Authorization": f"Bearer {t2}"}).status_code == 503


def test_prompts_file_and_cli(tmp_path, capsys):
    from moeforge.feedback.app import cli

    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "one"}\n"two"\n{"nope": 1}\nnot json\n\n{"prompt": ""}\n')
    assert load_prompts(f) == ["one", "two"]
    assert "3 invalid line(s) skipped" in capsys.readouterr().err
    f.write_bytes(b"\xff\xfe")
    with pytest.raises(UserError):
        load_prompts(f)
    db = tmp_path / "cli.db"
    assert cli(["--db", str(db), "--add-labeller", "erin"]) == 0
    token = capsys.readouterr().out.splitlines()[1]
    assert FeedbackDB(db).labeller_for_token(token)["name"] == "erin"
    with pytest.raises(UserError, match="already exists"):
        cli(["--db", str(db), "--add-labeller", "erin"])
    assert cli(["--db", str(db), "--progress"]) == 0 and "erin: 0 judged" in capsys.readouterr().out
    assert cli(["--db", str(db), "--export", str(tmp_path / "o.jsonl")]) == 0
    assert (tmp_path / "o.jsonl").read_text() == ""
    with pytest.raises(UserError, match="--checkpoint"):
        cli(["--db", str(db)])
