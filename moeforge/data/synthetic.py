"""Generated domains: math problems with verifiable answers, and simple chat dialogues.

Why generated data: later stages need something measurable. GRPO needs prompts whose
answers a program can check (:func:`make_math_problem` + :func:`check_answer`); SFT needs
conversations. Both come from templates driven by a ``random.Random`` so a seed fixes the
corpus exactly.

Choices:
- Answers are integers (division problems are built backwards from the quotient), so
  checking is exact: :func:`check_answer` takes the last number in a completion, or the one
  after "answer is" / "####" when present.
- Pretraining documents show the worked solution and end with "The answer is N." so a
  model learns the format GRPO's checker reads.
- Conversation schema (JSONL, one per line), used for SFT::

      {"messages": [{"role": "system", "content": "..."},      # optional
                    {"role": "user", "content": "..."},
                    {"role": "assistant", "content": "..."}, ...]}

  Roles are "system", "user", "assistant"; the tokenizer has one special token per role
  (see ``tokenizer.render_chat``).
"""

from __future__ import annotations

import random
import re

NAMES = ["Ada", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jon", "Kira", "Liam",
         "Mina", "Noor", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara"]
ITEMS = ["apples", "marbles", "books", "stamps", "coins", "pencils", "cookies", "shells", "cards", "stickers"]
UNITS = [("km", "hour"), ("metres", "second"), ("miles", "hour")]


def _arith(rng: random.Random) -> tuple[str, str, int]:
    """A two- or three-term integer expression, with the evaluation written out."""
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 12)
    form = rng.randrange(4)
    if form == 0:
        return f"What is {a} + {b} * {c}?", f"First {b} * {c} = {b * c}, then {a} + {b * c} = {a + b * c}.", a + b * c
    if form == 1:
        return f"Compute ({a} + {b}) * {c}.", f"{a} + {b} = {a + b}, and {a + b} * {c} = {(a + b) * c}.", (a + b) * c
    if form == 2:
        q = rng.randint(2, 40)
        return f"What is {q * c} / {c}?", f"{q * c} divided by {c} is {q}.", q
    return f"Calculate {a} - {b} + {c}.", f"{a} - {b} = {a - b}, then {a - b} + {c} = {a - b + c}.", a - b + c


def _easy(rng: random.Random) -> tuple[str, str, int]:
    """One operation on single digits (the addition, subtraction and small multiplication
    tables): within reach of the tiny CPU preset, so the demo pipeline's SFT and GRPO
    stages have a verifiable task they can visibly improve on."""
    form = rng.randrange(3)
    if form == 0:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", a + b
    if form == 1:
        a = rng.randint(0, 9)
        b = rng.randint(0, a)
        return f"What is {a} - {b}?", f"{a} - {b} = {a - b}.", a - b
    a, b = rng.randint(1, 5), rng.randint(1, 5)
    return f"What is {a} * {b}?", f"{a} * {b} = {a * b}.", a * b


MATH_LEVELS = ("easy", "standard")


def _pick(rng: random.Random, level: str):
    if level == "easy":
        return _easy
    return _arith if rng.random() < 0.5 else _word


def _word(rng: random.Random) -> tuple[str, str, int]:
    """A short word problem whose answer is an integer by construction."""
    n1, n2 = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    form = rng.randrange(4)
    if form == 0:
        x, y, z = rng.randint(5, 60), rng.randint(2, 30), rng.randint(1, 20)
        ans = x + y - z
        return (f"{n1} has {x} {item}. {n2} gives {n1} {y} more, then {n1} loses {z}. How many {item} does {n1} have now?",
                f"{n1} starts with {x}. After getting {y}: {x} + {y} = {x + y}. After losing {z}: {x + y} - {z} = {ans}.", ans)
    if form == 1:
        per, boxes = rng.randint(2, 15), rng.randint(2, 12)
        ans = per * boxes
        return (f"There are {boxes} boxes with {per} {item} in each box. How many {item} are there in total?",
                f"{boxes} boxes times {per} {item} each is {boxes} * {per} = {ans}.", ans)
    if form == 2:
        share, people = rng.randint(2, 20), rng.randint(2, 9)
        total = share * people
        return (f"{n1} shares {total} {item} equally among {people} friends. How many {item} does each friend get?",
                f"{total} / {people} = {share}.", share)
    speed, hours = rng.randint(20, 90), rng.randint(2, 8)
    unit, per = rng.choice(UNITS)
    ans = speed * hours
    return (f"A train travels at {speed} {unit} per {per} for {hours} {per}s. How far does it go, in {unit}?",
            f"Distance is speed times time: {speed} * {hours} = {ans}.", ans)


