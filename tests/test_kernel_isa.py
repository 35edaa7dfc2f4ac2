"""The C kernels on an AVX2-only CPU: built for it under CI's cap, and as vectorized there
as on an AVX-512 one.

GCC if-converts some loops (``?:`` on floats) only with AVX-512's mask registers; such a
loop compiled for AVX2 silently stays scalar, which made FP8 quantization about 2x slower
on AVX2 CPUs while every test passed. The second test compiles each kernel for both
targets with GCC's vectorizer report and requires every loop vectorized for AVX-512 to be
vectorized for AVX2 as well."""

from __future__ import annotations

import importlib
import os
import pkgutil
import platform
import re
import shutil
import subprocess
import sys

import pytest

import moeforge
from moeforge import native

CC = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
x86_gcc = pytest.mark.skipif(
    platform.machine() != "x86_64" or CC is None or shutil.which(CC) is None
    or "Free Software Foundation" not in subprocess.run([CC, "--version"], capture_output=True, text=True).stdout,
    reason="x86-64 with GCC only")


def kernels() -> list[native.NativeLibrary]:
    """Every C kernel moeforge builds: the NativeLibrary objects its modules define."""
    found = {}
    for m in pkgutil.walk_packages(moeforge.__path__, "moeforge."):
        try:
            mod = importlib.import_module(m.name)
        except ImportError:  # an optional backend (e.g. the CUDA kernels without triton)
            continue
        for v in vars(mod).values():
            if isinstance(v, native.NativeLibrary) and v.source.suffix == ".c":
                found[v.source] = v
    return list(found.values())


def vectorized_loops(lib: native.NativeLibrary, march: str, tmp_path) -> set[int]:
    flags = [f for f in lib.flags if not f.startswith("-march=") and f != "-shared"]
    out = subprocess.run([CC, *flags, f"-march={march}", f"-I{native.INCLUDE_DIR}", "-c", str(lib.source),
                          "-o", str(tmp_path / f"{lib.source.stem}.o"), "-fopt-info-vec-optimized"],
                         capture_output=True, text=True, check=True)
    name = re.escape(lib.source.name)
    return {int(n) for n in re.findall(rf"{name}:(\d+):\d+: optimized: loop vectorized", out.stderr)}


@x86_gcc
def test_every_loop_vectorized_for_avx512_is_vectorized_for_avx2(tmp_path):
    libs = kernels()
    assert len(libs) >= 6, [lib.source.name for lib in libs]
    seen = 0
    for lib in libs:
        wide = vectorized_loops(lib, "x86-64-v4", tmp_path)
        narrow = vectorized_loops(lib, "x86-64-v3", tmp_path)
        assert wide <= narrow, f"{lib.source.name}: lines {sorted(wide - narrow)} stay scalar for AVX2"
        seen += len(wide)
    assert seen >= 20, "GCC's vectorizer report names too few loops: has its format changed?"


@pytest.mark.skipif(platform.machine() != "x86_64" or not shutil.which("objdump") or not shutil.which("cc"),
                    reason="x86-64 with a C compiler and objdump only")
def test_kernels_are_built_for_the_capped_cpu(tmp_path):
    """Under ATEN_CPU_CAPABILITY=avx2 (CI's stand-in for an AVX2-only CPU) the C kernels are
    built for x86-64-v3: the library holds AVX2 code and no AVX-512 (zmm) instruction."""
    code = ("from moeforge.model import norm_kernel\nfrom moeforge import native\n"
            "lib = norm_kernel.KERNEL.get()\nprint(native.march(), lib._name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "MOEFORGE_CACHE": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    flag, so = out.stdout.split()
    assert flag == "-march=x86-64-v3"
    asm = subprocess.run(["objdump", "-d", so], capture_output=True, text=True, check=True).stdout
    assert "ymm" in asm and "zmm" not in asm
