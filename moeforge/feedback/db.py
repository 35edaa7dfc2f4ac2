"""SQLite storage for human preference judgments, and their export as JSONL preference pairs.

Tables: ``labellers`` (name, sha256 of the access token), ``pairs`` (a prompt and two
answers), ``shown`` (when a pair was first served to a labeller) and ``judgments`` (the
choice, six optional 1-5 ratings, an optional better answer, timestamps).

Choices:
- The standard ``sqlite3`` module, one short-lived connection per call, WAL journal: the
  web app serves requests from a thread pool and a connection must not cross threads.
  Constraints (CHECKs, foreign keys, one judgment per labeller and pair) live in the
  schema, so no code path can store a half-valid judgment.
- Tokens are 32 random bytes (``secrets``); only their SHA-256 is stored. A salted slow
  hash protects guessable passwords; a 256-bit random token is not guessable, so a plain
  digest is enough and lets us look the labeller up by it.
- Times are UTC ISO-8601 strings with seconds, as written by the server (never the client).
- Export (one line per preference pair; ``ratings`` follow the chosen / rejected answer)::

      {"prompt", "chosen", "rejected", "ratings": {"chosen": {...}, "rejected": {...}},
       "labeller", "time", "choice", "source", "pair_id", "judgment_id"}

  ``choice`` a or b gives (winner, loser) with ``source`` "judgment". Ties and "both bad"
  carry no preference between A and B and are not exported as such. A written better
  answer adds pairs with ``source`` "rewrite": (better, winner) after a or b, and
  (better, A) plus (better, B) after a tie or both bad; its own ratings are null.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
from contextlib import closing, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from moeforge.errors import UserError

CHOICES = ("a", "b", "tie", "both_bad")
CRITERIA = ("accuracy", "relevance", "coherence")  # coherence = logical coherence
RATING_COLUMNS = [f"{side}_{c}" for side in "ab" for c in CRITERIA]

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS labellers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_sha256 TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY,
    prompt TEXT NOT NULL,
    answer_a TEXT NOT NULL,
    answer_b TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS shown (
    labeller_id INTEGER NOT NULL REFERENCES labellers(id),
    pair_id INTEGER NOT NULL REFERENCES pairs(id),
    shown_at TEXT NOT NULL,
    PRIMARY KEY (labeller_id, pair_id)
);
CREATE TABLE IF NOT EXISTS judgments (
    id INTEGER PRIMARY KEY,
    pair_id INTEGER NOT NULL REFERENCES pairs(id),
    labeller_id INTEGER NOT NULL REFERENCES labellers(id),
    choice TEXT NOT NULL CHECK (choice IN {CHOICES}),
    {", ".join(f"{c} INTEGER CHECK ({c} BETWEEN 1 AND 5)" for c in RATING_COLUMNS)},
    better_answer TEXT NOT NULL DEFAULT '',
    shown_at TEXT,
    judged_at TEXT NOT NULL,
    UNIQUE (pair_id, labeller_id)
);
"""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class AlreadyJudged(Exception):
    """This labeller has already judged this pair."""


