"""Every CLI command works with only what ./run.sh installs.

The test environment has more installed than ./run.sh's (transformers, pytest, triton,
...), and what those bring can hide a missing dependency: datatrove imports ``regex``,
which only its "processing" extra requires, and the test venv had it through
transformers while a fresh ./run.sh died on it. So a child process makes every module of
an installed distribution outside the dependency closure of ``moeforge[<run.sh's
extras>]`` (read from the installed metadata, markers evaluated) look absent, then
imports each command's module and runs its ``--help``.
CI also builds a clean venv with exactly those extras and runs the pipeline in it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

GUARD = r'''
import importlib.abc, importlib.metadata as md, re, sys
from packaging.requirements import Requirement

def closure(root, extras):
    seen, todo = set(), [(root, frozenset(extras))]
    while todo:
        name, ex = todo.pop()
        key = (re.sub(r"[-_.]+", "-", name).lower(), ex)
        if key in seen:
            continue
        seen.add(key)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for text in reqs:
            req = Requirement(text)
            envs = [{"extra": e} for e in ex] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, frozenset(req.extras)))
    return {n for n, _ in seen}

allowed = closure("moeforge", sys.argv[1].split(",")) - set(sys.argv[3:])  # argv[3:]: the guard's own test
OPTIONAL = set(sys.argv[2].split(","))  # modules for another extra, imported only when it is there
norm = lambda d: re.sub(r"[-_.]+", "-", d).lower()
# a refused module is recorded as absent (None in sys.modules): importing it raises
# ModuleNotFoundError, and importlib.util.find_spec, which libraries use to probe for
# optional packages, answers None as if it were not installed
for top, dists in md.packages_distributions().items():
    if top not in sys.modules and not {norm(d) for d in dists} & allowed:
        sys.modules[top] = None

import contextlib, io, importlib, pkgutil
import moeforge
from moeforge.cli import COMMANDS, main
# every module, not only the commands' own: stages import their libraries when they run
# (the data stage's datatrove, and through it regex), not when the command starts
for info in pkgutil.walk_packages(moeforge.__path__, "moeforge."):
    if info.name not in OPTIONAL:
        importlib.import_module(info.name)
for cmd, (module, _) in COMMANDS.items():
    importlib.import_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main([cmd, "--help"])
    assert "usage" in out.getvalue().lower(), (cmd, out.getvalue()[:300])
    print("ok", cmd)
'''


# modules that need an extra ./run.sh does not install, each imported only where it is used
OPTIONAL_MODULES = {"moeforge.fp8.kernels": "gpu (triton)"}


def run_sh_extras() -> str:
    """The extras ./run.sh passes to scripts/venv.sh."""
    m = re.search(r'source scripts/venv.sh "([^"]*)"', (ROOT / "run.sh").read_text())
    assert m, "run.sh no longer sources scripts/venv.sh with its extras"
    return m.group(1)


def test_every_command_imports_with_only_run_sh_extras():
    extras = run_sh_extras()
    out = subprocess.run([sys.executable, "-c", GUARD, extras, ",".join(OPTIONAL_MODULES)], capture_output=True, text=True, timeout=600,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    from moeforge.cli import COMMANDS

    assert [ln.split()[1] for ln in out.stdout.splitlines() if ln.startswith("ok ")] == list(COMMANDS)


def test_the_guard_catches_a_dependency_the_extras_lack():
    """The guard itself: were ``regex`` not in the data extra (as once), the walk fails on it."""
    out = subprocess.run([sys.executable, "-c", GUARD, run_sh_extras(), ",".join(OPTIONAL_MODULES), "regex"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode != 0 and "import of regex halted" in out.stderr, out.stderr[-2000:]
