"""Pipeline parallelism: the model cut into stages, run by ``torch.distributed.pipelining``.

Choices:
- Stages are contiguous runs of blocks. The embedding rides with the first stage; final
  norm, head and the MTP modules with the last. Layers are split as evenly as possible
  with the remainder given to the *earliest* stages, because the last one also carries
  the head and the MTP block(s).
- Placement: 1F1B / GPipe hold one stage per rank. Interleaved 1F1B holds stages r and
  r+W on rank r (looped); ZBV and DualPipeV hold stages r and 2W-1-r (V shape), so rank
  0 owns both the first and the last stage.
- What flows between stages is ``(h, emb)``: the MTP modules on the last stage need the
  token embeddings, and sending them (one extra activation per micro-batch) is simpler
  and exact, where a second tied copy of the embedding would need its own gradient sync.
- The last stage's output is ``(logits, *mtp_logits)``; ``lm_loss`` runs on it per
  micro-batch. The schedules scale gradients by 1/n_microbatches, so with equal-sized
  micro-batches the result is the full-batch mean loss.
- MoE statistics: the sequence-balance loss of a layer lives on that layer's stage, far
  from the loss function. It is attached to the hidden state with an autograd Function
  that is the identity forward and injects d(total)/d(aux) = alpha in backward (the trick
  Megatron uses), so no extra tensor crosses stages and the gradient is exact. Tokens
  per expert accumulate per stage over micro-batches; :meth:`PipelineModel.step` sums the
  (zero-padded) rows over the pp group so every rank returns all layers' counts in
  ``Transformer.moe_layers()`` order.
- :class:`PipelineModel` is the module the trainer and checkpoints see: its parameter
  names are the unpipelined model's (``layers.7.attn.wo.weight``), because its children
  are the original sub-modules; the stage wrappers are kept outside the module tree.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, schedules

from moeforge.config import Config
from moeforge.model.moe import MoE
from moeforge.model.transformer import ModelOutput, Transformer
from moeforge.train.losses import lm_loss

SCHEDULES = {
    "gpipe": schedules.ScheduleGPipe,
    "1f1b": schedules.Schedule1F1B,
    "interleaved1f1b": schedules.ScheduleInterleaved1F1B,
    "zbv": schedules.ScheduleZBVZeroBubble,
    "dualpipev": schedules.ScheduleDualPipeV,
}


def split_layers(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous layer ranges per stage, the remainder going to the first stages."""
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def stage_ids(pp_rank: int, pp: int, schedule: str) -> list[int]:
    """Which global stage indices pipeline rank ``pp_rank`` holds."""
    if schedule in ("zbv", "dualpipev"):
        return [pp_rank, 2 * pp - 1 - pp_rank]
    if schedule == "interleaved1f1b":
        return [pp_rank, pp_rank + pp]
    return [pp_rank]


