"""The labelling web app: a prompt, two sampled answers side by side, a human judgment.

``moeforge label`` serves it (FastAPI + uvicorn, 127.0.0.1 by default), creates labellers,
prints progress and exports preference pairs for the reward model and DPO.

Choices:
- Answers come from a pluggable ``answer_fn(prompt) -> (answer_a, answer_b)``; the CLI
  samples both from one checkpoint (:func:`checkpoint_answerer`), tests pass a fake.
  A pair is generated only when the labeller has nothing left to judge, under a lock (one
  model, one generation at a time). An answer_fn that raises, or returns an empty or
  duplicate answer, is skipped and counted, and the next prompt is tried.
- Authentication: ``Authorization: Bearer <token>`` on every API call. The page takes the
  token from the URL fragment (``/#token=...``, never sent to the server or logged), keeps
  it in sessionStorage and removes it from the address bar.
- Model text is untrusted: the page is static HTML + JS that fills elements with
  ``textContent`` only, and the Content-Security-Policy forbids inline scripts, so even
  a ``<script>`` the model writes is shown as text and could not run.
- Bad requests never reach the database: pydantic models with ``extra="forbid"`` and
  bounded sizes (422), a 64 KiB body limit (413), non-UTF-8 JSON (400), unknown pair (404),
  a second judgment of the same pair (409), missing or wrong token (401).
"""

from __future__ import annotations

import argparse
import secrets
import json
import sys
import threading
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from moeforge.errors import UserError
from moeforge.feedback.db import CRITERIA, AlreadyJudged, FeedbackDB, export_pairs

STATIC = Path(__file__).with_name("static")
MAX_BODY = 64 * 1024
MAX_ANSWER_CHARS = 20_000
AnswerFn = Callable[[str], tuple[str, str]]

BUILTIN_PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "What is 17 + 25? Show your working.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Give three tips for writing clear documentation.",
    "What is the difference between a list and a tuple in Python?",
    "Summarise the idea of a mixture-of-experts model for a beginner.",
    "If a train travels 60 km in 45 minutes, what is its average speed in km/h?",
    "Write a haiku about autumn rain.",
    "How do I read a file line by line in Python?",
    "Why is it a bad idea to store passwords in plain text?",
    "A shop sells pens at 3 for 2 euros. How much do 12 pens cost?",
    "Explain what a hash function is, with one everyday analogy.",
]


# ----------------------------------------------------------------------------- request bodies
Rating = StrictInt | None


class Ratings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    accuracy: Rating = Field(None, ge=1, le=5)
    relevance: Rating = Field(None, ge=1, le=5)
    coherence: Rating = Field(None, ge=1, le=5)  # logical coherence


class Judgment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pair_id: StrictInt = Field(ge=1, le=2**62)
    choice: Literal["a", "b", "tie", "both_bad"]
    a: Ratings = Field(default_factory=Ratings)
    b: Ratings = Field(default_factory=Ratings)
    better_answer: str = Field("", max_length=MAX_ANSWER_CHARS)


# ----------------------------------------------------------------------------- prompts
def load_prompts(path: str | Path | None) -> list[str]:
    """Prompts from JSONL (``{"prompt": "..."}`` or a bare JSON string per line), else the built-in list.

    Invalid lines are reported on stderr, skipped and counted; a file without any valid
    prompt is an error.
    """
    if path is None:
        return list(BUILTIN_PROMPTS)
    prompts, bad = [], 0
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: prompts file not found") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            text = obj["prompt"] if isinstance(obj, dict) else obj
            if not isinstance(text, str) or not text.strip():
                raise ValueError("needs a non-empty string prompt")
            prompts.append(text)
        except (ValueError, KeyError, TypeError) as e:
            bad += 1
            print(f"{path}:{n}: skipped ({type(e).__name__}: {e})", file=sys.stderr)
    if bad:
        print(f"{path}: {bad} invalid line(s) skipped, {len(prompts)} prompt(s) loaded", file=sys.stderr)
    if not prompts:
        raise UserError(f"{path}: no valid prompt (expected JSONL lines like {{\"prompt\": \"...\"}})")
    return prompts


