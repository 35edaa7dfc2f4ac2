"""Memory-lean autograd Functions: save the inputs, recompute the rest in backward.

DeepSeek-V3 (TR sections 3.2.3 and 3.3.2) recomputes RMSNorm and the MLA up-projections
in backward and caches the SwiGLU inputs, recomputing its output; under FP8 those cached
inputs are themselves FP8 with 1x128 tiles. Plain autograd keeps far more: RMSNorm's FP32
copy of x, the normalised x and the scaled output; SwiGLU's silu(a) next to a and b;
attention's per-head q, k and v; the router's FP32 copy of its input; the MoE combine's
source rows.

Choices:

- :func:`rms_norm` saves x in its own dtype plus one FP32 ``rstd`` per row. Its torch
  backward is the *same sequence of ops* autograd runs for ``RMSNorm``'s forward (mul,
  sum over the broadcast dims, rsqrt's ``-0.5 * g * r^3``, mean's ``/ C``, pow's ``2x``),
  so results are bit-identical to the plain graph (``tests/test_recompute.py`` checks
  with ``torch.equal``): recomputation changes memory, not numbers. The same holds for
  every Function here except the FP8-cached SwiGLU, and except that bf16 norms on CPU run
  on a C kernel (``norm_kernel.py``: one pass each way instead of ~18; equal to FP32
  rounding, sums in another order).
- :func:`swiglu` ``silu(a) * b`` saves a and b and recomputes silu(a) with the same
  kernel. With ``fp8`` set (``fp8.convert`` does when ``fp8.cache_swiglu``), a and b are
  saved as E4M3 with 1x128 scales instead, as V3 does; backward then runs on their
  dequantized values (a deliberate approximation, part of the FP8 recipe).
- Norm and SwiGLU outputs are rebuilt, not kept, by the consumers that know how: the
  router (:func:`fp32_linear`), dense layers (:func:`linear`), FP8 GEMMs and the routed
  experts look the output up in a registry :func:`rms_norm` and :func:`swiglu` fill
  (:func:`source`) and keep what the producer keeps anyway (the norm's input; the
  SwiGLU's inputs); backward runs the producer's forward again, bit for bit. For bf16
  dense and shared MLPs that drops the down projection's copy of the SwiGLU output (1 MB
  per shared expert and 3 MB per dense layer on the small preset); under FP8 the down
  projection keeps its E4M3 copy (see :func:`swiglu`). :func:`cat_outputs` makes two
  such outputs side by side (MTP's projection input) rebuildable too.
- Beyond V3, under ``fp8.cache_norm_inputs`` (off by default): :func:`rms_norm` saves its
  input in E4M3 (backward and the rebuilds run on the dequantized value: approximate),
  and :func:`rounded_latents` rounds MLA's latents to E4M3 in forward, so that
  :func:`recomputed_attention` can keep them in 8 bits and still rebuild q, k, v exactly.
- :func:`recomputed_attention` keeps the two latents the up-projections start from and
  the log-sum-exp; q, k, v are rebuilt in backward. The attention output is kept only
  for the flash backward (in the output projection's layout, so a bf16 output projection
  keeps that same tensor): the C backward sums the softmax rows' <do, o> from p and dp
  and needs no output, so under FP8 only wo's E4M3 copy of it remains (1 byte per
  element instead of 2; V3 also keeps this activation in a narrow format, E5M6). About a
  quarter of what attention kept before, for two extra small GEMMs. Its backward runs on
  ``attention_kernel.py`` (batched GEMMs around one C pass, ~1.45x the flash kernel's speed
  at these lengths) where that applies, else on the flash-attention backward.
- Plain tensors only: with DTensors (tensor/sequence parallelism) callers keep the
  ordinary autograd graph, whose sharding propagation is already proven. Callers ask
  :func:`is_plain` through this module at call time, so one switch (tests patch it)
  turns every lean path off.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from moeforge.model import attention_kernel, norm_kernel, weight_cache


def rms_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised x in x's dtype, rstd): the one forward every caller (and recompute) runs.
    bf16 on CPU: the C kernel (``norm_kernel.py``), one pass instead of six."""
    done = norm_kernel.forward(x, weight, eps)
    if done is not None:
        return done
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * rstd * weight.float()).to(x.dtype), rstd


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, kept: tuple[torch.Tensor, ...],
                restore) -> torch.Tensor:
        y, rstd = rms_forward(x, weight, eps)
        ctx.save_for_backward(*kept, rstd, weight)  # x, or its E4M3 copy and scales
        ctx.restore = restore  # kept -> (x,)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        getattr(ctx, "cell", []).clear()  # consumers' rebuilt output: all of them are done
        *kept, rstd, weight = ctx.saved_tensors
        (x,) = ctx.restore(*kept)
        done = norm_kernel.backward(x, weight, dy, rstd, ctx.needs_input_grad[1])
        if done is not None:
            return done[0], done[1], None, None, None
        x32, w32, g = x.float(), weight.float(), dy.float()
        y = x32 * rstd  # recomputed exactly as in forward
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (g * y).sum(dim=tuple(range(g.dim() - 1))).to(weight.dtype)
        gy = g * w32
        # autograd's formulas for x32 * rsqrt(mean(x32^2) + eps), in its order
        dx = gy * rstd
        dr = (gy * x32).sum(-1, keepdim=True)
        dm = -0.5 * dr * rstd.pow(3)
        dx = dx + (dm / x32.shape[-1]).expand_as(x32) * (2 * x32)
        return dx.to(x.dtype), dw, None, None, None


