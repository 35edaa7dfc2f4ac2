"""Blockwise E4M3 quantization against an independent NumPy transcription of the convention."""

import numpy as np
import pytest
import torch

from moeforge.fp8.quant import E4M3_MAX, dequantize, quantize


def np_round_e4m3(v: np.ndarray) -> np.ndarray:
    """Nearest E4M3 value (ties to even) by arithmetic, not by a cast: 3 mantissa bits,
    normal exponents down to -6, subnormal step 2^-9, saturation at 448."""
    v = np.clip(v.astype(np.float64), -448.0, 448.0)
    _, e = np.frexp(np.abs(v))  # |v| = f * 2**e, f in [0.5, 1): the leading bit is 2**(e-1)
    step = np.exp2(np.maximum(e - 1, -6) - 3)
    return np.round(v / step) * step  # np.round is half-to-even


def np_quantize(x: np.ndarray, br: int, bc: int, eps: float, pow2: bool):
    """Tile by tile, with loops, as the convention is written: s = max(amax, eps) / 448."""
    r, c = x.shape
    nr, nc = -(-r // br), -(-c // bc)
    s = np.zeros((nr, nc), np.float32)
    q = np.zeros_like(x, dtype=np.float64)
    for i in range(nr):
        for j in range(nc):
            tile = x[i * br:(i + 1) * br, j * bc:(j + 1) * bc].astype(np.float32)
            sc = np.float32(max(np.abs(tile).max(), np.float32(eps))) / np.float32(448.0)
            if pow2:
                sc = np.float32(2.0 ** np.ceil(np.log2(sc)))
            s[i, j] = sc
            q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = np_round_e4m3(tile / sc)
    return q, s


BLOCKS = [(1, 128), (128, 128), (128, 1)]


@pytest.mark.parametrize("block", BLOCKS, ids=["1x128", "128x128", "128x1"])
@pytest.mark.parametrize("pow2", [False, True], ids=["fp32-scale", "pow2-scale"])
def test_matches_numpy_transcription(block, pow2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 300, generator=g) * torch.logspace(-3, 2, 300)  # channels of many magnitudes
    x[5, :] = 0.0  # an all-zero row: eps keeps the scale finite
    q = quantize(x, block, eps=1e-12, power_of_2=pow2)
    q_np, s_np = np_quantize(x.numpy(), *block, 1e-12, pow2)
    assert q.data.dtype == torch.float8_e4m3fn and q.scale.dtype == torch.float32
    assert q.scale.shape == s_np.shape
    np.testing.assert_array_equal(q.scale.numpy(), s_np)
    np.testing.assert_array_equal(q.data.float().numpy(), q_np)


@pytest.mark.parametrize("block", BLOCKS, ids=["1x128", "128x128", "128x1"])
def test_error_bound_and_no_overflow(block):
    x = torch.randn(257, 333) * 50
    q = quantize(x, block)
    xd = dequantize(q)
    # within a tile: |x - q s| <= half a step; E4M3 normals have relative step 2^-3, and
    # values under the smallest normal (2^-6 s) have an absolute step of 2^-9 s.
    s_full = q.scale.repeat_interleave(block[0], 0)[:257].repeat_interleave(block[1], 1)[:, :333]
    bound = torch.maximum(x.abs() * 2.0**-4, s_full * 2.0**-10) * (1 + 1e-6)
    assert ((x - xd).abs() <= bound).all()
    assert q.data.float().abs().max() <= E4M3_MAX
    assert torch.isfinite(xd).all()
    # the tile maximum is hit exactly: amax / s = 448 is an E4M3 value
    assert (q.data.float().abs().amax() == E4M3_MAX)


def test_tiles_are_local():
    """An outlier changes its own tile's scale and nothing else."""
    x = torch.randn(256, 512)
    for block in BLOCKS:
        base = quantize(x, block)
        y = x.clone()
        y[130, 300] = 1e4
        q = quantize(y, block)
        changed = (q.scale != base.scale).nonzero().tolist()
        assert changed == [[130 // block[0], 300 // block[1]]], (block, changed)
        # values outside the outlier's tile are bit-identical
        tile = torch.zeros_like(x, dtype=torch.bool)
        r0, c0 = 130 // block[0] * block[0], 300 // block[1] * block[1]
        tile[r0:r0 + block[0], c0:c0 + block[1]] = True
        assert torch.equal(q.data.float()[~tile], base.data.float()[~tile])


def test_partial_tiles_and_batch_dims():
    x = torch.randn(3, 130, 200)  # 3 "experts", neither size a multiple of 128
    q = quantize(x, (128, 128))
    assert q.data.shape == x.shape and q.scale.shape == (3, 2, 2)
    for e in range(3):  # batch dims are independent quantizations
        qe = quantize(x[e], (128, 128))
        assert torch.equal(q.scale[e], qe.scale) and torch.equal(q.data[e].float(), qe.data.float())
    # the partial tile's scale comes from its own (smaller) set of values only
    assert torch.equal(q.scale[0, 1, 1], x[0, 128:, 128:].abs().max() / 448)
    assert quantize(torch.randn(7), (1, 128)).scale.shape == (1, 1)


def test_transpose_reuses_square_blocks():
    w = torch.randn(300, 200)
    q = quantize(w, (128, 128))
    assert torch.equal(q.t().dequantize(), q.dequantize().t())
    assert torch.equal(quantize(w.t(), (128, 128)).scale, q.scale.t())


def test_bf16_input_and_output():
    x = torch.randn(64, 256, dtype=torch.bfloat16)
    q = quantize(x)
    assert torch.equal(q.scale, quantize(x.float()).scale)
    assert dequantize(q, torch.bfloat16).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- fast CPU path
def plain_quantize(x: torch.Tensor, block):
    """The convention in the fewest words: zero-pad to whole tiles, one amax per tile,
    fp32 divide, clamp, cast (the implementation avoids the padding and the clamp pass)."""
    br, bc = block
    r, c = x.shape[-2:]
    xp = torch.nn.functional.pad(x.float(), (0, -c % bc, 0, -r % br))
    xb = xp.unflatten(-1, (-1, bc)).unflatten(-3, (-1, br))
    s = xb.abs().amax(dim=(-3, -1)).clamp_min(1e-12) / E4M3_MAX
    q = (xb / s[..., :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-4, -3).flatten(-2, -1)[..., :r, :c], s


@pytest.mark.parametrize("shape", [(70, 300), (256, 512), (3, 130, 200), (129, 1), (1, 129), (5, 3)])
@pytest.mark.parametrize("block", BLOCKS + [(4, 8)], ids=["1x128", "128x128", "128x1", "4x8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_path_bit_identical_to_plain_transcription(shape, block, dtype):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(shape, generator=g) * torch.logspace(-6, 5, shape[-1])).to(dtype)
    x0 = x.clone()
    q = quantize(x, block)
    pq, ps = plain_quantize(x, block)
    assert torch.equal(x, x0)  # the input is never modified
    assert torch.equal(q.scale, ps)
    assert torch.equal(q.data.view(torch.uint8), pq.view(torch.uint8))
    for out in (torch.float32, torch.bfloat16):
        s_full = ps.repeat_interleave(block[0], -2)[..., :shape[-2], :]
        s_full = s_full.repeat_interleave(block[1], -1)[..., :shape[-1]]
        expect = (pq.float() * s_full).to(out)
        assert torch.equal(dequantize(q, out), expect)
        assert torch.equal(dequantize(q.t(), out), expect.transpose(-2, -1))


def test_integer_decode_of_every_e4m3_code():
    from moeforge.fp8.quant import _decode_f16

    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    ref = codes.float()
    got = _decode_f16(codes).float() * 256
    finite = ~ref.isnan()
    assert torch.equal(got[finite], ref[finite])  # zeros, subnormals, normals, both signs


def test_quantize_many_shares_work_not_results():
    from moeforge.fp8.quant import quantize_many

    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(300, 200).to(dtype)
        x0 = x.clone()
        many = quantize_many(x, ((1, 128), (128, 1)))
        assert torch.equal(x, x0)
        for block, q in zip(((1, 128), (128, 1)), many):
            one = quantize(x, block)
            assert torch.equal(q.scale, one.scale) and torch.equal(q.data.view(torch.uint8), one.data.view(torch.uint8))
    x = torch.randn(300, 200)
    ref = quantize(x, (128, 1))
    (q,) = quantize_many(x, ((128, 1),), overwrite=True)  # the Wgrad re-tiling owns its input
    assert torch.equal(q.data.view(torch.uint8), ref.data.view(torch.uint8))
