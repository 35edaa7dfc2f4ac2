"""The machine's choice of compute dtype (moeforge/precision.py): bf16 where a bf16 GEMM is
fast, fp32 where it is not, measured once per CPU and cached, an explicit value winning,
and the choice recorded with the run. The measurement is mocked for the two CPU classes;
one test measures for real under the AVX2 cap CI uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from moeforge import precision
from moeforge.config import load_config
from moeforge.train.metrics import read_records
from moeforge.train.pretrain import pretrain
from train_helpers import mem_datasets, small_config

BF16_HOST = {"bf16": 370.0, "fp32": 140.0}  # AVX512-BF16 (2-core AMD EPYC, measured)
AVX2_HOST = {"bf16": 0.7, "fp32": 53.0}  # AVX2 only (a 2-core laptop-class CPU, measured)


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty measurement cache, no choice made yet in this process, a CPU with bf16 flags
    (so the decision goes through the measurement), and a counter of measurements."""
    monkeypatch.setenv("MOEFORGE_CACHE", str(tmp_path / "cache"))
    for switch in precision.ISA_SWITCHES:  # as on an uncapped host (CI reruns these under the AVX2 cap)
        monkeypatch.delenv(switch, raising=False)
    monkeypatch.setattr(precision, "_choices", {})
    monkeypatch.setattr(precision, "_printed", set())
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    calls = []

    def use(rates):
        def measure(*a, **k):
            calls.append(rates)
            return dict(rates)
        monkeypatch.setattr(precision, "measure_gemm_rates", measure)
        return calls
    return use


@pytest.mark.parametrize("rates, want", [(BF16_HOST, "bf16"), (AVX2_HOST, "fp32")])
def test_auto_follows_the_measured_gemm_rates(fresh, rates, want, capsys):
    calls = fresh(rates)
    choice = precision.resolve("auto", "cpu")
    assert choice.name == want and choice.dtype == precision.DTYPES[want]
    assert "measured now" in choice.reason and f"{rates['bf16']:.0f} GFLOP/s" in choice.reason
    err = capsys.readouterr().err
    assert err.count("train.dtype = auto -> " + want) == 1
    precision.resolve("auto", "cpu")  # the same process: decided once, printed once
    assert len(calls) == 1 and capsys.readouterr().err == ""


def test_measurement_is_cached_per_cpu_and_isa_cap(fresh, monkeypatch):
    calls = fresh(BF16_HOST)
    assert precision.cpu_choice().name == "bf16"
    assert precision.cpu_choice().name == "bf16"  # a new process would read the cache
    assert len(calls) == 1 and "cached in" in precision.cpu_choice().reason
    table = json.loads(precision.cache_file().read_text())
    assert [v["bf16"] for v in table.values()] == [BF16_HOST["bf16"]]
    # the AVX2 cap changes torch's kernels, so it is a different entry, measured afresh
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    calls = fresh(AVX2_HOST)  # (the same list of calls: the first is the bf16 host's)
    assert precision.cpu_choice().name == "fp32" and calls == [BF16_HOST, AVX2_HOST]
    assert len(json.loads(precision.cache_file().read_text())) == 2


def test_a_damaged_cache_is_measured_again(fresh):
    calls = fresh(AVX2_HOST)
    precision.cache_file().parent.mkdir(parents=True)
    precision.cache_file().write_text("{not json")
    assert precision.cpu_choice().name == "fp32" and len(calls) == 1


def test_x86_without_bf16_instructions_needs_no_measurement(fresh, monkeypatch):
    calls = fresh(BF16_HOST)  # would say bf16 if it were asked
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"sse4_2", "avx", "avx2", "fma"})
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    choice = precision.cpu_choice()
    assert choice.name == "fp32" and "no AVX512-BF16 or AMX" in choice.reason and not calls


def test_cuda_keeps_bf16_and_explicit_values_win(fresh):
    calls = fresh(AVX2_HOST)
    assert precision.machine_choice("cuda").name == "bf16"
    assert precision.resolve("bf16", "cpu").name == "bf16"  # explicit: no measurement either
    assert precision.resolve("fp32", "cuda").name == "fp32"
    assert not calls


def test_defaults_are_auto_and_configs_validate():
    cfg = load_config(None)
    assert cfg.train.dtype == "auto" and cfg.fp8.cpu_gemm_dtype == "auto"
    for value in ("auto", "bf16", "fp32"):
        load_config(None, {"train.dtype": value, "fp8.cpu_gemm_dtype": value})
    with pytest.raises(ValueError, match="train.dtype"):
        load_config(None, {"train.dtype": "fp16"})


@pytest.mark.parametrize("rates, want", [(BF16_HOST, "bf16"), (AVX2_HOST, "fp32")])
def test_the_run_computes_in_the_choice_and_records_it(fresh, tmp_path, rates, want):
    fresh(rates)
    cfg = small_config(tmp_path, train__steps=2, train__dtype="auto", fp8__enabled=True)
    run = pretrain(cfg, datasets=mem_datasets())
    info = next(r for r in read_records(run / "metrics.jsonl") if r["kind"] == "info")
    assert info["train.dtype"] == want and info["fp8.cpu_gemm_dtype"] == want
    assert "GFLOP/s" in info["train.dtype_reason"] and "GFLOP/s" in info["fp8.cpu_gemm_dtype_reason"]
    from moeforge.fp8.linear import Fp8Ops
    from moeforge.train.pretrain import build_model

    model = build_model(cfg, torch.device("cpu"))
    assert model.compute_dtype == precision.DTYPES[want]
    assert Fp8Ops.for_device(cfg.fp8, torch.device("cpu")).compute_dtype == precision.DTYPES[want]


def test_under_the_avx2_cap_the_real_measurement_picks_fp32(tmp_path):
    """No mock: a child process with torch capped to AVX2 (bf16 GEMMs ~100x slower than
    fp32 there) must choose fp32, whatever this host can do uncapped."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
           "MOEFORGE_CACHE": str(tmp_path)}
    code = "from moeforge import precision; c = precision.cpu_choice(); print(c.name); print(c.reason)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    name, reason = out.stdout.strip().splitlines()
    assert name == "fp32", reason
