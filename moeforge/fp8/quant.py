"""Blockwise E4M3 quantization: 1x128 activation tiles, 128x128 weight blocks, 128x1 re-tiling.

Convention (DeepSeek-V3 ``inference/kernel.py``, TR section 3.3):

- every quantized tensor is ``torch.float8_e4m3fn`` (largest finite value 448);
- each tile of ``br x bc`` elements over the last two dimensions gets one FP32 scale,
  computed online from the current tensor: ``s = max(amax, eps) / 448``;
- the scale is *multiplied* to dequantize: ``x ~ q * s``;
- optional power-of-2 scales (the "ue8m0" format): ``s = 2 ** ceil(log2(s))``, rounded up
  so ``|x / s| <= 448`` still holds; then ``x / s`` is exact and the only rounding is the
  cast to E4M3;
- ``x / s`` is clamped to [-448, 448] before the cast. The CPU cast saturates anyway, but
  the CUDA cast turns overflow into NaN, and ``amax / (amax / 448)`` may round to a hair
  above 448.

Choices:

- One function handles every granularity: ``block=(1, 128)`` tiles a row of 128 channels
  (activations, output gradients), ``(128, 128)`` a weight block, ``(128, 1)`` a column of
  128 tokens (the Wgrad re-tiling). Leading dimensions are batch (experts' weights
  ``[E, out, in]`` are quantized per expert).
- Sizes that are not multiples of the block are padded with zeros for the amax (zeros
  never raise it) and cropped afterwards, so a partial tile is simply a smaller tile.
- No Python loop over tiles: the tensor is viewed as ``[..., R/br, br, C/bc, bc]`` and the
  amax is one reduction.
- ``eps`` defaults to 1e-12, not V3's inference value 1e-4: output gradients of a mean
  loss are routinely far below 1e-4, and a floor of 1e-4/448 would push them into E4M3's
  subnormals. ``eps`` only matters for all-zero (or nearly) tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
DEFAULT_EPS = 1e-12


@dataclass
class Fp8Tensor:
    """E4M3 values plus one FP32 scale per ``block`` tile of the last two dimensions."""

    data: torch.Tensor  # float8_e4m3fn, [..., R, C]
    scale: torch.Tensor  # float32, [..., ceil(R / br), ceil(C / bc)]
    block: tuple[int, int]

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
                         (self.block[1], self.block[0]))


def scales_from_amax(amax: torch.Tensor, eps: float = DEFAULT_EPS,
                     power_of_2: bool = False) -> torch.Tensor:
    """FP32 scales ``max(amax, eps) / 448``, optionally rounded up to a power of two."""
    s = amax.float().clamp_min(eps) / E4M3_MAX
    if power_of_2:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    return s


def _blocked(x: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    """View ``[..., R, C]`` as ``[..., R/br, br, C/bc, bc]``, zero-padding partial tiles."""
    r, c = x.shape[-2:]
    pr, pc = (-r) % br, (-c) % bc
    if pr or pc:
        x = F.pad(x, (0, pc, 0, pr))
    return x.reshape(*x.shape[:-2], (r + pr) // br, br, (c + pc) // bc, bc)


def _unblocked(xb: torch.Tensor, r: int, c: int) -> torch.Tensor:
    """Inverse of :func:`_blocked`: back to ``[..., R, C]``, cropping the padding."""
    *lead, nr, br, nc, bc = xb.shape
    x = xb.reshape(*lead, nr * br, nc * bc)
    if nr * br != r or nc * bc != c:
        x = x[..., :r, :c].contiguous()
    return x


def quantize(x: torch.Tensor, block: tuple[int, int] = (1, 128), *, eps: float = DEFAULT_EPS,
             power_of_2: bool = False) -> Fp8Tensor:
    """Quantize ``x`` ([..., R, C], any float dtype; 1-D is treated as one row) to E4M3
    with one online scale per ``block`` tile of its last two dimensions."""
    if x.dim() == 1:
        x = x.unsqueeze(0)
    br, bc = block
    r, c = x.shape[-2:]
    # fp32 arithmetic: x / s then a single rounding, at the cast to E4M3.
    xb = _blocked(x.float(), br, bc)
    amax = xb.abs().amax(dim=(-3, -1))
    s = scales_from_amax(amax, eps, power_of_2)
    q = (xb / s[..., :, None, :, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return Fp8Tensor(_unblocked(q, r, c), s, (br, bc))


def dequantize(q: Fp8Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * s`` per tile, computed in FP32 and rounded once to ``dtype``."""
    if q.data.dim() >= 2 and q.data.stride(-1) != 1 and q.data.stride(-2) == 1:
        return dequantize(q.t(), dtype).transpose(-2, -1)  # a transposed view: no copy
    r, c = q.data.shape[-2:]
    xb = _blocked(q.data.float(), *q.block)
    return _unblocked(xb * q.scale[..., :, None, :, None], r, c).to(dtype)


def fake_quantize(x: torch.Tensor, block: tuple[int, int] = (1, 128), *, eps: float = DEFAULT_EPS,
                  power_of_2: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Quantize and dequantize in one go (what the GEMM fast path consumes)."""
    return dequantize(quantize(x, block, eps=eps, power_of_2=power_of_2), dtype or x.dtype)
