"""Child processes for tests/test_runtime.py: the caching CPU allocator is process-wide and
its threshold fixed at installation, so each scenario runs in a fresh interpreter.

``python tests/cache_child.py MODE`` prints one JSON line; MODE is one of ``reuse``,
``train`` (with ``MOEFORGE_CPU_CACHE=0`` it trains on torch's own allocator), ``exit``
and ``fork``.
"""

from __future__ import annotations

import json
import sys

import torch

from moeforge import runtime

MiB = 2**20


def reuse() -> dict:
    """Which allocations reuse which freed blocks, the limit, emptying."""
    assert runtime.install_cpu_cache(threshold=MiB, limit_mb=24)
    stats = runtime.cpu_cache_stats
    out = {}
    a = torch.empty(3 * MiB, dtype=torch.uint8)
    pa = a.data_ptr()
    del a
    b = torch.empty(3 * MiB + 1024, dtype=torch.uint8)  # rounds to the same 4 MiB
    out["same_size_reused"] = b.data_ptr() == pa
    c = torch.empty(3 * MiB, dtype=torch.uint8)  # b is alive: another block
    out["live_block_not_reused"] = c.data_ptr() != b.data_ptr()
    del b, c  # 2 x 4 MiB cached
    m = stats()["misses"]
    d = torch.empty(20 * MiB, dtype=torch.uint8)
    out["larger_is_new"] = stats()["misses"] == m + 1
    del d  # 28 MiB over the 24 MiB limit: the oldest 4 MiB block goes
    out["oldest_evicted_at_limit"] = stats()["evictions"] == 1 and stats()["cached_bytes"] == 24 * MiB
    e = torch.empty(10 * MiB, dtype=torch.uint8)  # the free 20 MiB block is too big to spend on it
    out["much_larger_block_not_spent"] = stats()["misses"] == m + 2 and stats()["cached_bytes"] == 24 * MiB
    del e
    out["within_limit"] = stats()["cached_bytes"] <= 24 * MiB
    kept = stats()["cached_bytes"]
    big = torch.empty(30 * MiB, dtype=torch.uint8)
    del big  # over the limit by itself: freed at once, without flushing the cached blocks
    out["oversized_block_not_cached"] = stats()["cached_bytes"] == kept
    small = torch.empty(MiB // 2, dtype=torch.uint8)  # under the threshold: torch's own allocator
    before = stats()
    del small
    out["small_not_cached"] = stats() == before
    out["live_bytes_zero"] = stats()["live_bytes"] == 0
    runtime.empty_cpu_cache()
    out["emptied"] = stats()["cached_bytes"] == 0 and stats()["cached_blocks"] == 0
    runtime.set_cpu_cache_limit(0)
    z = torch.empty(8 * MiB, dtype=torch.uint8)
    del z
    out["limit_zero_keeps_nothing"] = stats()["cached_bytes"] == 0
    return out


def train() -> dict:
    """Losses of a few tiny-preset steps, every block of 4 KiB or more through the cache
    (unless ``MOEFORGE_CPU_CACHE=0``)."""
    installed = runtime.install_cpu_cache(threshold=4096, limit_mb=64)
    from moeforge.bench import train_step
    from moeforge.config import load_config

    torch.manual_seed(0)
    cfg = load_config("tiny", {"train.progress": False})
    tokens = torch.randint(0, cfg.model.vocab_size, (4, 65), generator=torch.Generator().manual_seed(1))
    step, loss, _ = train_step(cfg, tokens)
    losses = []
    for _ in range(4):
        with torch.no_grad():
            losses.append(float(loss()).hex())
        step()
    return {"installed": installed, "losses": losses, "hits": runtime.cpu_cache_stats()["hits"]}


KEEP = []


def exit_() -> dict:
    """Large tensors still alive when the interpreter exits (freed during teardown)."""
    assert runtime.install_cpu_cache(threshold=MiB)
    KEEP.extend(torch.ones(2 * MiB) for _ in range(3))
    del KEEP[0]
    return {"ok": True}


class _Big(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((MiB,), float(i))  # 4 MiB per sample: through the cache in the worker


def fork() -> dict:
    """Data loader workers (forked while the parent holds cached blocks) allocate large tensors."""
    assert runtime.install_cpu_cache(threshold=MiB)
    junk = torch.empty(8 * MiB, dtype=torch.uint8)
    del junk  # a cached block in the parent at fork time
    loader = torch.utils.data.DataLoader(_Big(), batch_size=1, num_workers=2, multiprocessing_context="fork")
    return {"means": [float(b.mean()) for b in loader]}


if __name__ == "__main__":
    mode = sys.argv[1]
    result = {"reuse": reuse, "train": train, "exit": exit_, "fork": fork}[mode]()
    print(json.dumps(result))