def checkpoint_answerer(checkpoint: str | Path, config=None, max_new_tokens: int = 256, temperature: float = 0.8,
                        top_p: float = 0.95, seed: int | None = None) -> AnswerFn:
    """Two answers per prompt sampled in one batch from a checkpoint, in the chat template."""
    import torch

    from moeforge.generate import generate, load_for_chat, render_chat, stop_ids_of

    model, tok = load_for_chat(checkpoint, config)
    stops = stop_ids_of(tok)
    gen = torch.Generator(device=model.embed.weight.device)
    gen.manual_seed(seed if seed is not None else secrets.randbits(63))  # not torch.seed(): it reseeds the global RNG

    def answer(prompt: str) -> tuple[str, str]:
        ids = render_chat([{"role": "user", "content": prompt}], tok)
        out = generate(model, [ids, ids], max_new_tokens, temperature, top_p=top_p, stop_ids=stops, generator=gen)
        a, b = (tok.decode([t for t in row if t not in stops]) for row in out.tokens)
        return a, b

    return answer


# ----------------------------------------------------------------------------- the app
class PairSource:
    """Makes a new pair from the next prompt in turn; skips and counts failures."""

    def __init__(self, db: FeedbackDB, answer_fn: AnswerFn, prompts: list[str], source: str):
        self.db, self.answer_fn, self.prompts, self.source = db, answer_fn, prompts, source
        self.lock = threading.Lock()
        self.failures: dict[str, int] = {}
        self.turn = db.count_pairs()  # continue the prompt cycle after a restart

    def _skip(self, why: str, prompt: str, detail: str = "") -> None:
        self.failures[why] = self.failures.get(why, 0) + 1
        print(f"label: skipped prompt {prompt[:60]!r}: {why}{detail}", file=sys.stderr)

    def next_for(self, labeller_id: int):
        with self.lock:  # re-checked under the lock, so two requests never generate twice
            row = self.db.next_pair(labeller_id)
            for _ in range(min(len(self.prompts), 8)):
                if row is not None:
                    return row
                prompt = self.prompts[self.turn % len(self.prompts)]
                self.turn += 1
                try:
                    a, b = self.answer_fn(prompt)
                except Exception as e:  # a broken generator must not take the app down
                    self._skip("generator error", prompt, f" ({type(e).__name__}: {e})")
                    continue
                if not (isinstance(a, str) and isinstance(b, str)) or not a.strip() or not b.strip():
                    self._skip("empty answer", prompt)
                elif a == b:
                    self._skip("identical answers", prompt)
                else:
                    self.db.add_pair(prompt, a[:MAX_ANSWER_CHARS], b[:MAX_ANSWER_CHARS], self.source)
                    row = self.db.next_pair(labeller_id)
            return row


