"""The built-in corpus: real text any Python install has, plus generated domains. No downloads.

Domains and default shares of ``data.builtin_mb`` (4 MB by default):
- ``code`` (40%): whole ``.py`` files of the running interpreter's standard library
  (``sysconfig.get_paths()['stdlib']``; PSF licence), sampled in a seeded order; tests,
  site-packages and caches excluded.
- ``prose`` (30%): English prose from the same install: per module, its module, class and
  function docstrings (via ``ast``, never importing anything) as one document; plus the
  licence texts found on the machine (the stdlib's LICENSE.txt, ``/usr/share/common-licenses``).
- ``math`` (15%): generated problems with worked solutions and integer answers
  (``synthetic.make_math_document``).
- ``dialogue`` (15%): generated conversations rendered with the chat role tokens
  (``synthetic.make_dialogue`` + ``tokenizer.render_chat``).
A further set of held-out conversations (never in pretraining) is written to ``sft.jsonl``
for supervised fine-tuning, and math prompts with answers to ``math_eval.jsonl``.

Everything is deterministic given ``data.seed`` and the interpreter's stdlib.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from pathlib import Path

from moeforge.data.sources import write_jsonl
from moeforge.data.synthetic import make_dialogue, make_math_document, make_math_problem
from moeforge.data.tokenizer import render_chat

SHARES = {"code": 0.40, "prose": 0.30, "math": 0.15, "dialogue": 0.15}
PROFILES = {"code": "code", "prose": "prose", "math": "generated", "dialogue": "generated"}
EXCLUDE_PARTS = {"test", "tests", "site-packages", "dist-packages", "__pycache__", "idle_test", "lib2to3"}
LICENCE_DIRS = ["/usr/share/common-licenses"]
N_SFT, N_MATH_EVAL = 2000, 500


def stdlib_files(rng: random.Random) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not EXCLUDE_PARTS & set(p.relative_to(root).parts)]
    files.sort()
    rng.shuffle(files)
    return files


def module_docstrings(path: Path, root: Path) -> tuple[str, str] | None:
    """(module name, text): all docstrings of one file, headed by the object they document."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return None
    mod = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
    parts = []
    for node in [tree, *ast.walk(tree)]:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40 and not (node is not tree and isinstance(node, ast.Module)):
                title = mod if isinstance(node, ast.Module) else f"{mod}.{node.name}"
                parts.append(f"{title}\n\n{doc.strip()}")
    return (mod, "\n\n".join(dict.fromkeys(parts))) if parts else None


def build_builtin(raw_dir: Path, total_mb: float, seed: int, math_level: str = "standard") -> dict:
    """Write ``raw/<domain>.jsonl`` (+ ``sft.jsonl``, ``math_eval.jsonl`` beside raw/); return stats."""
    rng = random.Random(seed)
    budget = {d: int(total_mb * share * 1e6) for d, share in SHARES.items()}
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(rng)
    docs: dict[str, list[dict]] = {d: [] for d in SHARES}
    size = dict.fromkeys(SHARES, 0)

    def add(domain: str, text: str, doc_id: str, **meta) -> None:
        docs[domain].append({"text": text, "id": doc_id, "domain": domain, "profile": PROFILES[domain], **meta})
        size[domain] += len(text.encode("utf-8"))

    # code: whole files, first half of the shuffled list; prose reads the other half so the
    # two domains do not repeat each other's docstrings
    half = len(files) // 2
    for p in files[:half]:
        if size["code"] >= budget["code"]:
            break
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if 0 < len(text) <= 200_000:
            add("code", text, f"stdlib/{p.relative_to(root)}", lang="python")

    facts: list[tuple[str, str]] = []
    for d in [Path(x) for x in LICENCE_DIRS] + [root]:
        for lic in sorted(d.glob("LICENSE*")) if d == root else sorted(d.glob("*")) if d.is_dir() else []:
            if lic.is_file() and not lic.is_symlink() and size["prose"] < budget["prose"] // 4:
                try:
                    add("prose", lic.read_text(encoding="utf-8"), f"licence/{lic.name}")
                except (UnicodeDecodeError, OSError):
                    pass
    for p in files[half:] + files[:half]:
        if size["prose"] >= budget["prose"]:
            break
        got = module_docstrings(p, root)
        if got and len(got[1]) >= 200:
            add("prose", got[1], f"docstrings/{got[0]}")
            first = got[1].split("\n\n", 2)[1].split("\n")[0].strip() if "\n\n" in got[1] else ""
            if 20 < len(first) < 200 and "." not in got[0]:
                facts.append((got[0], first))

    i = 0
    while size["math"] < budget["math"]:
        add("math", make_math_document(rng, math_level), f"math/{i}")
        i += 1
    i = 0
    while size["dialogue"] < budget["dialogue"]:
        add("dialogue", render_chat(make_dialogue(rng, facts, math_level)["messages"], bos=False), f"dialogue/{i}")
        i += 1

    for d, ds in docs.items():
        write_jsonl(raw_dir / f"{d}.jsonl", ds)
    # held-out data for later stages, from a separate stream so pretraining never sees it
    held = random.Random(seed + 1)
    sft = [make_dialogue(held, facts, math_level) for _ in range(N_SFT)]
    write_jsonl(raw_dir.parent / "sft.jsonl", sft)
    evals = [dict(zip(("prompt", "answer"), make_math_problem(held, math_level))) for _ in range(N_MATH_EVAL)]
    write_jsonl(raw_dir.parent / "math_eval.jsonl", evals)
    return {"domains": {d: {"documents": len(docs[d]), "bytes": size[d]} for d in SHARES},
            "stdlib": str(root), "sft_conversations": N_SFT, "math_eval_problems": N_MATH_EVAL}


def builtin_sources(raw_dir: Path) -> list[dict]:
    return [{"domain": d, "path": str(raw_dir / f"{d}.jsonl"), "kind": "jsonl", "filters": PROFILES[d]} for d in SHARES]
