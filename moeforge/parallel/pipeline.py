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
- The last stage's output is ``(logits, *mtp_logits)``, made by
  ``Transformer.output_heads`` (the model's own tail); ``lm_loss`` runs on it per
  micro-batch and returns it divided by n_microbatches * ``divide`` (the trainer's number
  of accumulated batches), so equal-sized micro-batches give the full-batch mean loss.
  The schedules' own gradient scaling is off: it divides the whole ``.grad``, gradients
  accumulated by earlier ``step`` calls included.
- Under FSDP the schedule reduces gradients at the end of every ``step`` call (it
  overrides ``grad_sync``), so accumulating several calls per optimizer step reduces once
  per call: correct (FSDP2 accumulates sharded gradients), just without the saving.
- MoE statistics: the sequence-balance loss of a layer lives on that layer's stage, far
  from the loss function. It is attached to the hidden state with an autograd Function
  that is the identity forward and injects d(total)/d(aux) = alpha in backward (the trick
  Megatron uses), so no extra tensor crosses stages and the gradient is exact (alpha is
  divided like the loss). Tokens per expert accumulate per stage over micro-batches;
  :meth:`PipelineModel.step` sums the (zero-padded) rows over the pp group so every rank
  returns all layers' counts in ``Transformer.moe_layers()`` order. The loss parts
  returned are a fixed set of keys (those ``lm_loss`` gives for this model), so every
  rank reduces vectors of the same length.
- Evaluation: :meth:`PipelineModel.forward` runs the stages one after another without a
  schedule (any batch size, no backward), sending activations point to point, and
  broadcasts the last stage's logits over pp, so callers of ``model(tokens)`` (the
  pretrain stage's ``evaluate``) work unchanged; the price is one [B, S, V] broadcast per
  evaluation batch.
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
        self.alpha = model.cfg.seq_aux_alpha
        self.aux_grad = self.alpha  # d(backpropagated loss)/d(aux); set per step by PipelineModel.step
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
        if aux and self.alpha > 0:
            total = torch.stack(aux).sum()
            self.aux_loss = self.aux_loss + self.alpha * total.detach()  # for the reported loss
            if torch.is_grad_enabled():
                h = _AttachAux.apply(h, total, self.aux_grad)
        return h

    def forward(self, *args, with_mtp: bool = True):
        if self.embed is not None:
            emb = self.embed(args[0]).to(self.compute_dtype)
            h = emb
        else:
            h, emb = args
        for layer in self.layers.values():
            h = layer(h)
        if self.head is None:
            return self._collect_moe_stats(h), emb.clone() if self.embed is None else emb
        _, logits, mtp_logits = Transformer.output_heads(self, h, emb, with_mtp)  # the model's own tail
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
        self._parts: list[dict[str, torch.Tensor]] = []  # per micro-batch, filled by the loss function
        self._mtp_lambda: float | None = None  # this step's MTP weight (None: the config's)
        self._loss_div = 1  # this step's divisor of each micro-batch's loss

    def moe_layers(self) -> list[MoE | None]:
        """MoE layers in ``Transformer.moe_layers()`` order; None where another rank holds it."""
        out: list[MoE | None] = [None] * self.n_moe
        for st in self.stages:
            for m, gi in st.moes:
                out[gi] = m
        return out

    def _loss_fn(self, output, labels: torch.Tensor) -> torch.Tensor:
        out = ModelOutput(logits=output[0], mtp_logits=list(output[1:]))
        parts = lm_loss(out, labels, self.cfg.model, mtp_lambda=self._mtp_lambda)
        self._parts.append({k: v.detach() for k, v in parts.items()})
        return parts["loss"] / self._loss_div

    def _io_shapes(self, st: Stage, mb: int, seq: int):
        """Example (meta) inputs and outputs of a stage, so no shape-inference forward runs
        (it would call the loss and count experts once more than the batch has)."""
        m, dt = self.cfg.model, self.stages[0].compute_dtype
        # requires_grad marks which received activations get a gradient sent back
        hidden = torch.empty(mb, seq, m.dim, dtype=dt, device="meta", requires_grad=True)
        ins = (torch.empty(mb, seq, dtype=torch.long, device="meta"),) if st.embed is not None else (hidden, hidden)
        if st.head is None:
            return ins, (hidden, hidden)
        return ins, tuple(torch.empty(mb, seq - k, m.vocab_size, device="meta") for k in self._depths(seq, True))

    def _depths(self, seq: int, with_mtp: bool) -> list[int]:
        """Which outputs the last stage makes: 0 (the logits), then the MTP depths that fit."""
        return [k for k in range(self.cfg.model.mtp_depth + 1 if with_mtp else 1) if seq > k]

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
            # the loss is pre-divided instead: the schedule's own scaling would also divide
            # gradients accumulated by earlier calls (gradient accumulation across steps)
            self._schedule = cls(arg, p.pp_microbatches, loss_fn=self._loss_fn, scale_grads=False)
        return self._schedule

    def step(self, tokens: torch.Tensor, labels: torch.Tensor, mtp_lambda: float | None = None,
             divide: int = 1) -> dict[str, torch.Tensor]:
        """Forward + backward of one batch through the pipeline (gradients accumulate).

        Backpropagates the batch's mean loss divided by ``divide`` (the trainer's number of
        accumulated batches). Returns the batch's mean loss parts, undivided and the same
        on every pp rank, and ``counts`` [n_moe_layers, E_local]: tokens per expert summed
        over micro-batches, all layers.
        """
        n = self.cfg.parallel.pp_microbatches
        self._parts, self._mtp_lambda, self._loss_div = [], mtp_lambda, n * divide
        for st in self.stages:
            st.counts, st.aux_loss, st.aux_grad = {}, 0.0, st.alpha / (n * divide)
        args = (tokens,) if self.holds_first else ()
        kw = {"target": labels, "losses": []} if self.holds_last else {}
        self.schedule(tokens).step(*args, **kw)
        dev = tokens.device
        m = self.cfg.model
        # the keys lm_loss returns for this model (fixed, so every rank reduces the same vector)
        keys = ["loss", "lm"] + ["mtp"] * bool(self._depths(tokens.shape[1], True)[1:])
        keys += ["aux"] * (self.n_moe > 0 and m.seq_aux_alpha > 0)
        sums = torch.zeros(len(keys), device=dev)
        for parts in self._parts:
            for j, k in enumerate(keys):
                if k in parts:
                    sums[j] += parts[k].float()
        for st in self.stages:  # the balance loss never reaches the loss function: add it here
            sums[0] += st.aux_loss
            if "aux" in keys:
                sums[keys.index("aux")] += st.aux_loss
        counts = torch.zeros(self.n_moe, self.n_experts_local, device=dev)
        for st in self.stages:
            for gi, c in st.counts.items():
                counts[gi] += c
        group = self.mesh.group("pp")
        dist.all_reduce(sums, group=group)
        dist.all_reduce(counts, group=group)
        result = {k: sums[j] / n for j, k in enumerate(keys)}
        result["counts"] = counts
        return result

    def forward(self, tokens: torch.Tensor, with_mtp: bool = False) -> ModelOutput:
        """The model's forward without a schedule, for evaluation: this rank's stages run in
        global stage order on the whole batch, activations go point to point, and the last
        stage's logits (and MTP logits with ``with_mtp``) are broadcast over pp, so every rank
        returns the same :class:`ModelOutput` (without MoE statistics). Training uses :meth:`step`."""
        p, m = self.cfg.parallel, self.cfg.model
        last = p.pp * p.stages_per_rank - 1
        owner = {s: r for r in range(p.pp) for s in stage_ids(r, p.pp, p.pp_schedule)}
        group, me = self.mesh.group("pp"), self.mesh.rank("pp")
        mine = dict(zip(self.stage_index, self.stages))
        b, seq = tokens.shape
        out: tuple = (tokens,)
        for s in sorted(mine):
            if s > 0 and owner[s - 1] != me:
                out = tuple(torch.empty(b, seq, m.dim, dtype=mine[s].compute_dtype, device=tokens.device)
                            for _ in range(2))
                for t in out:
                    dist.recv(t, group=group, group_src=owner[s - 1])
            out = mine[s](*out, with_mtp=with_mtp)
            if s < last and owner[s + 1] != me:
                for t in out:
                    dist.send(t.detach().contiguous(), group=group, group_dst=owner[s + 1])
        if owner[last] != me:
            out = tuple(torch.empty(b, seq - k, m.vocab_size, device=tokens.device)
                        for k in self._depths(seq, with_mtp))
        for t in out:
            dist.broadcast(t, group=group, group_src=owner[last])
        return ModelOutput(logits=out[0], mtp_logits=list(out[1:]))


def build_pipeline(model: Transformer, cfg: Config, mesh) -> PipelineModel:
    """Cut ``model`` into this rank's stages (the rest of the model is dropped)."""
    p = cfg.parallel
    n_stages = p.pp * p.stages_per_rank
    ranges = split_layers(model.cfg.n_layers, n_stages)
    moe_index = {id(m): i for i, m in enumerate(model.moe_layers())}
    ids = stage_ids(mesh.rank("pp"), p.pp, p.pp_schedule)
    stages = [Stage(model, ranges[i], i == 0, i == n_stages - 1, moe_index) for i in ids]
    return PipelineModel(model, cfg, mesh, stages, ids)
