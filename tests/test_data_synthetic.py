"""Generated domains: math answers are right and checkable; dialogues follow the schema."""

from __future__ import annotations

import random
import re

from moeforge.data.synthetic import check_answer, extract_answer, make_dialogue, make_math_document, make_math_problem


def _expected(prompt: str) -> int | None:
    """Recompute arithmetic prompts independently with Python's own evaluator."""
    m = re.fullmatch(r"(?:What is|Compute|Calculate) ([\d\s+\-*/()]+)[?.]", prompt)
    return int(eval(m.group(1))) if m else None  # noqa: S307 - digits and operators only


def test_math_answers_are_correct_and_deterministic():
    rng = random.Random(7)
    problems = [make_math_problem(rng) for _ in range(500)]
    assert problems == [make_math_problem(r) for r in [random.Random(7)] for _ in range(500)]
    checked = 0
    for prompt, answer in problems:
        exp = _expected(prompt)
        if exp is not None:
            assert int(answer) == exp, prompt
            checked += 1
    assert checked > 100
    assert len({p for p, _ in problems}) > 450  # varied, not a handful of templates


def test_check_answer():
    assert check_answer("So 3 + 4 = 7. The answer is 7.", "7")
    assert not check_answer("The answer is 8.", "7")
    assert check_answer("First 2 * 3 = 6, so 6", "6")  # last number when no marker
    assert check_answer("answer is 1,234", "1234")
    assert check_answer("The answer is -5.", "-5")
    assert not check_answer("I do not know.", "3")
    assert extract_answer("The answer is 12. Then 99 more words") == "12"  # the marker wins over the last number


def test_math_documents_state_checkable_answers():
    doc = make_math_document(random.Random(3))
    blocks = doc.split("\n\n")
    assert len(blocks) >= 3
    for b in blocks:
        prompt = b.split("\n")[0].removeprefix("Problem: ")
        exp = _expected(prompt)
        if exp is not None:
            assert check_answer(b, str(exp))


def test_dialogue_schema():
    rng = random.Random(5)
    for _ in range(50):
        conv = make_dialogue(rng, facts=[("json", "JSON encoder and decoder.")])
        msgs = conv["messages"]
        roles = [m["role"] for m in msgs if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
        assert all(isinstance(m["content"], str) and m["content"] for m in msgs)
        assert all(m["role"] != "system" for m in msgs[1:])


def test_easy_level_is_one_small_operation_and_checkable():
    import random as _random

    from moeforge.data.synthetic import check_answer, make_math_document, make_math_problem

    rng = _random.Random(0)
    for _ in range(200):
        prompt, ans = make_math_problem(rng, "easy")
        a, op, b = prompt.removeprefix("What is ").removesuffix("?").split()
        want = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert int(ans) == want and 0 <= want <= 25 and max(int(a), int(b)) <= 9
        assert check_answer(f"The answer is {ans}.", ans)
    assert "The answer is" in make_math_document(rng, "easy")
