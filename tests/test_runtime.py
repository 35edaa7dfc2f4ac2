"""The process-level allocator settings (moeforge/runtime.py): the caching CPU allocator
reuses freed large blocks, keeps to its limit, trains bit-identically to torch's own
allocator, survives interpreter exit and forked data loader workers. Each scenario runs
in a child process (tests/cache_child.py): the allocator is process-wide."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = Path(__file__).with_name("cache_child.py")
# like the C kernels, the allocator is built on first use; without a compiler moeforge runs on torch's own
needs_cxx = pytest.mark.skipif(not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")),
                               reason="no C++ compiler: the caching allocator is skipped")


def python(args: list[str], **env: str) -> str:
    """stdout of a fresh interpreter run with ``args`` and ``env`` added to ours (it must succeed)."""
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def child(mode: str, **env: str) -> dict:
    return json.loads(python([str(CHILD), mode], **env).strip().splitlines()[-1])


@needs_cxx
def test_cache_reuses_freed_blocks_and_keeps_to_its_limit():
    res = child("reuse")
    assert all(res.values()), {k: v for k, v in res.items() if not v}


@needs_cxx
def test_training_is_bit_identical_with_and_without_the_cache():
    cached = child("train")
    plain = child("train", MOEFORGE_CPU_CACHE="0")
    assert cached["installed"] and not plain["installed"]
    assert cached["hits"] > 100  # most of the step's blocks really came from the cache
    assert cached["losses"] == plain["losses"]
    assert float.fromhex(cached["losses"][-1]) < float.fromhex(cached["losses"][0])


@needs_cxx
def test_live_tensors_at_exit_and_forked_workers():
    assert child("exit") == {"ok": True}
    assert child("fork")["means"] == [0.0, 1.0, 2.0, 3.0]


def test_without_a_cxx_compiler_it_is_skipped_with_one_line(tmp_path):
    code = ("import torch\nfrom moeforge import runtime\n"
            "ok = runtime.install_cpu_cache()\n"
            "x = torch.ones(64 << 20, dtype=torch.uint8); del x\n"
            "print(ok, runtime.cpu_cache_stats()['misses'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "MOEFORGE_CACHE": str(tmp_path)})
    assert out.returncode == 0 and out.stdout.split() == ["False", "0"]
    assert out.stderr.count("no-such-compiler not found") == 1 and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("switch, misses", [pytest.param({}, "1", marks=needs_cxx), ({"MOEFORGE_CPU_CACHE": "0"}, "0"),
                                            ({"MOEFORGE_NO_MALLOC_TUNING": "1"}, "0")])
def test_tune_allocator_installs_it_unless_switched_off(switch, misses):
    code = ("import torch\nfrom moeforge import runtime\nruntime.tune_allocator()\n"
            "x = torch.ones(64 << 20, dtype=torch.uint8); del x\nprint(runtime.cpu_cache_stats()['misses'])")
    assert python(["-c", code], **switch).split()[-1] == misses


def test_default_limit_is_shared_by_local_ranks(monkeypatch):
    from moeforge import runtime

    monkeypatch.delenv("MOEFORGE_CPU_CACHE_MB", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert runtime.default_cache_limit_mb() == runtime.CACHE_LIMIT_MB
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert runtime.default_cache_limit_mb() == runtime.CACHE_LIMIT_MB / 8
    monkeypatch.setenv("MOEFORGE_CPU_CACHE_MB", "100")
    assert runtime.default_cache_limit_mb() == 100


def test_commands_work_without_a_compiler_after_one_line(tmp_path):
    """CC and CXX naming missing programs: pretraining (bf16 and FP8, so every C kernel is
    asked for) and `count` still work on torch's path, each saying so in one line."""
    from fault_helpers import pretrain_argv
    from train_helpers import write_shards

    write_shards(tmp_path / "data")
    env = {**os.environ, "CC": str(tmp_path / "no-cc"), "CXX": str(tmp_path / "no-cxx"),
           "MOEFORGE_CACHE": str(tmp_path / "cache")}
    argv = pretrain_argv(tmp_path, "nocc", train__steps=3, train__dtype="bf16", fp8__enabled=True)
    for args in (argv, ["count", "--config", "tiny"]):
        out = subprocess.run([sys.executable, "-m", "moeforge.cli", *args], capture_output=True, text=True,
                             timeout=600, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        said = [ln for ln in out.stderr.splitlines() if "not found" in ln]
        assert len(said) == 1 and "torch path" in said[0], out.stderr
        assert "Traceback" not in out.stderr and "Warning" not in out.stderr
    recs = [json.loads(ln) for ln in (tmp_path / "runs" / "nocc" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3]