class FeedbackDB:
    """All reads and writes of the labelling database."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise UserError(f"{self.path}: directory {self.path.parent} does not exist")
        try:
            with self.connect() as con:
                con.executescript(SCHEMA)
                con.execute("PRAGMA journal_mode=WAL")
        except sqlite3.DatabaseError as e:
            raise UserError(f"{self.path}: not a usable SQLite database ({e})") from None

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection inside one transaction: committed on success, rolled back on error."""
        with closing(sqlite3.connect(self.path, timeout=30)) as con:
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA foreign_keys=ON")
            with con:
                yield con

    # ------------------------------------------------------------------ labellers
    def add_labeller(self, name: str) -> str:
        """Create a labeller; return their token (shown once, stored only as a digest)."""
        name = name.strip()
        if not name or len(name) > 100 or not name.isprintable():
            raise UserError(f"labeller name must be 1-100 printable characters, got {name!r:.120}")
        token = secrets.token_urlsafe(32)
        try:
            with self.connect() as con:
                con.execute("INSERT INTO labellers (name, token_sha256, created_at) VALUES (?, ?, ?)",
                            (name, token_digest(token), now()))
        except sqlite3.IntegrityError:
            raise UserError(f"labeller {name!r} already exists in {self.path}") from None
        return token

    def labeller_for_token(self, token: str) -> sqlite3.Row | None:
        with self.connect() as con:
            return con.execute("SELECT id, name FROM labellers WHERE token_sha256 = ?",
                               (token_digest(token),)).fetchone()

    # ------------------------------------------------------------------ pairs
    def add_pair(self, prompt: str, answer_a: str, answer_b: str, source: str = "") -> int:
        with self.connect() as con:
            cur = con.execute("INSERT INTO pairs (prompt, answer_a, answer_b, source, created_at) VALUES (?, ?, ?, ?, ?)",
                              (prompt, answer_a, answer_b, source, now()))
            return int(cur.lastrowid)

    def count_pairs(self) -> int:
        with self.connect() as con:
            return con.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]

    def next_pair(self, labeller_id: int) -> sqlite3.Row | None:
        """The oldest pair this labeller has not judged (every labeller sees every pair:
        overlapping judgments measure agreement); marks it shown. None when there is none."""
        with self.connect() as con:
            row = con.execute(
                "SELECT id, prompt, answer_a, answer_b FROM pairs p WHERE NOT EXISTS "
                "(SELECT 1 FROM judgments j WHERE j.pair_id = p.id AND j.labeller_id = ?) ORDER BY id LIMIT 1",
                (labeller_id,)).fetchone()
            if row is not None:
                con.execute("INSERT OR IGNORE INTO shown (labeller_id, pair_id, shown_at) VALUES (?, ?, ?)",
                            (labeller_id, row["id"], now()))
            return row

    # ------------------------------------------------------------------ judgments
    def add_judgment(self, labeller_id: int, pair_id: int, choice: str, ratings: dict[str, int | None],
                     better_answer: str = "") -> int | None:
        """Store one judgment; None if the pair does not exist; AlreadyJudged on a repeat."""
        cols = ", ".join(RATING_COLUMNS)
        with self.connect() as con:
            if con.execute("SELECT 1 FROM pairs WHERE id = ?", (pair_id,)).fetchone() is None:
                return None
            shown = con.execute("SELECT shown_at FROM shown WHERE labeller_id = ? AND pair_id = ?",
                                (labeller_id, pair_id)).fetchone()
            try:
                cur = con.execute(
                    f"INSERT INTO judgments (pair_id, labeller_id, choice, {cols}, better_answer, shown_at, judged_at) "
                    f"VALUES (?, ?, ?, {', '.join('?' * len(RATING_COLUMNS))}, ?, ?, ?)",
                    (pair_id, labeller_id, choice, *(ratings.get(c) for c in RATING_COLUMNS), better_answer,
                     shown["shown_at"] if shown else None, now()))
            except sqlite3.IntegrityError as e:
                if "UNIQUE" in str(e):
                    raise AlreadyJudged(pair_id) from None
                raise
            return int(cur.lastrowid)

    def progress(self) -> dict:
        """Judgment counts per labeller (all labellers, also those with none yet)."""
        with self.connect() as con:
            rows = con.execute(
                "SELECT l.name, COUNT(j.id) AS judged, "
                + ", ".join(f"COALESCE(SUM(j.choice = '{c}'), 0) AS {c}" for c in CHOICES)
                + ", MAX(j.judged_at) AS last FROM labellers l LEFT JOIN judgments j ON j.labeller_id = l.id "
                "GROUP BY l.id ORDER BY l.name").fetchall()
            pairs = con.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]
        return {"pairs": pairs, "labellers": [dict(r) for r in rows]}

    def judgments(self) -> list[sqlite3.Row]:
        with self.connect() as con:
            return con.execute(
                "SELECT j.*, p.prompt, p.answer_a, p.answer_b, l.name AS labeller FROM judgments j "
                "JOIN pairs p ON p.id = j.pair_id JOIN labellers l ON l.id = j.labeller_id ORDER BY j.id").fetchall()


# ----------------------------------------------------------------------------- export
def _ratings(row: sqlite3.Row, side: str | None) -> dict[str, int | None] | None:
    return None if side is None else {c: row[f"{side}_{c}"] for c in CRITERIA}


def preference_pairs(row: sqlite3.Row) -> list[dict]:
    """The preference pairs one judgment implies (see the module docstring)."""
    answers = {"a": row["answer_a"], "b": row["answer_b"]}
    pairs: list[tuple[str, str | None, str, str | None, str]] = []  # chosen, its side, rejected, its side, source
    better = row["better_answer"].strip()
    if row["choice"] in ("a", "b"):
        win, lose = row["choice"], "b" if row["choice"] == "a" else "a"
        pairs.append((answers[win], win, answers[lose], lose, "judgment"))
        if better:
            pairs.append((better, None, answers[win], win, "rewrite"))
    elif better:
        pairs += [(better, None, answers[s], s, "rewrite") for s in "ab"]
    return [{
        "prompt": row["prompt"], "chosen": chosen, "rejected": rejected,
        "ratings": {"chosen": _ratings(row, cs), "rejected": _ratings(row, rs)},
        "labeller": row["labeller"], "time": row["judged_at"], "choice": row["choice"], "source": source,
        "pair_id": row["pair_id"], "judgment_id": row["id"],
    } for chosen, cs, rejected, rs, source in pairs]


def export_pairs(db_path: str | Path, out_path: str | Path) -> int:
    """Write every judgment's preference pairs to ``out_path`` (JSONL, atomically); return the count."""
    if not Path(db_path).is_file():
        raise UserError(f"{db_path}: feedback database not found")
    rows = FeedbackDB(db_path).judgments()
    out = Path(out_path)
    tmp = out.with_name(out.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            for pair in preference_pairs(row):
                f.write(json.dumps(pair, ensure_ascii=False) + "\n")
                n += 1
    os.replace(tmp, out)  # a reader never sees half an export
    return n
