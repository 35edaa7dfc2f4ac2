"""The C row-padding kernel (model/rows_kernel.py) against the torch path and an
independent index construction: bytes must match exactly for every dtype, block pattern
(empty experts, blocks cut shorter than their rows, padding) and thread count."""

import pytest
import torch

from moeforge.model import rows_kernel
from moeforge.model.expert_ffn import repad_rows
from moeforge.model.moe import padded_rows

pytestmark = pytest.mark.skipif(rows_kernel.KERNEL.get() is None, reason="no C compiler")


def _reference(x, counts, padded):
    """Row i of block b goes to the block's start + i when i < padded[b]; the rest are zeros."""
    out = x.new_zeros(sum(padded), *x.shape[1:])
    src = dst = 0
    for c, p in zip(counts, padded):
        k = min(c, p)
        out[dst : dst + k] = x[src : src + k]
        src, dst = src + c, dst + p
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.int64])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_reference_and_torch_path(dtype, threads):
    g = torch.Generator().manual_seed(0)
    counts = [int(c) for c in torch.randint(0, 300, (32,), generator=g)]
    counts[3] = 0  # an expert with no rows
    padded = [-(-c // 128) * 128 for c in counts]
    x = torch.randn(sum(counts), 96, generator=g).to(dtype)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = repad_rows(x, counts, padded)
        back = repad_rows(out, padded, counts)
    finally:
        torch.set_num_threads(old)
    with rows_kernel.KERNEL.disabled():
        torch_out = repad_rows(x, counts, padded)
    as_bytes = lambda t: t.view(torch.uint8)  # noqa: E731  exact comparison for every dtype (NaN bits too)
    assert torch.equal(as_bytes(out), as_bytes(_reference(x, counts, padded)))
    assert torch.equal(as_bytes(out), as_bytes(torch_out))
    assert torch.equal(as_bytes(back), as_bytes(x))


def test_shorter_blocks_vectors_and_wide_rows():
    """Blocks cut below their row count, 1-D tensors (routing weights, FP8 scales per row
    are 2-D but narrow) and rows wider than the kernel's 64 KiB task size."""
    counts, padded = [5, 0, 7, 1, 4], [3, 2, 8, 1, 0]
    v = torch.arange(17, dtype=torch.float32)
    assert torch.equal(repad_rows(v, counts, padded), _reference(v, counts, padded))
    dest = padded_rows([3, 0, 5, 2], [4, 0, 8, 2], v.device)
    wide = torch.randn(10, 40000)
    assert torch.equal(repad_rows(wide, [3, 0, 5, 2], [4, 0, 8, 2]), torch.zeros(14, 40000).index_copy_(0, dest, wide))
    tall = torch.randn(3000, 4).bfloat16()  # many tasks per block
    cs = [1000, 0, 2000]
    assert torch.equal(repad_rows(tall, cs, [1024, 128, 2048]), _reference(tall, cs, [1024, 128, 2048]))


def test_falls_back_where_it_does_not_apply():
    x = torch.randn(6, 4)
    assert rows_kernel.repad(x.t(), [2, 2], [4, 4]) is None  # not contiguous: the torch path copes
    assert torch.equal(repad_rows(x.t().contiguous().t()[:4], [2, 2], [3, 3]),
                       _reference(x[:4], [2, 2], [3, 3]))
    assert rows_kernel.repad(x, [2, 2], [4, 4]) is None  # counts do not add up to the rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float32])
@pytest.mark.parametrize("threads", [1, 2])
def test_gather_through_an_index(dtype, threads):
    """With an index the kept rows are read through it (the dispatch gather fused with the
    padding): equal to index_select then the reference padding, repeats and cut blocks too."""
    from moeforge.model.expert_ffn import gather_rows

    g = torch.Generator().manual_seed(1)
    counts = [int(c) for c in torch.randint(0, 200, (16,), generator=g)]
    counts[5] = 0
    padded = [-(-c // 64) * 64 for c in counts]
    padded[2] = counts[2] // 2  # a block cut shorter than its rows
    x = torch.randn(300, 40, generator=g).to(dtype)
    index = torch.randint(0, 300, (sum(counts),), generator=g)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = gather_rows(x, index, counts, padded)
    finally:
        torch.set_num_threads(old)
    with rows_kernel.KERNEL.disabled():
        torch_out = gather_rows(x, index, counts, padded)
    as_bytes = lambda t: t.view(torch.uint8)  # noqa: E731
    assert torch.equal(as_bytes(out), as_bytes(_reference(x[index], counts, padded)))
    assert torch.equal(as_bytes(out), as_bytes(torch_out))
    assert rows_kernel.repad(x, counts, padded, index.int()) is None  # int32 index: the torch path
