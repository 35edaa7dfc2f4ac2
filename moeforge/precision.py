"""Which compute dtype a run uses when its config says ``"auto"``: the machine decides.

``train.dtype`` (the model's compute dtype) and ``fp8.cpu_gemm_dtype`` (the dtype of the
emulated FP8 GEMM on CPU) default to ``"auto"``; an explicit ``"bf16"`` or ``"fp32"``
always wins.

Choices:
- CUDA: bf16, the recipe's dtype; every GPU we target has fast bf16 matmuls.
- CPU: bf16 only where this CPU runs a bf16 GEMM at least as fast as an fp32 one, else
  fp32. The two classes are far apart, so the rule is robust: with AVX512-BF16 or AMX a
  bf16 GEMM runs ~2-4x the fp32 rate; with only AVX2, torch has no fast bf16 GEMM and it
  runs ~0.01x (0.7-0.9 vs 53-160 GFLOP/s measured on two AVX2-class setups), which made a
  bf16 default turn a 3-minute demo into an hour.
- Known from the CPU's features where they settle it: an x86 CPU whose flags lack
  ``avx512_bf16`` and ``amx_bf16`` has no fast bf16 GEMM, so nothing is measured.
  Otherwise the two rates are *measured* (512^3 GEMMs, interleaved, best of 5, about a
  second), because the flags are not the whole story: ``ONEDNN_MAX_CPU_ISA`` (the AVX2
  cap CI uses) or another torch build can take the fast kernels away.
- The measurement is cached per CPU (model and flags), machine, torch version and the
  environment switches that change torch's kernels, in ``$MOEFORGE_CACHE/precision.json``,
  as the C kernels' builds are: measured once per machine, not per run.
- The choice and its reason are printed once per process (rank 0 under torchrun) and
  recorded in the run's ``metrics.jsonl`` info line, so a run says what it ran in and why.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# the environment switches that change which GEMM kernels torch (ATen, oneDNN) may use
ISA_SWITCHES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
FAST_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Choice:
    name: str  # "bf16" | "fp32"
    reason: str  # one line, for the console and the run's record

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]


_choices: dict[str, Choice] = {}  # per device type, for this process
_printed: set[str] = set()


def cache_file() -> Path:
    from moeforge.native import cache_dir  # no compiler involved: only where the cache lives

    return cache_dir() / "precision.json"


def _cpu_key() -> str:
    """The cache entry's name: machine, torch, the ISA switches, and a hash of the CPU's
    model and flags (the whole flag list is long)."""
    from moeforge.native import cpu_id

    env = ",".join(f"{k}={os.environ[k]}" for k in ISA_SWITCHES if os.environ.get(k))
    cpu = hashlib.sha256(cpu_id().encode()).hexdigest()[:12]
    return f"{platform.machine()} cpu {cpu} torch {torch.__version__}" + (f" {env}" if env else "")


def _cpu_flags() -> set[str] | None:
    """The x86 feature flags from /proc/cpuinfo, or None where they are not known."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def measure_gemm_rates(n: int = 512, reps: int = 5) -> dict[str, float]:
    """GFLOP/s of an n^3 GEMM in bf16 and in fp32 on this CPU, timed alternately (so a load
    from elsewhere hits both alike), best of ``reps`` after a warm-up."""
    gen = torch.Generator().manual_seed(0)  # private: the caller's RNG stream stays untouched
    ops = {k: (torch.randn(n, n, generator=gen).to(dt), torch.randn(n, n, generator=gen).to(dt))
           for k, dt in DTYPES.items()}
    best = {k: float("inf") for k in ops}
    for i in range(reps + 1):
        for k, (a, b) in ops.items():
            t = time.perf_counter()
            a @ b
            if i:
                best[k] = min(best[k], time.perf_counter() - t)
    return {k: 2 * n ** 3 / t / 1e9 for k, t in best.items()}


def _cached_rates() -> tuple[dict[str, float], bool]:
    """(rates, from_cache): the measurement of this CPU, measured now when not cached."""
    path, key = cache_file(), _cpu_key()
    try:
        table = json.loads(path.read_text())
        table = table if isinstance(table, dict) else {}
    except (OSError, ValueError):
        table = {}
    try:
        return {k: float(table[key][k]) for k in DTYPES}, True
    except (KeyError, TypeError, ValueError):
        pass
    rates = measure_gemm_rates()
    table[key] = {**rates, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(path)  # atomic: torchrun's ranks may write at once
    except OSError:
        pass  # a read-only home: measured again next time
    return rates, False


def cpu_choice() -> Choice:
    """bf16 or fp32 for this CPU, with the reason (see the module docstring)."""
    flags = _cpu_flags()
    if platform.machine() in ("x86_64", "AMD64") and flags is not None and not flags & set(FAST_BF16_FLAGS):
        return Choice("fp32", "this CPU has no AVX512-BF16 or AMX, so torch has no fast bf16 GEMM on it")
    rates, cached = _cached_rates()
    ratio = rates["bf16"] / max(rates["fp32"], 1e-9)
    how = f"bf16 GEMM {rates['bf16']:.0f} GFLOP/s vs fp32 {rates['fp32']:.0f} ({ratio:.2f}x), " + (
        f"measured earlier, cached in {cache_file()}" if cached else "measured now")
    if ratio >= 1.0:
        return Choice("bf16", f"this CPU runs bf16 GEMMs fast: {how}")
    return Choice("fp32", f"this CPU runs bf16 GEMMs slowly: {how}")


def machine_choice(device: torch.device | str) -> Choice:
    """What ``"auto"`` means on ``device`` (computed once per process and device type)."""
    kind = torch.device(device).type
    if kind not in _choices:
        _choices[kind] = Choice("bf16", "CUDA: bf16 matmuls run on the tensor cores") if kind == "cuda" else cpu_choice()
    return _choices[kind]


def resolve(name: str, device: torch.device | str, field: str = "train.dtype") -> Choice:
    """The dtype a config value ``name`` ("auto" | "bf16" | "fp32") means on ``device``;
    an automatic choice is printed once per process (on rank 0)."""
    if name != "auto":
        return Choice(name, f"set by {field}")
    choice = machine_choice(device)
    line = f"{field} = auto -> {choice.name} ({choice.reason})"
    if line not in _printed and os.environ.get("RANK", "0") == "0":
        _printed.add(line)
        print(f"[moeforge] {line}; set {field} to override", file=sys.stderr, flush=True)
    return choice


def compute_dtype(cfg, device: torch.device | str) -> torch.dtype:
    """The model's compute dtype for a config tree (``cfg.train.dtype`` resolved)."""
    return resolve(cfg.train.dtype, device).dtype


def record(cfg, device: torch.device | str) -> dict[str, str]:
    """What a run records of its precision: each dtype and why it is what it is."""
    train = resolve(cfg.train.dtype, device)
    out = {"train.dtype": train.name, "train.dtype_reason": train.reason}
    if cfg.fp8.enabled and torch.device(device).type == "cpu":
        gemm = resolve(cfg.fp8.cpu_gemm_dtype, "cpu", "fp8.cpu_gemm_dtype")
        out.update({"fp8.cpu_gemm_dtype": gemm.name, "fp8.cpu_gemm_dtype_reason": gemm.reason})
    return out