class _AttachAux(torch.autograd.Function):
    """y = h in forward; in backward, aux receives ``scale`` as its gradient (and h its own)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(aux)
        ctx.scale = scale
        return h.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (aux,) = ctx.saved_tensors
        return g, torch.full_like(aux, ctx.scale), None


class Stage(nn.Module):
    """A contiguous slice of a :class:`Transformer`: optional embedding, blocks, optional tail."""

    def __init__(self, model: Transformer, layers: range, first: bool, last: bool, moe_index: dict[int, int]):
        super().__init__()
        self.compute_dtype = model.compute_dtype
        self.aux_scale = model.cfg.seq_aux_alpha
        self.embed = model.embed if first else None
        # keyed by the global index, so names match the unpipelined model
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.norm = model.norm if last else None
        self.head = model.head if last else None
        self.mtp = model.mtp if last else None
        # (MoE, its index in Transformer.moe_layers()) for the balancing counts
        self.moes = [(m, moe_index[id(m)]) for m in self.modules() if isinstance(m, MoE)]
        self.counts: dict[int, torch.Tensor] = {}
        self.aux_loss: torch.Tensor | float = 0.0

    def _collect_moe_stats(self, h: torch.Tensor) -> torch.Tensor:
        aux = []
        for m, gi in self.moes:
            if m.last_counts is not None:
                self.counts[gi] = self.counts.get(gi, 0) + m.last_counts.float()
            if m.last_aux_loss is not None:
                aux.append(m.last_aux_loss)
            m.last_counts = m.last_aux_loss = None
        if aux and self.aux_scale > 0:
            total = torch.stack(aux).sum()
            self.aux_loss = self.aux_loss + self.aux_scale * total.detach()  # for the reported loss
            if torch.is_grad_enabled():
                h = _AttachAux.apply(h, total, self.aux_scale)
        return h

    def forward(self, *args):
        if self.embed is not None:
            emb = self.embed(args[0]).to(self.compute_dtype)
            h = emb
        else:
            h, emb = args
        for layer in self.layers.values():
            h = layer(h)
        if self.head is None:
            return self._collect_moe_stats(h), emb.clone() if self.embed is None else emb
        _, logits, mtp_logits = Transformer.output_heads(self, h, emb)  # the model's own tail
        return (self._collect_moe_stats(logits), *mtp_logits)


class PipelineModel(nn.Module):
    """This rank's stages as one module (original parameter names) plus the schedule."""

    def __init__(self, model: Transformer, cfg: Config, mesh, stages: list[Stage], stage_index: list[int]):
        super().__init__()
        self.cfg = cfg
        self.mesh = mesh
        self.n_moe = len(model.moe_layers())
        self.n_experts_local = model.cfg.n_routed_experts // max(cfg.parallel.ep, 1)
        # register the real sub-modules under their original names (and only those)
        for st in stages:
            if st.embed is not None:
                self.embed = st.embed
            if st.head is not None:
                self.norm, self.head, self.mtp = st.norm, st.head, st.mtp
        self.layers = nn.ModuleDict({k: v for st in stages for k, v in st.layers.items()})
        object.__setattr__(self, "stages", stages)  # outside the module tree on purpose
        self.stage_index = stage_index
        self.holds_first = 0 in stage_index
        self.holds_last = cfg.parallel.pp * cfg.parallel.stages_per_rank - 1 in stage_index
        self._schedule = None
        self._parts: list[dict[str, torch.Tensor]] = []

    def moe_layers(self) -> list[MoE | None]:
        """MoE layers in ``Transformer.moe_layers()`` order; None where another rank holds it."""
        out: list[MoE | None] = [None] * self.n_moe
        for st in self.stages:
            for m, gi in st.moes:
                out[gi] = m
        return out

    def _loss_fn(self, output, labels: torch.Tensor) -> torch.Tensor:
        out = ModelOutput(logits=output[0], mtp_logits=list(output[1:]))
        parts = lm_loss(out, labels, self.cfg.model)
        self._parts.append({k: v.detach() for k, v in parts.items()})
        return parts["loss"]

    def _io_shapes(self, st: Stage, mb: int, seq: int):
        """Example (meta) inputs and outputs of a stage, so no shape-inference forward runs
        (it would call the loss and count experts once more than the batch has)."""
        m, dt = self.cfg.model, self.stages[0].compute_dtype
        # requires_grad marks which received activations get a gradient sent back
        hidden = torch.empty(mb, seq, m.dim, dtype=dt, device="meta", requires_grad=True)
        ins = (torch.empty(mb, seq, dtype=torch.long, device="meta"),) if st.embed is not None else (hidden, hidden)
        if st.head is None:
            return ins, (hidden, hidden)
        depths = [k for k in range(len(st.mtp) + 1) if seq > k]
        return ins, tuple(torch.empty(mb, seq - k, m.vocab_size, device="meta") for k in depths)

    def schedule(self, tokens: torch.Tensor):
        if self._schedule is None:
            p = self.cfg.parallel
            n_stages = p.pp * p.stages_per_rank
            group = self.mesh.group("pp")
            mb, seq = tokens.shape[0] // p.pp_microbatches, tokens.shape[1]
            pstages = []
            for st, i in zip(self.stages, self.stage_index):
                ins, outs = self._io_shapes(st, mb, seq)
                pstages.append(PipelineStage(st, i, n_stages, tokens.device, input_args=ins, output_args=outs,
                                             group=group))
            cls = SCHEDULES[p.pp_schedule]
            arg = pstages[0] if p.stages_per_rank == 1 else pstages
            self._schedule = cls(arg, p.pp_microbatches, loss_fn=self._loss_fn)
        return self._schedule

    def step(self, tokens: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward + backward of one batch through the pipeline (gradients accumulate).

        Returns the batch's mean loss parts (same on every pp rank) and ``counts``
        [n_moe_layers, E_local]: tokens per expert summed over micro-batches, all layers.
        """
        self._parts = []
        for st in self.stages:
            st.counts, st.aux_loss = {}, 0.0
        args = (tokens,) if self.holds_first else ()
        kw = {"target": labels, "losses": []} if self.holds_last else {}
        self.schedule(tokens).step(*args, **kw)
        dev = tokens.device
        keys = ("loss", "lm", "mtp", "aux")
        sums = torch.zeros(len(keys), device=dev)
        for parts in self._parts:
            for j, k in enumerate(keys):
                if k in parts:
                    sums[j] += parts[k].float()
        for st in self.stages:  # the balance loss never reaches the loss function: add it here
            sums[0] += st.aux_loss
            sums[3] += st.aux_loss
        counts = torch.zeros(self.n_moe, self.n_experts_local, device=dev)
        for st in self.stages:
            for gi, c in st.counts.items():
                counts[gi] += c
        group = self.mesh.group("pp")
        dist.all_reduce(sums, group=group)
        dist.all_reduce(counts, group=group)
        n = self.cfg.parallel.pp_microbatches
        result = {k: sums[j] / n for j, k in enumerate(keys) if k == "loss" or k == "lm" or sums[j] != 0}
        result["counts"] = counts
        return result


def build_pipeline(model: Transformer, cfg: Config, mesh) -> PipelineModel:
    """Cut ``model`` into this rank's stages (the rest of the model is dropped)."""
    p = cfg.parallel
    n_stages = p.pp * p.stages_per_rank
    ranges = split_layers(model.cfg.n_layers, n_stages)
    moe_index = {id(m): i for i, m in enumerate(model.moe_layers())}
    ids = stage_ids(mesh.rank("pp"), p.pp, p.pp_schedule)
    stages = [Stage(model, ranges[i], i == 0, i == n_stages - 1, moe_index) for i in ids]
    return PipelineModel(model, cfg, mesh, stages, ids)