def create_app(db_path: str | Path, answer_fn: AnswerFn, prompts: list[str] | None = None, source: str = ""):
    """The FastAPI application over the database at ``db_path``."""
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, Response
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from fastapi.staticfiles import StaticFiles

    db = FeedbackDB(db_path)
    pairs = PairSource(db, answer_fn, prompts or list(BUILTIN_PROMPTS), source)
    app = FastAPI(title="moeforge labelling", docs_url=None, redoc_url=None, openapi_url=None,
                  max_body_size=MAX_BODY)
    bearer = HTTPBearer(auto_error=False)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        # FastAPI's own 422 echoes the input back; a NaN, 1e400 or lone surrogate in it cannot be
        # encoded and turned the 422 into a 500. Name the problem without the input, ASCII-escaped.
        detail = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", "")),
                   "type": str(e.get("type", ""))} for e in exc.errors()]
        return Response(json.dumps({"detail": detail}), status_code=422, media_type="application/json")

    def labeller(cred: HTTPAuthorizationCredentials | None = Depends(bearer)):
        row = db.labeller_for_token(cred.credentials) if cred and len(cred.credentials) <= 200 else None
        if row is None:
            raise HTTPException(401, "missing or wrong labeller token", headers={"WWW-Authenticate": "Bearer"})
        return row

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/me")
    def me(who=Depends(labeller)):
        return {"name": who["name"]}

    @app.get("/api/next")
    def next_pair(who=Depends(labeller)):
        row = pairs.next_for(who["id"])
        if row is None:
            raise HTTPException(503, "no pair could be generated (see the server log)")
        return {"pair_id": row["id"], "prompt": row["prompt"], "answer_a": row["answer_a"], "answer_b": row["answer_b"]}

    @app.post("/api/judgments", status_code=201)
    def judge(body: Judgment, who=Depends(labeller)):
        ratings = {f"{side}_{c}": getattr(getattr(body, side), c) for side in "ab" for c in CRITERIA}
        try:
            jid = db.add_judgment(who["id"], body.pair_id, body.choice, ratings, body.better_answer)
        except AlreadyJudged:
            raise HTTPException(409, f"pair {body.pair_id} is already judged by you") from None
        if jid is None:
            raise HTTPException(404, f"no pair {body.pair_id}")
        return {"judgment_id": jid}

    @app.get("/api/progress")
    def progress(who=Depends(labeller)):
        return {**db.progress(), "you": who["name"], "skipped": dict(pairs.failures)}

    return app


# ----------------------------------------------------------------------------- CLI
def cli(argv: list[str]) -> int:
    """``moeforge label [--db FILE] (--add-labeller NAME | --export OUT | --progress | --checkpoint DIR)``."""
    from moeforge.cli import parse_config_args

    parser = argparse.ArgumentParser(prog="moeforge label", description="Collect human preferences between two answers.")
    parser.add_argument("--db", default=None, help="SQLite file (default: <train.out_dir>/feedback.db)")
    parser.add_argument("--add-labeller", metavar="NAME", help="create a labeller and print their token")
    parser.add_argument("--export", metavar="OUT", help="write preference pairs as JSONL")
    parser.add_argument("--progress", action="store_true", help="print judgments per labeller")
    parser.add_argument("--checkpoint", help="serve: the checkpoint whose answers are compared")
    parser.add_argument("--prompts", help="serve: JSONL prompts (default: a built-in list)")
    parser.add_argument("--host", default="127.0.0.1", help="serve: bind address (default: localhost only)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args, cfg = parse_config_args(argv, parser)
    db_path = Path(args.db) if args.db else Path(cfg.train.out_dir) / "feedback.db"
    if args.add_labeller is not None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        token = FeedbackDB(db_path).add_labeller(args.add_labeller)
        print(f"labeller {args.add_labeller!r} added to {db_path}; token (shown once):\n{token}")
        print(f"open http://{args.host}:{args.port}/#token={token} once `moeforge label --checkpoint ...` serves")
        return 0
    if args.export:
        n = export_pairs(db_path, args.export)
        print(f"wrote {n} preference pair(s) to {args.export}")
        return 0
    if args.progress:
        if not db_path.is_file():
            raise UserError(f"{db_path}: feedback database not found")
        prog = FeedbackDB(db_path).progress()
        print(f"{prog['pairs']} pair(s)")
        for r in prog["labellers"]:
            print(f"  {r['name']}: {r['judged']} judged (a {r['a']}, b {r['b']}, tie {r['tie']}, "
                  f"both bad {r['both_bad']}), last {r['last'] or '-'}")
        return 0
    if not args.checkpoint:
        raise UserError("serving needs --checkpoint DIR (or use --add-labeller / --export / --progress)")
    import uvicorn

    db_path.parent.mkdir(parents=True, exist_ok=True)
    answer = checkpoint_answerer(args.checkpoint, cfg if args.config else None, args.max_new_tokens, args.temperature)
    app = create_app(db_path, answer, load_prompts(args.prompts), source=str(args.checkpoint))
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host}: tokens and judgments travel unencrypted; "
              "put it behind a TLS proxy", file=sys.stderr)
    print(f"labelling at http://{args.host}:{args.port}/#token=<your token>  (Ctrl-C stops)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
