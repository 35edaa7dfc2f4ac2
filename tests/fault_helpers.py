"""Shared by tests/test_faults_*.py: run the real CLI in a killable process, inject faults.

- :func:`pretrain_argv` builds ``moeforge pretrain`` arguments for the tiny model of
  ``train_helpers`` (dim 64, 2 layers, vocab 256) on the bigram shards it writes.
- :func:`start` / :func:`run` execute ``moeforge.cli.main(argv)`` in a child process
  forked from a *forkserver* that imported torch and moeforge once: a child starts in
  milliseconds instead of the seconds a fresh interpreter needs, it is a real process
  that can be SIGKILLed, and it runs on one torch thread so floats reduce in the same
  order in every run (bitwise comparisons across processes).
- Faults are injected *inside the child* by name (``patches``): test-only monkeypatches
  of the checkpoint writer (pause forever at a given point, fail with ENOSPC/EACCES part
  way through a file, slow every step down so a kill lands mid-run). Production code has
  no fault flags.
- :func:`cli` runs ``main(argv)`` in this process and returns (exit code, stdout,
  stderr lines); :func:`assert_one_line` checks the "one line, no traceback" contract.
- :func:`write_payload` writes files whose unpickling would create a marker file.
- ``fast`` (autouse where imported) runs each in-process test on one torch thread without
  matplotlib plots; :func:`finished_run` makes the shards and a finished run the tests damage.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import multiprocessing as mp
import os
import pickle
import sys
import time
from pathlib import Path

import pytest
import torch

from train_helpers import SMALL, losses, write_shards  # noqa: F401  (losses re-exported for the tests)

ROOT = Path(__file__).resolve().parent.parent
_CTX = None


# ----------------------------------------------------------------------------- arguments
def pretrain_argv(tmp: Path, run_name: str, *extra: str, **over) -> list[str]:
    """``pretrain`` + overrides: the tiny model, 8 steps, a checkpoint every 2 steps."""
    values = dict(SMALL, **{"train.steps": 8, "train.ckpt_every": 2, "train.keep_last": 3,
                            "train.out_dir": str(tmp / "runs"), "train.run_name": run_name,
                            "data.data_dir": str(tmp / "data")})
    values.update({k.replace("__", "."): v for k, v in over.items()})
    argv = ["pretrain"]
    for k, v in values.items():
        argv += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return argv + list(extra)


# ----------------------------------------------------------------------------- in-process setup
@pytest.fixture(autouse=True)
def fast(monkeypatch):
    """One torch thread (tiny tensors on a shared 2-core box) and no matplotlib plots."""
    from moeforge.train import loop

    monkeypatch.setattr(loop, "plot_run", lambda run_dir: [])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def finished_run(tmp: Path, run_name: str, steps: int) -> Path:
    """Bigram shards in ``tmp/data`` and a finished ``steps``-step pretraining run ``run_name``
    (checkpoints every 2 steps), made by the real CLI in this process; returns ``tmp``.

    For module-scoped fixtures, which ``fast`` (function-scoped) does not cover."""
    from moeforge.train import loop

    write_shards(tmp / "data", n_train=6000, n_val=1000)
    real, loop.plot_run = loop.plot_run, lambda run_dir: []
    try:
        rc, _, err = cli(pretrain_argv(tmp, run_name, train__steps=steps))
    finally:
        loop.plot_run = real
    assert rc == 0, err
    return tmp


# ----------------------------------------------------------------------------- fault patches (child side)
def _pause(signal_file: str) -> None:
    Path(signal_file).write_text(str(os.getpid()))
    while True:  # until the test SIGKILLs us
        time.sleep(1)


def _patch(name: str, arg: str) -> None:
    """Apply one named fault inside the child process (see the module docstring)."""
    from moeforge.train import checkpoint as ckpt
    from moeforge.train import loop

    if name == "no_plots":  # matplotlib costs seconds and is irrelevant to faults
        loop.plot_run = lambda run_dir: []
    elif name == "slow_steps":  # arg = seconds added to every micro-batch: a kill lands mid-run
        real_fb = loop.forward_backward

        def forward_backward(*a, **k):
            time.sleep(float(arg))
            return real_fb(*a, **k)

        loop.forward_backward = forward_backward
    elif name == "pause_in_optimizer_write":  # arg = "<step dir name>:<signal file>"
        target, sig = arg.split(":", 1)
        real = ckpt.save_file

        def save_file(tensors, path, *a, **k):
            if Path(path).parent.name == f".tmp-{target}" and Path(path).name == "optimizer.safetensors":
                Path(path).write_bytes(b"\0" * 100)  # half-written
                _pause(sig)
            return real(tensors, path, *a, **k)

        ckpt.save_file = save_file
    elif name == "pause_before_marker":  # every file written and synced, COMPLETE not yet
        target, sig = arg.split(":", 1)
        real_fsync = ckpt._fsync

        def fsync(path):
            real_fsync(path)
            if Path(path).parent.name == f".tmp-{target}" and Path(path).name == "state.json":
                _pause(sig)

        ckpt._fsync = fsync
    elif name == "fsize_limit_at":  # arg = "<step>:<bytes>": a real kernel write failure (EFBIG)
        import resource
        import signal

        step, limit = (int(x) for x in arg.split(":"))
        real_save = ckpt.save

        def save(root, s, *a, **k):
            if s == step:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing us
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            return real_save(root, s, *a, **k)

        ckpt.save = save
    elif name in ("enospc_in", "eacces_in"):  # arg = "<step dir name>:<file name>"
        target, fname = arg.split(":", 1)
        code = errno.ENOSPC if name == "enospc_in" else errno.EACCES
        real_save, real_write = ckpt.save_file, Path.write_text

        def fail(path):
            Path(path).write_bytes(b"\0" * 64)  # the device took part of the file
            raise OSError(code, os.strerror(code), str(path))

        def save_file(tensors, path, *a, **k):
            p = Path(path)
            if p.parent.name == f".tmp-{target}" and p.name == fname:
                fail(p)
            return real_save(tensors, path, *a, **k)

        def write_text(self, *a, **k):
            if self.parent.name == f".tmp-{target}" and self.name == fname:
                fail(self)
            return real_write(self, *a, **k)

        ckpt.save_file = save_file
        Path.write_text = write_text
    else:
        raise ValueError(f"unknown fault patch {name!r}")


def _child(argv: list[str], log: str, patches: list[tuple[str, str]]) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", buffering=0), write_through=True)
    sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", buffering=0), write_through=True)
    torch.set_num_threads(1)
    os.chdir(ROOT)
    rc = 1
    try:
        for name, arg in patches:
            _patch(name, arg)
        from moeforge.cli import main

        rc = main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        rc = 99
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "moeforge.cli", "moeforge.train.pretrain", "moeforge.train.loop",
                                     "moeforge.data.loader", "torch.utils.tensorboard", "fault_helpers"])
    return _CTX


def start(argv: list[str], log: Path, patches=(("no_plots", ""),)):
    """Start ``moeforge <argv>`` in a child process (output to ``log``); returns the Process."""
    proc = _context().Process(target=_child, args=(list(argv), str(log), list(patches)), daemon=True)
    proc.start()
    return proc


def run(argv: list[str], log: Path, patches=(("no_plots", ""),), timeout: float = 180) -> tuple[int, str]:
    """Run to the end; (exit code, everything it printed)."""
    proc = start(argv, log, patches)
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        raise AssertionError(f"moeforge {argv[0]} did not finish in {timeout}s:\n{log.read_text()[-2000:]}")
    return proc.exitcode, log.read_text()


def wait_for(cond, proc, log: Path, timeout: float = 120, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while not cond():
        if not proc.is_alive():
            raise AssertionError(f"process exited ({proc.exitcode}) before {what}:\n{log.read_text()[-2000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-2000:]}")
        time.sleep(0.01)


def sigkill(proc) -> None:
    proc.kill()
    proc.join(30)
    assert proc.exitcode == -9, proc.exitcode  # it really died by SIGKILL


def resumed_from(run_dir: Path) -> str | None:
    """The checkpoint the last (re)start of the run resumed from, as logged in metrics.jsonl."""
    from moeforge.train.metrics import read_records

    infos = [r for r in read_records(run_dir / "metrics.jsonl") if r.get("kind") == "info"]
    return infos[-1]["resumed_from"] if infos else None


# ----------------------------------------------------------------------------- in-process CLI
def cli(argv: list[str]) -> tuple[int, str, list[str]]:
    """``moeforge.cli.main(argv)`` here; (exit code, stdout, non-empty stderr lines)."""
    from moeforge.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse usage errors
            rc = e.code if isinstance(e.code, int) else 1
    return rc, out.getvalue(), [ln for ln in err.getvalue().splitlines() if ln.strip()]


def assert_one_line(rc: int, err: list[str], *needles: str) -> str:
    """Exit code 2 and exactly one stderr line that contains every needle; no traceback."""
    assert rc == 2, (rc, err)
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


# ----------------------------------------------------------------------------- hostile files
class _Payload:
    """Unpickling this calls ``open(marker, "w")``: code execution leaves a file behind."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def write_payload(path: Path, marker: Path, kind: str = "pickle") -> Path:
    """A raw pickle, or a torch.save zip (``.pt``/``.bin`` style), that would create ``marker``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"weight": _Payload(marker)}
    if kind == "pickle":
        path.write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, path)
    return path


def reseal(step_dir: Path) -> None:
    """Recompute a checkpoint's checksums after a deliberate edit (what an attacker can do)."""
    from moeforge.train import checkpoint as ckpt

    state = json.loads((step_dir / "state.json").read_text())
    state["files"] = {f: ckpt.sha256_file(step_dir / f) for f in ckpt.FILES}
    (step_dir / "state.json").write_text(json.dumps(state))
    (step_dir / ckpt.MARKER).write_text(ckpt.sha256_file(step_dir / "state.json") + "\n")