# Outputs a later consumer may rebuild in backward instead of saving: output -> (its
# version, the tensors its producer saves anyway, a function of them giving the output,
# the cell the rebuilt output is shared in), held only while the output lives. Norm outputs
# (rebuilt from the norm's input) and SwiGLU outputs (from its saved inputs) register here.
_SOURCES = WeakIdKeyDictionary()


def _register(out: torch.Tensor, tensors: tuple[torch.Tensor, ...], make: Callable[..., torch.Tensor]) -> None:
    """Register ``out = make(*tensors)`` (the same bits). The producer's backward
    (``out.grad_fn``, which runs after every consumer's) gets the cell, to empty it."""
    if out.requires_grad and not torch.compiler.is_compiling():
        cell: list = []  # the rebuilt output, once
        _SOURCES[out] = (out._version, tensors, make, cell)
        out.grad_fn.cell = cell


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fp8=None) -> torch.Tensor:
    """``x / rms(x) * weight`` computed in FP32, returned in x's dtype; saves x and rstd.

    With ``fp8`` (an ``Fp8Config``; ``fp8.convert`` sets it under ``fp8.cache_norm_inputs``)
    x is saved as E4M3 with 1x128 scales instead, and the norm's backward and its
    consumers' rebuilt outputs run on that copy's dequantized value with the forward's
    exact rstd: the forward is unchanged, the gradients are approximate (beyond V3's
    recipe, which keeps the residual stream at the norms in high precision)."""
    kept, restore = _narrowed(fp8, x)
    y = _RMSNormFn.apply(x, weight, eps, kept, restore)
    _register(y, (*kept, weight), partial(_norm_output, eps=eps, restore=restore))
    return y


def _norm_output(*tensors: torch.Tensor, eps: float, restore) -> torch.Tensor:
    *kept, weight = tensors
    return rms_forward(*restore(*kept), weight, eps)[0]


class _CatFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *ts: torch.Tensor) -> torch.Tensor:
        ctx.sizes = [t.shape[-1] for t in ts]
        return torch.cat(ts, dim=-1)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        getattr(ctx, "cell", []).clear()  # the consumer's rebuilt output: it is done
        return g.split(ctx.sizes, dim=-1)


def cat_outputs(*ts: torch.Tensor) -> torch.Tensor:
    """``torch.cat(ts, -1)``; when every t is a rebuildable output (:func:`source`), so is
    the result: its consumer keeps what their producers keep anyway and rebuilds the
    concatenation in backward, bit for bit. (MTP's projection reads two norm outputs side
    by side: 4 MB of a small step that no one else needs.)"""
    srcs = [source(t) for t in ts]
    if any(s is None for s in srcs):
        return torch.cat(ts, dim=-1)
    out = _CatFn.apply(*ts)
    _register(out, tuple(x for s in srcs for x in s[0]), partial(_cat_rebuilt, parts=[(len(s[0]), s[1]) for s in srcs]))
    return out


def _cat_rebuilt(*tensors: torch.Tensor, parts) -> torch.Tensor:
    out, i = [], 0
    for n, rebuild in parts:
        out.append(rebuild(*tensors[i:i + n]))
        i += n
    return torch.cat(out, dim=-1)


# Outputs a Function here saves exactly as it returns them (the attention output): a
# consumer that needs a lower-precision copy of one for backward can keep the tensor
# itself (no new bytes) and derive the copy again there.
_KEPT = WeakIdKeyDictionary()


def kept_as_is(t: torch.Tensor) -> bool:
    """True when ``t`` (or the tensor it views) is saved unchanged for backward already."""
    if torch.compiler.is_compiling():
        return False
    for key in (t, t._base):
        hit = _KEPT.get(key) if key is not None else None
        if hit is not None and hit == key._version:
            return True
    return False


