"""The routed experts' row padding (``expert_ffn.repad_rows``) as one C call
(``csrc/repad_cpu.c``).

On CPU every expert's rows are padded to a multiple of the GEMM ops' ``row_bucket`` for
the GEMMs and unpadded after them; an expert layer re-blocks about eleven tensors per
step (FP8 adds their scales). The torch path is a ``cat`` of two slices per expert: ~65
dispatcher calls per tensor (about 10k slice ops per small-preset step) and a copy that
scaled 1.4x on two cores. The kernel is one call that splits the output rows over the
threads and only moves bytes (memcpy / memset), so every dtype, FP8 included, takes it.
Given an index it also gathers: the experts read their rows from the token rows and the
dispatch gather and the padding are one pass (``expert_ffn.gather_rows``).

:func:`repad` returns None where it does not apply (not a plain contiguous CPU tensor,
compiling, kernel unbuildable or ``MOEFORGE_REPAD_KERNEL=0``); the caller's torch path,
also the tests' reference, runs instead. Results are bit-identical: bytes are copied.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import torch

from moeforge.native import BASE_FLAGS, NativeLibrary


def _configure(lib: ctypes.CDLL) -> None:
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.mf_repad_rows.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i32]
    lib.mf_repad_rows.restype = None


KERNEL = NativeLibrary(Path(__file__).with_name("csrc") / "repad_cpu.c", BASE_FLAGS, _configure,
                       "MOEFORGE_REPAD_KERNEL", "row padding kernel")


def repad(x: torch.Tensor, counts: list[int], padded: list[int],
          index: torch.Tensor | None = None) -> torch.Tensor | None:
    """Blocks of ``counts[i]`` rows of ``x`` -> blocks of ``padded[i]`` rows (first
    min(c, p) rows kept, zeros after), or None (use the torch path). With ``index`` (int64,
    ``sum(counts)`` entries, each a row of ``x``) the rows are ``x[index]``: the gather
    and the padding in one pass."""
    rows = x.shape[0] if index is None else index.numel()
    if (type(x) is not torch.Tensor or x.device.type != "cpu" or not x.is_contiguous() or x.dim() == 0
            or torch.compiler.is_compiling() or rows != sum(counts)):
        return None
    if index is not None and (type(index) is not torch.Tensor or index.dtype != torch.int64
                              or index.device.type != "cpu" or not index.is_contiguous()):
        return None
    lib = KERNEL.get()
    if lib is None:
        return None
    out = x.new_empty(sum(padded), *x.shape[1:])
    if out.numel() == 0:
        return out
    table = torch.tensor([counts, padded], dtype=torch.int64)
    offs = torch.zeros(2, len(counts), dtype=torch.int64)
    offs[:, 1:] = table[:, :-1].cumsum(1)
    row_bytes = math.prod(x.shape[1:]) * x.element_size()
    lib.mf_repad_rows(x.data_ptr(), out.data_ptr(), table[0].data_ptr(), table[1].data_ptr(),
                      offs[0].data_ptr(), offs[1].data_ptr(), None if index is None else index.data_ptr(),
                      len(counts), out.shape[0], row_bytes,
                      torch.get_num_threads())
    return out