def make_math_problem(rng: random.Random, level: str = "standard") -> tuple[str, str]:
    """Return ``(prompt, answer)``; answer is the integer as a string. ``level``: MATH_LEVELS."""
    prompt, _, ans = _pick(rng, level)(rng)
    return prompt, str(ans)


def make_math_document(rng: random.Random, level: str = "standard") -> str:
    """A pretraining document: a few problems with worked solutions."""
    parts = []
    for _ in range(rng.randint(3, 6)):
        prompt, steps, ans = _pick(rng, level)(rng)
        parts.append(f"Problem: {prompt}\nSolution: {steps} The answer is {ans}.")
    return "\n\n".join(parts)


_ANSWER_RE = re.compile(r"(?:answer is|####)\s*:?\s*(-?\d[\d,]*)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\d[\d,]*")


def extract_answer(text: str) -> str | None:
    """The number a completion commits to: after 'answer is' / '####' if present, else the last one."""
    m = _ANSWER_RE.findall(text)
    nums = m or _NUMBER_RE.findall(text)
    if not nums:
        return None
    return nums[-1].replace(",", "").rstrip(",")


def check_answer(text: str, answer: str) -> bool:
    """True when the completion's committed number equals ``answer`` (an integer string)."""
    got = extract_answer(text)
    if got is None:
        return False
    try:
        return int(got) == int(answer)
    except ValueError:
        return False


# ----------------------------------------------------------------------------- dialogue
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a concise assistant. Answer briefly.",
                  "You are a friendly tutor who explains each step."]
WORDS = ["river", "python", "garden", "lantern", "orbit", "pencil", "harbor", "meadow", "circuit", "violet",
         "thunder", "window", "compass", "ember", "glacier", "puzzle", "saddle", "trumpet", "velvet", "walnut"]


def _turn(rng: random.Random, facts: list[tuple[str, str]], level: str = "standard") -> tuple[str, str]:
    """One (user, assistant) exchange from a handful of checkable task templates."""
    kind = rng.randrange(6 if facts else 5)
    w = rng.choice(WORDS)
    if kind == 0:
        prompt, ans = make_math_problem(rng, level)
        return prompt, f"The answer is {ans}."
    if kind == 1:
        return f"Spell the word '{w}' backwards.", f"'{w}' backwards is '{w[::-1]}'."
    if kind == 2:
        return f"How many letters are in the word '{w}'?", f"The word '{w}' has {len(w)} letters."
    if kind == 3:
        ws = rng.sample(WORDS, rng.randint(3, 5))
        return f"Sort these words alphabetically: {', '.join(ws)}.", f"In alphabetical order: {', '.join(sorted(ws))}."
    if kind == 4:
        return f"Write the word '{w}' in capital letters.", f"{w.upper()}"
    name, summary = rng.choice(facts)
    return f"What does the Python module `{name}` do?", f"The `{name}` module: {summary}"


def make_dialogue(rng: random.Random, facts: list[tuple[str, str]] | None = None, level: str = "standard") -> dict:
    """A conversation in the schema above: optional system prompt, 1-3 user/assistant turns."""
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(rng.randint(1, 3)):
        user, assistant = _turn(rng, facts or [], level)
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    return {"messages": messages}


# ----------------------------------------------------------------------------- planted duplicates
_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "do", "gu", "fe", "ha", "ji", "bo"]


def planted_duplicates(rng: random.Random, n_docs: int = 200, n_dups: int = 100, words: int = 300,
                       edits: tuple[int, int] = (1, 40)) -> tuple[list[str], list[tuple[int, int]]]:
    """A corpus for measuring dedup: ``n_docs`` unrelated documents plus ``n_dups`` copies of
    random ones with k word substitutions each (k uniform in ``edits``), so the planted pairs
    span Jaccard similarities from ~0.95 down to ~0.3. Returns (texts, [(original, copy)])."""
    vocab = sorted({"".join(rng.choices(_SYLLABLES, k=rng.randint(2, 4))) for _ in range(5000)})
    texts = []
    for _ in range(n_docs):
        ws = rng.choices(vocab, k=words)
        texts.append("\n".join(" ".join(ws[i: i + 12]) + "." for i in range(0, words, 12)))
    pairs = []
    for _ in range(n_dups):
        src = rng.randrange(n_docs)
        ws = texts[src].replace(".", "").split()
        for pos in rng.sample(range(len(ws)), rng.randint(*edits)):
            ws[pos] = rng.choice(vocab)
        pairs.append((src, len(texts)))
        texts.append("\n".join(" ".join(ws[i: i + 12]) + "." for i in range(0, len(ws), 12)))
    return texts, pairs