def _rebuild(make: Callable[..., torch.Tensor], cell: list, *tensors: torch.Tensor) -> torch.Tensor:
    if not cell:
        cell.append(make(*tensors))
    return cell[0]


def source(t: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], Callable[..., torch.Tensor]] | None:
    """When ``t`` (or the tensor it views) is a registered output unchanged since: (the
    tensors its producer keeps for backward anyway, ``rebuild``), so a consumer can save
    those (no new bytes) and call ``rebuild(*tensors)`` in backward; else None.

    ``rebuild`` gives the output again, bit for bit (approximately where the producer keeps
    E4M3 copies: ``fp8.cache_norm_inputs``, ``fp8.recompute_swiglu_output``). It runs once per forward call: consumers of one output (wq_a and wkv_a; the router,
    shared and routed experts) share it. Rebuilding once per consumer cost ~7% of a small
    bf16 step. (A lookup keyed by the producer's input served wrong values under pipeline
    schedules; the cell lives exactly as long as the consumers' graph nodes, or until the
    producer's backward empties it.)"""
    if torch.compiler.is_compiling():
        return None
    for key in (t, t._base):
        hit = _SOURCES.get(key) if key is not None else None
        if hit is not None and hit[0] == key._version:
            return hit[1], partial(_rebuild, hit[2], hit[3])
    return None


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, kept: tuple[torch.Tensor, ...], inputs) -> torch.Tensor:
        ctx.save_for_backward(*kept)  # a and b, or their E4M3 copies and scales
        ctx.inputs = inputs  # kept -> (a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        getattr(ctx, "cell", []).clear()  # the down projection's rebuilt output: it is done
        a, b = ctx.inputs(*ctx.saved_tensors)
        da = torch.ops.aten.silu_backward(dy * b, a) if ctx.needs_input_grad[0] else None
        db = dy * F.silu(a) if ctx.needs_input_grad[1] else None
        return da, db, None, None


def swiglu(a: torch.Tensor, b: torch.Tensor, fp8=None) -> torch.Tensor:
    """``silu(a) * b``; saves a and b (E4M3 with 1x128 scales when ``fp8`` is an
    ``Fp8Config``), recomputes silu(a) in backward. Without FP8 its output is a
    :func:`source`: the down projection keeps nothing of its own and rebuilds it.

    Under FP8 it is not, unless ``fp8.recompute_swiglu_output`` (V3's recomputation, from
    the E4M3 inputs): that gave the down projection's Wgrad 1.2x the error of its E4M3 copy
    of the real output (session 9), and the copy costs 1 byte per element (7 MB of a small
    step), so by default the down projection keeps the copy."""
    kept, inputs = _narrowed(fp8, a, b)
    h = _SwiGLUFn.apply(a, b, kept, inputs)
    if fp8 is None or fp8.recompute_swiglu_output:
        _register(h, kept, partial(_swiglu_output, restore=inputs))
    return h


def _as_is(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return ts


def _swiglu_output(*kept: torch.Tensor, restore) -> torch.Tensor:
    a, b = restore(*kept)
    return F.silu(a) * b


def _narrowed(fp8, *ts: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], Callable[..., tuple[torch.Tensor, ...]]]:
    """(what to save for ``ts``, a function of it giving ``ts`` back): the tensors as they
    are without ``fp8``; with it, their E4M3 copies and 1x128 scales, given back
    dequantized (the values backward then runs on: an approximation, part of the recipe)."""
    if fp8 is None:
        return ts, _as_is
    from moeforge.fp8.quant import quantize

    blk = (1, fp8.block_size)
    with torch.no_grad():
        qs = [quantize(t, blk, eps=fp8.eps, power_of_2=fp8.power_of_2_scales) for t in ts]
    return tuple(x for q in qs for x in (q.data, q.scale)), partial(_dequantized, block=blk, dtype=ts[0].dtype)


def _dequantized(*pairs: torch.Tensor, block, dtype) -> tuple[torch.Tensor, ...]:
    """Tensors from their (E4M3 copy, scales) pairs."""
    from moeforge.fp8.quant import Fp8Tensor, dequantize

    return tuple(dequantize(Fp8Tensor(d, sc, block), dtype) for d, sc in zip(pairs[::2], pairs[1::2]))


# ----------------------------------------------------------------------------- MoE router and combine
def _save_input(ctx, x: torch.Tensor, weight: torch.Tensor) -> None:
    """Save a GEMM's input and weight; when x is a norm's or SwiGLU's output
    (:func:`source`), what that keeps anyway instead of x."""
    src = source(x)
    ctx.save_for_backward(*((x,) if src is None else src[0]), weight)
    ctx.rebuild, ctx.x_shape = None if src is None else src[1], x.shape


