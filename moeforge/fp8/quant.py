"""Blockwise E4M3 quantization: 1x128 activation tiles, 128x128 weight blocks, 128x1 re-tiling.

Convention (DeepSeek-V3 ``inference/kernel.py``, TR section 3.3):

- every quantized tensor is ``torch.float8_e4m3fn`` (largest finite value 448);
- each tile of ``br x bc`` elements over the last two dimensions gets one FP32 scale,
  computed online from the current tensor: ``s = max(amax, eps) / 448``;
- the scale is *multiplied* to dequantize: ``x ~ q * s``;
- optional power-of-2 scales (the "ue8m0" format): ``s = 2 ** ceil(log2(s))``, rounded up
  so ``|x / s| <= 448`` still holds; then ``x / s`` is exact and the only rounding is the
  cast to E4M3;
- ``x / s`` must land in [-448, 448] (``amax / (amax / 448)`` may round to a hair above
  448). On CPU the cast to e4m3fn saturates, so no clamp pass is spent here; the Triton
  kernels clamp explicitly because the CUDA cast turns overflow into NaN.

Choices:

- One function handles every granularity: ``block=(1, 128)`` tiles a row of 128 channels
  (activations, output gradients), ``(128, 128)`` a weight block, ``(128, 1)`` a column of
  128 tokens (the Wgrad re-tiling). Leading dimensions are batch (experts' weights
  ``[E, out, in]`` are quantized per expert).
- No Python loop over tiles and no padded copies: the tensor is split into at most four
  rectangles of equal tiles (the whole tiles, the partial last tile column, the partial
  last tile row, their corner), each viewed without a copy as ``[..., n_r, h, n_c, w]``, so
  each amax is one reduction and a partial tile is simply a smaller tile.
- CPU speed: when ``cpu_kernels`` can build its C library (it needs a C compiler), fp32
  and bf16 CPU tensors are quantized and dequantized there, one pass per tile, bit for
  bit the numbers below, optionally writing the dequantized operand (``Fp8Tensor.dq``)
  in the same pass. The torch path below is the fallback and the reference; it keeps its
  own economies: the division is FP32 in place on a private FP32 copy, ``|x|`` and that
  copy are shared when one tensor is tiled two ways (:func:`quantize_many`), and E4M3 is
  decoded by integer ops (:func:`_decode_f16`) because torch's e4m3fn -> float cast is
  scalar. All of it equals the plain ``(x.float() / s).clamp(...).to(e4m3fn)`` and
  ``q.float() * s`` (checked in ``tests/test_fp8_quant.py``).
- ``eps`` defaults to 1e-12, not V3's inference value 1e-4: output gradients of a mean
  loss are routinely far below 1e-4, and a floor of 1e-4/448 would push them into E4M3's
  subnormals. ``eps`` only matters for all-zero (or nearly) tiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moeforge.fp8 import cpu_kernels

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
DEFAULT_EPS = 1e-12


@dataclass
class Fp8Tensor:
    """E4M3 values plus one FP32 scale per ``block`` tile of the last two dimensions."""

    data: torch.Tensor  # float8_e4m3fn, [..., R, C]
    scale: torch.Tensor  # float32, [..., ceil(R / br), ceil(C / bc)]
    block: tuple[int, int]
    # The dequantized tensor when the quantizer wrote it in the same pass (CPU kernels):
    # the GEMM operand, used once and never saved for backward.
    dq: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * 4

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)

    def t(self) -> "Fp8Tensor":
        """Transpose the last two dimensions; a 128x128 block stays a 128x128 block,
        which is why weights use square blocks: Dgrad reuses the Fprop quantization."""
        return Fp8Tensor(self.data.transpose(-2, -1), self.scale.transpose(-2, -1),
                         (self.block[1], self.block[0]), None if self.dq is None else self.dq.transpose(-2, -1))


def scales_from_amax(amax: torch.Tensor, eps: float = DEFAULT_EPS,
                     power_of_2: bool = False) -> torch.Tensor:
    """FP32 scales ``max(amax, eps) / 448``, optionally rounded up to a power of two.

    The rounding is exact (from frexp), not ``exp2(ceil(log2(s)))``: FP32 log2 of a value
    just above 2^k can round to k, which would round s *down*."""
    s = amax.float().clamp_min(eps) / E4M3_MAX
    if power_of_2:
        m, e = torch.frexp(s)  # s = m * 2^e, m in [0.5, 1)
        s = torch.where((m == 0.5) | ~s.isfinite(), s, torch.ldexp(torch.ones_like(s), e))
    return s


Region = tuple[int, int, int, int, int, int]  # rows r0:r1 in tiles of h, cols c0:c1 in tiles of w


def _regions(r: int, c: int, br: int, bc: int) -> list[Region]:
    """Split ``[R, C]`` into at most four rectangles of equal tiles: the whole ``br x bc``
    tiles, the partial last tile column, the partial last tile row, and their corner."""
    def spans(n: int, b: int) -> list[tuple[int, int, int]]:
        full = n - n % b
        return [s for s in ((0, full, b), (full, n, n - full)) if s[1] > s[0]]
    return [(r0, r1, h, c0, c1, w) for r0, r1, h in spans(r, br) for c0, c1, w in spans(c, bc)]


def _tiles(t: torch.Tensor, reg: Region) -> torch.Tensor:
    """Region ``reg`` of ``t [..., R, C]`` as a view ``[..., n_r, h, n_c, w]``."""
    r0, r1, h, c0, c1, w = reg
    return t[..., r0:r1, c0:c1].unflatten(-1, ((c1 - c0) // w, w)).unflatten(-3, ((r1 - r0) // h, h))


def _scale_slice(s: torch.Tensor, reg: Region, br: int, bc: int) -> torch.Tensor:
    """The scales of region ``reg``, shaped to broadcast over :func:`_tiles`."""
    r0, r1, h, c0, c1, w = reg
    sv = s[..., r0 // br:r0 // br + (r1 - r0) // h, c0 // bc:c0 // bc + (c1 - c0) // w]
    return sv[..., :, None, :, None]


def quantize(x: torch.Tensor, block: tuple[int, int] = (1, 128), *, eps: float = DEFAULT_EPS,
             power_of_2: bool = False, dq_dtype: torch.dtype | None = None) -> Fp8Tensor:
    """Quantize ``x`` ([..., R, C], any float dtype; 1-D is treated as one row) to E4M3
    with one online scale per ``block`` tile of its last two dimensions. ``dq_dtype``
    asks the CPU kernels to also write the dequantized tensor (``.dq``) in the same pass."""
    return quantize_many(x, (block,), eps=eps, power_of_2=power_of_2, dq_dtype=dq_dtype)[0]


def quantize_many(x: torch.Tensor, blocks: tuple[tuple[int, int], ...], *, eps: float = DEFAULT_EPS,
                  power_of_2: bool = False, overwrite: bool = False,
                  dq_dtype: torch.dtype | None = None) -> list[Fp8Tensor]:
    """:func:`quantize` of one tensor in several tilings (an output gradient is needed 1x128
    for Dgrad and 128x1 for Wgrad). On the C kernels each tiling is one pass over ``x``;
    on the torch path they share its FP32 copy and ``|x|``.

    ``overwrite=True`` lets an FP32 ``x`` be divided in place (the Wgrad re-tiling owns
    the tensor it dequantized); otherwise ``x`` is never modified.
    """
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if cpu_kernels.usable(x):
        x = x.contiguous()
        dq_dtype = dq_dtype if dq_dtype in (torch.float32, torch.bfloat16) else None
        out = []
        for blk in blocks:
            q, s, dq = cpu_kernels.quantize(x, blk, eps, power_of_2, dq_dtype)
            out.append(Fp8Tensor(q, s, blk, dq))
        return out
    r, c = x.shape[-2:]
    # x / s is one FP32 division, then a single rounding at the cast to E4M3.
    xf = x.float().contiguous()
    mine = xf.data_ptr() != x.data_ptr() or overwrite  # a fresh copy may be divided in place
    mag = xf.abs()
    out = []
    for i, (br, bc) in enumerate(blocks):
        regions = _regions(r, c, br, bc)
        dst = xf if mine and i == len(blocks) - 1 else torch.empty_like(xf)
        if len(regions) == 1:  # whole tiles only: the common case, with the fewest small ops
            s = scales_from_amax(_tiles(mag, regions[0]).amax(dim=(-3, -1)), eps, power_of_2)
        else:
            s = torch.empty(*x.shape[:-2], -(-r // br), -(-c // bc), dtype=torch.float32, device=x.device)
        for reg in regions:
            sv = _scale_slice(s, reg, br, bc)
            if len(regions) > 1:
                sv.copy_(scales_from_amax(_tiles(mag, reg).amax(dim=(-3, -1)), eps, power_of_2)[..., :, None, :, None])
            torch.div(_tiles(xf, reg), sv, out=_tiles(dst, reg))
        # No clamp: the CPU cast to e4m3fn saturates to +-448 (platform facts), which covers
        # amax / (amax / 448) rounding a hair above 448. The Triton kernels clamp explicitly,
        # because the CUDA cast turns overflow into NaN.
        out.append(Fp8Tensor(dst.to(E4M3), s, (br, bc)))
    return out


def _decode_f16(q: torch.Tensor) -> torch.Tensor:
    """E4M3 bits -> float16 holding exactly ``value * 2**-8``, by integer ops.

    Why: the cast e4m3fn -> float is scalar on CPU (~10 ns per element, the biggest cost
    of the FP8 step), while these four passes are vectorized. Moving E4M3's 4 exponent and
    3 mantissa bits into float16's fields (``<< 7``; sign-extension puts the sign in bit
    15, the mask clears the copy in bit 14) gives the same number with float16's exponent
    bias 15 instead of 7, subnormals included. Exception: E4M3's NaN pattern decodes to
    +-480 * 2**-8; :func:`quantize` only writes NaN into a tile whose scale is NaN or inf,
    so the dequantized tile is non-finite either way.
    """
    w = q.view(torch.int8).to(torch.int16)
    w.bitwise_left_shift_(7).bitwise_and_(-0x4080)  # -0x4080 is 0xBF80 as int16
    return w.view(torch.float16)


def dequantize(q: Fp8Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * s`` per tile, computed in FP32 and rounded once to ``dtype``."""
    if q.dq is not None and q.dq.dtype == dtype:
        return q.dq
    if q.data.dim() >= 2 and q.data.stride(-1) != 1 and q.data.stride(-2) == 1:
        return dequantize(q.t(), dtype).transpose(-2, -1)  # a transposed view: no copy
    data = q.data if q.data.dim() >= 2 else q.data.unsqueeze(0)
    br, bc = q.block
    if data.device.type == "cpu" and cpu_kernels.available():
        out = cpu_kernels.dequantize(data.contiguous(), q.scale, q.block,
                                     dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32)
        return out.view(q.data.shape).to(dtype)
    # (value * 2^-8) * (s * 2^8) is value * s rounded once: both factors are exact powers
    # of two apart, and s * 256 cannot overflow (s <= FP32 max / 448 < 2^120).
    s = q.scale * 256.0
    out = _decode_f16(data.contiguous()).float()
    for reg in _regions(*data.shape[-2:], br, bc):
        _tiles(out, reg).mul_(_scale_slice(s, reg, br, bc))
    return out.view(q.data.shape).to(dtype)


def fake_quantize(x: torch.Tensor, block: tuple[int, int] = (1, 128), *, eps: float = DEFAULT_EPS,
                  power_of_2: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Quantize and dequantize in one go (what the GEMM fast path consumes)."""
    return dequantize(quantize(x, block, eps=eps, power_of_2=power_of_2), dtype or x.dtype)
