"""Small C kernels for the CPU: built with the system compiler on first use, loaded with ctypes.

Used where eager PyTorch needs many passes over a large tensor for what one pass can do:
the FP8 quantizers (``fp8/csrc/fp8_cpu.c``) and the fused softmax cross-entropy of the
output head (``model/csrc/xent_cpu.c``); and for the one piece that must talk to torch's
C++ API, the caching CPU allocator (``csrc/cpu_cache_alloc.cpp``, see ``runtime.py``).

Choices:

- Plain C and ctypes, not a torch C++ extension: gcc builds a kernel file in about a
  second with no torch headers, and ctypes releases the GIL during the call. A ``.cpp``
  source is built with the C++ compiler against torch's headers and ``libc10`` (the
  flags from :func:`torch_cxx_flags`, torch's version part of the build key), still
  through ctypes and an ``extern "C"`` interface: no pybind11, no Python headers.
- Built once per source, compiler, flags and CPU model/features into ``$MOEFORGE_CACHE``
  (default ``~/.cache/moeforge``; the temporary directory when that is not writable),
  written to a temporary name and renamed, so concurrent ranks do not race. The CPU is
  part of the key because ``-march=native`` code must not run on another CPU (SIGILL).
- Optional: with no C compiler, a failed build, or the library's environment switch set
  to 0, :meth:`NativeLibrary.get` returns None and callers use their torch path, which is
  also the reference the tests compare the kernels with. A missing compiler is said in one
  line per process, not once per kernel file; any other failure in one line per file.
- Threads: kernels use OpenMP and link ``libgomp.so.1``, the runtime torch's CPU wheel
  has already loaded, so they run on torch's own worker threads (pthreads of our own
  competed with torch's spinning idle workers for the cores).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

INCLUDE_DIR = Path(__file__).with_name("csrc")  # headers shared by the kernels (part of the build key)


def march() -> str:
    """``-march=native``, except under torch's CPU cap (``ATEN_CPU_CAPABILITY=avx2`` or
    ``default`` on x86-64), which CI uses to stand in for an older CPU: the kernels are then
    built for that CPU too (x86-64-v3 is AVX2 + FMA), so the capped test run checks the code
    such a CPU would run, not this host's AVX-512 build."""
    cap = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    if platform.machine() in ("x86_64", "AMD64") and cap in ("avx2", "default"):
        return "-march=x86-64-v3" if cap == "avx2" else "-march=x86-64"
    return "-march=native"


BASE_FLAGS = ["-O3", march(), "-fno-math-errno", "-fno-strict-aliasing", "-shared", "-fPIC", "-fopenmp"]


class CompilerMissing(RuntimeError):
    """No C/C++ compiler to build the kernels with (none on PATH, or CC/CXX names a missing program)."""


_told: set[str] = set()


def tell_once(key: str, message: str) -> None:
    """Print ``message`` as one line on stderr, the first time ``key`` comes up in this process."""
    if key not in _told:
        _told.add(key)
        print(f"[moeforge] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("MOEFORGE_CACHE") or Path.home() / ".cache" / "moeforge")


def cpu_id() -> str:
    """The CPU's model and feature flags (part of the build key)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def torch_cxx_flags() -> list[str]:
    """Compiler and linker flags for C++ against the installed torch's c10 (its headers, its
    library by absolute rpath, its C++ ABI); torch's version keys the build."""
    import torch

    root = Path(torch.__file__).parent
    abi = int(torch.compiled_with_cxx11_abi())
    return ["-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-DMF_TORCH_VERSION=\"{torch.__version__}\"",
            f"-I{root / 'include'}", f"-L{root / 'lib'}", f"-Wl,-rpath,{root / 'lib'}"]


def build(source: Path, flags: list[str]) -> ctypes.CDLL:
    """Compile ``source`` into a cached shared library (if not already there) and load it
    (C, or C++ for a ``.cpp`` file: ``CXX``, ``c++`` or ``g++``)."""
    cxx = source.suffix == ".cpp"
    if cxx:
        cc = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    else:
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None or shutil.which(cc) is None:
        raise CompilerMissing(f"no {'C++' if cxx else 'C'} compiler on PATH" if cc is None else f"compiler {cc} not found")
    flags = [*flags, f"-I{INCLUDE_DIR}"]
    src = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(INCLUDE_DIR.glob("*.h")))
    key = hashlib.sha256(src + " ".join([cc, *flags, platform.machine(), cpu_id()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"{source.stem}_{key}.so"
    if not out.is_file():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(out.parent, os.W_OK):
                raise OSError(f"{out.parent} is not writable")
        except OSError:  # e.g. a read-only home: build under the temporary directory instead
            out = Path(tempfile.gettempdir()) / f"moeforge-{os.getuid()}" / out.name
            out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            libs = ["-lc10"] if cxx else ["-lm"]  # after the source: linkers drop unused earlier libraries
            subprocess.run([cc, *flags, str(source), "-o", tmp, *libs], check=True, capture_output=True, text=True)
            os.replace(tmp, out)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"{cc} failed: {e.stderr.strip()[:500]}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ctypes.CDLL(str(out))


class NativeLibrary:
    """One kernel file: built lazily, configured (argtypes) once, switchable off."""

    def __init__(self, source: Path, flags: list[str], configure: Callable[[ctypes.CDLL], None],
                 env_switch: str, what: str):
        self.source, self.flags, self.configure, self.what = source, flags, configure, what
        self._lib: ctypes.CDLL | None = None
        self._tried = False
        self._disabled = os.environ.get(env_switch, "1") == "0"

    def get(self) -> ctypes.CDLL | None:
        """The loaded library, or None when disabled or unbuildable (warned once)."""
        if self._disabled:
            return None
        if not self._tried:
            self._tried = True
            try:
                lib = build(self.source, self.flags)
                self.configure(lib)
                self._lib = lib
            except CompilerMissing as e:
                tell_once("compiler", f"{e}: moeforge's C kernels are off, every op runs on its torch path "
                          "(same results, slower on CPU)")
            except (OSError, RuntimeError, AttributeError) as e:
                tell_once(self.what, f"{self.what} unavailable, using the slower torch path: {e}")
        return self._lib

    @contextlib.contextmanager
    def disabled(self):
        """Run the block on the torch path (tests compare the two)."""
        old, self._disabled = self._disabled, True
        try:
            yield
        finally:
            self._disabled = old