def _saved_input(ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, weight) as :func:`_save_input` saved them; an output rebuilt, bit for bit."""
    *xs, weight = ctx.saved_tensors
    if ctx.rebuild is None:
        return xs[0], weight
    return ctx.rebuild(*xs).reshape(ctx.x_shape), weight


class _Fp32LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        _save_input(ctx, x, weight)
        return F.linear(x.float(), weight.float())

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight = _saved_input(ctx)
        # autograd's mm formulas for linear(x32, w32) on 2-D x, in its operand order: the
        # weight enters mm transposed (column-major), so autograd forms its gradient as
        # g^T x (mm_mat2_backward keeps that layout), not (x^T g)^T. The two sum in different
        # orders on some CPUs (an AMD EPYC's oneDNN kernels differ in the last bit; an
        # AMX Xeon's happened not to)
        dx = g.mm(weight.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = g.t().mm(x.float()).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw


def fp32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x.float(), weight.float())`` for 2-D x (the FP32 router) that saves x in
    its own dtype: upcasting bf16 is exact, so the FP32 copy autograd would keep (twice
    the bytes) is rebuilt in backward instead. When x is an :func:`rms_norm` output (the
    router reads ``ffn_norm``'s), not even x is kept: backward runs the norm again on its
    saved input (V3 recomputes RMSNorm). Under FP8 nothing else keeps that bf16 x (the
    expert GEMMs keep E4M3 copies), so this drops 2 MB per layer on small. Bit-identical."""
    return _Fp32LinearFn.apply(x, weight)


class _ScatterRowsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src: torch.Tensor, index: torch.Tensor, n_rows: int) -> torch.Tensor:
        ctx.save_for_backward(index)
        return src.new_zeros(n_rows, src.shape[1]).index_add(0, index, src)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (index,) = ctx.saved_tensors
        return g.index_select(0, index), None, None


def scatter_add_rows(src: torch.Tensor, index: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``zeros(n_rows, d).index_add(0, index, src)`` (the MoE combine) that saves only
    ``index``: autograd's ``index_add`` also keeps ``src`` although its gradient is just
    ``g[index]``."""
    return _ScatterRowsFn.apply(src, index, n_rows)


# ----------------------------------------------------------------------------- dense Linear
class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        _save_input(ctx, x, weight)
        return F.linear(x, weight_cache.cast(weight, x.dtype))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight = _saved_input(ctx)
        g2 = g.reshape(-1, g.shape[-1])
        # autograd's mm formulas for linear(x, w.to(dtype)) on x folded to 2-D
        dx = g2.mm(weight_cache.cast(weight, g.dtype)).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        dw = g2.t().mm(x.reshape(-1, x.shape[-1])).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight.to(x.dtype))`` (no bias) that keeps the FP32 master weight, not
    its compute-dtype copy (backward asks ``weight_cache`` for the cast again: all dense
    weights' bf16 copies were ~19 MB of the small preset's activations), and, when x is an :func:`rms_norm` output,
    the norm's input instead of x (rebuilt in backward). Bit-identical gradients."""
    return _LinearFn.apply(x, weight)


# ----------------------------------------------------------------------------- attention
class _RecomputedAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, project, scale: float, vdim: int, stored, q_src: torch.Tensor, kv_src: torch.Tensor, *params):
        with torch.no_grad():
            q, k, v = project(q_src, kv_src)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=True, scale=scale)
        o = out[..., :vdim].transpose(1, 2).contiguous()  # [B, S, H, vdim]: the output projection's input
        # The C backward needs no output (attention_kernel.backward); the flash one does
        ctx.keeps_output = not attention_kernel.handles(q, k, v)
        kept, ctx.restore = stored or ((q_src, kv_src), _as_is)
        ctx.save_for_backward(*kept, o if ctx.keeps_output else None, lse)
        ctx.project, ctx.scale, ctx.params, ctx.padded, ctx.vdim = project, scale, params, out.shape[-1], vdim
        return o

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        *kept, o, lse = ctx.saved_tensors
        srcs = [t.detach().requires_grad_(need) for t, need in zip(ctx.restore(*kept), ctx.needs_input_grad[4:6])]
        with torch.enable_grad():
            q, k, v = ctx.project(*srcs)  # the up-projections again, bit for bit
        o_t = None if o is None else o.transpose(1, 2)
        grads = attention_kernel.backward(do.transpose(1, 2).to(q.dtype), q, k, v, o_t, lse, ctx.scale, ctx.vdim)
        if grads is None:  # the flash kernel wants the padded output columns (exactly zero: V's padding)
            if o is None:
                raise RuntimeError("attention backward: the C kernel declined what it accepted in forward")
            out = o.new_zeros(o.shape[0], o.shape[2], o.shape[1], ctx.padded)
            out[..., : o.shape[-1]] = o.transpose(1, 2)
            dout = do.new_zeros(out.shape)
            dout[..., : o.shape[-1]] = do.transpose(1, 2)
            grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dout, q, k, v, out, lse, 0.0, True, scale=ctx.scale)
        dq, dk, dv = grads
        wrt = [t for t in (*srcs, *ctx.params) if t.requires_grad]
        got = iter(torch.autograd.grad((q, k, v), wrt, (dq, dk, dv), allow_unused=True))
        grads = [next(got) if t.requires_grad else None for t in (*srcs, *ctx.params)]
        return (None, None, None, None, *grads)


def recomputed_attention(project, q_src: torch.Tensor, kv_src: torch.Tensor, params: list[torch.Tensor],
                         scale: float, vdim: int, stored=None) -> torch.Tensor:
    """Causal attention over ``q, k, v = project(q_src, kv_src)`` ([B, H, S, D] each, V
    zero-padded to D) that saves only the small inputs, the output ``[B, S, H, vdim]``
    and the log-sum-exp, and runs ``project`` again in backward: DeepSeek-V3's
    recomputation of the MLA up-projections (TR section 3.2.3). ``params`` are the
    parameters ``project`` uses. ``stored`` (from :func:`rounded_latents`): save these
    tensors instead of the two inputs, and a function of them giving the inputs back, the
    same bits. CPU only (it calls the CPU flash-attention kernels that
    ``scaled_dot_product_attention`` dispatches to); gradients are bit-identical to
    autograd through the same code."""
    o = _RecomputedAttentionFn.apply(project, scale, vdim, stored, q_src, kv_src, *params)
    if o.requires_grad and not torch.compiler.is_compiling() and o.grad_fn.keeps_output:
        _KEPT[o] = o._version  # saved as it is: the output projection need not keep a copy
    return o


class _RoundedFn(torch.autograd.Function):
    """x -> (its E4M3 rounding with 1x128 scales, dequantized; the codes; the scales);
    the gradient passes straight through the rounding."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fp8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kept, restore = _narrowed(fp8, x)
        ctx.mark_non_differentiable(*kept)
        return (*restore(*kept), *kept)

    @staticmethod
    def backward(ctx, g: torch.Tensor, *_):
        return g, None


def rounded_latents(q_src: torch.Tensor, kv_src: torch.Tensor, kv_rank: int, round_q: bool, fp8):
    """MLA's latents as though wq_a and wkv_a wrote E4M3 (1x128 tiles; of the KV latent only
    the first ``kv_rank`` columns, the rope key stays as it is; ``q_src`` only when
    ``round_q``, i.e. when it is a query latent and not x itself) -> (q_src, kv_src,
    stored): the rounded values, which the forward then uses, and what
    :func:`recomputed_attention` saves instead of them: the codes, the scales and the rope
    key (copied out of wkv_a's output, so that the output can be freed). Backward,
    rebuilt from exactly those values, is exact for the forward computed; the gradient
    passes the rounding straight through."""
    kv, k_pe = kv_src.split([kv_rank, kv_src.shape[-1] - kv_rank], dim=-1)
    kv, *kv_kept = _RoundedFn.apply(kv, fp8)
    k_pe = k_pe.contiguous()
    q_kept = [q_src]
    if round_q:
        q_src, *q_kept = _RoundedFn.apply(q_src, fp8)
    back = partial(_latents_back, block=fp8.block_size)
    return q_src, torch.cat([kv, k_pe], dim=-1), ((*kv_kept, k_pe, *q_kept), back)


def _latents_back(*kept: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_src, kv_src) from what :func:`rounded_latents` stored, the same bits."""
    kv_d, kv_s, k_pe, *q_kept = kept
    (kv,) = _dequantized(kv_d, kv_s, block=(1, block), dtype=k_pe.dtype)
    q_src = q_kept[0] if len(q_kept) == 1 else _dequantized(*q_kept, block=(1, block), dtype=k_pe.dtype)[0]
    return q_src, torch.cat([kv, k_pe], dim=-1)


def is_plain(*ts: torch.Tensor) -> bool:
    """True when none of ``ts`` is a DTensor (those keep the ordinary autograd graph)."""
    return all(type(t) is torch.Tensor or type(t) is torch.nn.Parameter for t in ts)
