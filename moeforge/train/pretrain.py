"""`moeforge pretrain`: next-token (+ MTP) pretraining on packed token shards.

    moeforge pretrain --config configs/tiny.toml [--resume [PATH]] [--train.steps 50 ...]

Choices:
- Pretraining is one :class:`PretrainStage` (data + loss) handed to the shared loop in
  ``loop.py``; everything about steps, checkpoints and metrics lives there.
- The loss is ``lm_loss`` (CE + lambda * MTP + alpha * sequence balance). The MTP weight
  follows V3's two phases: ``model.mtp_lambda`` until ``train.mtp_lambda_late_at`` of the
  steps, then ``train.mtp_lambda_late``.
- Evaluation reads the first ``eval_batches`` batches of the val split in order (the
  same windows every time, independent of the training loader) and reports loss,
  perplexity and bits per byte (nats / ln 2 / bytes per token, from the manifest).
- Everything a user can get wrong is checked before the model is built: the output
  directory must be writable, a resume path must hold a valid checkpoint, a run
  directory that already holds checkpoints is not silently overwritten, and the data's
  vocabulary must fit the model's.
- Shards missing from ``data.data_dir`` are built with ``moeforge.data.prepare`` first.
- Under torchrun (``WORLD_SIZE > 1``) the same function runs on every rank: the mesh
  comes from ``[parallel]``, ``parallel.apply`` wraps the model after the FP8 swap and
  before compilation, each data-parallel rank reads its own slice of every global batch
  (``train.micro_batch_size`` is per rank), and rank 0 alone writes the run directory's
  files and prints (see ``distributed.py``). Under pipeline parallelism the stage is
  :class:`PipelinePretrainStage`, whose ``forward_backward`` hands each batch to the
  schedule (the loop's hook for models that run backward themselves); evaluation calls
  the pipeline's plain forward, so ``evaluate`` is shared.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from moeforge.config import Config
from moeforge.errors import UserError
from moeforge.precision import compute_dtype
from moeforge.train import checkpoint as ckpt
from moeforge.train import distributed
from moeforge.train.losses import lm_loss, token_ce
from moeforge.train.loop import TrainResult, train
from moeforge.train.metrics import config_toml, prepare_run_dir


class PretrainStage:
    """Packed token windows -> (tokens, shifted labels); loss = lm_loss; eval = CE/ppl/bpb."""

    def __init__(self, cfg: Config, train_ds, val_ds, device: torch.device, dp_rank: int = 0, dp_size: int = 1):
        from moeforge.data.loader import TokenLoader

        tc = cfg.train
        self.cfg, self.device, self.val_ds = cfg, device, val_ds
        self.loader = TokenLoader(train_ds, tc.micro_batch_size, seed=tc.seed, rank=dp_rank, world_size=dp_size)
        self.tokens_per_batch = tc.micro_batch_size * tc.seq_len
        bpt = getattr(train_ds, "manifest", {}).get("tokenizer", {}).get("bytes_per_token")
        self.bytes_per_token = float(bpt) if bpt else None

    def next_batch(self) -> torch.Tensor:
        return self.loader.next_batch().to(self.device, non_blocking=True)

    def mtp_lambda(self, step: int) -> float:
        late = step >= self.cfg.train.mtp_lambda_late_at * self.cfg.train.steps
        return self.cfg.train.mtp_lambda_late if late else self.cfg.model.mtp_lambda

    def loss(self, model, batch: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        out = model(batch[:, :-1], labels=batch[:, 1:])  # labels: head and CE fused, no FP32 logits
        parts = lm_loss(out, batch[:, 1:], self.cfg.model, mtp_lambda=self.mtp_lambda(step))
        if out.expert_counts is not None:
            parts["expert_counts"] = out.expert_counts
        return parts

    def evaluate(self, model) -> dict[str, float]:
        mbs = self.cfg.train.micro_batch_size
        n = min(self.cfg.train.eval_batches * mbs, len(self.val_ds))
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for start in range(0, n, mbs):
            batch = torch.stack([self.val_ds[i] for i in range(start, min(start + mbs, n))]).to(self.device)
            out = model(batch[:, :-1], with_mtp=False)
            total += token_ce(out.logits, batch[:, 1:], reduction="sum").double()
        ce = total.item() / (n * self.cfg.train.seq_len)
        res = {"loss": ce, "ppl": math.exp(min(ce, 50.0))}
        if self.bytes_per_token:
            res["bpb"] = ce / math.log(2) / self.bytes_per_token
        return res

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])


class PipelinePretrainStage(PretrainStage):
    """:class:`PretrainStage` for a :class:`~moeforge.parallel.pipeline.PipelineModel`: the
    schedule runs forward and backward of each batch (split into ``parallel.pp_microbatches``)
    in one call, so the stage provides ``forward_backward`` instead of a loss to backpropagate."""

    def forward_backward(self, model, batch: torch.Tensor, step: int, n_micro: int) -> dict[str, torch.Tensor]:
        parts = model.step(batch[:, :-1], batch[:, 1:], mtp_lambda=self.mtp_lambda(step), divide=n_micro)
        parts["expert_counts"] = parts.pop("counts")
        return parts


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device='cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def checkpoint_blocks(model) -> None:
    """Activation checkpointing per transformer block: activations are recomputed in
    backward instead of kept. Installed as an instance ``forward`` so parameter names and
    checkpoints stay the same; the MoE statistics a block records are simply overwritten
    by the recomputation with the same values."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        def forward(*args, _inner=block.forward):
            if not torch.is_grad_enabled():
                return _inner(*args)
            return checkpoint(_inner, *args, use_reentrant=False)

        block.forward = forward


def build_model(cfg: Config, device: torch.device, mesh=None):
    """Seeded FP32 master weights, compute dtype set, FP8 swapped in, parallelized for
    ``mesh`` (every rank builds the same full model, then keeps its shards), compiled when asked."""
    from moeforge.model.transformer import Transformer
    from moeforge.parallel import apply

    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model).to(device)
    model.set_compute_dtype(compute_dtype(cfg, device))
    if cfg.fp8.enabled:
        from moeforge.fp8 import convert  # lazy: the trainer works without the FP8 package

        convert(model, cfg.fp8)
    if cfg.train.activation_checkpointing:
        checkpoint_blocks(model)
    for m in model.modules():
        if hasattr(m, "recompute_up_proj"):
            m.recompute_up_proj = cfg.train.recompute_attention
    model = apply(model, mesh, cfg)  # identity in one process
    if cfg.train.compile:
        model.compile()  # in place: parameter names (and so checkpoints) stay the same
    return model


def open_datasets(cfg: Config):
    from moeforge.data.loader import TokenDataset

    data_dir = Path(cfg.data.data_dir)
    if not (data_dir / "manifest.json").is_file():
        from moeforge.data.prepare import prepare

        print(f"[pretrain] no shards in {data_dir}: preparing the data first", flush=True)
        prepare(cfg)
    train_ds = TokenDataset(data_dir, "train", cfg.train.seq_len)
    # verified too: a flipped byte in a val shard would otherwise surface as an IndexError at the first eval
    val_ds = TokenDataset(data_dir, "val", cfg.train.seq_len)
    return train_ds, val_ds


def pretrain(cfg: Config, resume: str | Path | None = None, datasets=None) -> Path:
    """Pretrain ``cfg``; ``resume`` is None (fresh), "latest", or a checkpoint/run path.

    ``datasets`` = (train, val) objects with the TokenDataset interface, for callers that
    bring their own data; by default the shards in ``cfg.data.data_dir`` are used.
    Returns the run directory (metrics.jsonl, tb/, plots/, checkpoints/, config.toml).
    """
    return run_pretrain(cfg, resume, datasets).run_dir


def run_pretrain(cfg: Config, resume: str | Path | None = None, datasets=None) -> TrainResult:
    """:func:`pretrain`, returning the loop's full result (status, last checkpoint, summary)."""
    mesh = distributed.setup(cfg)  # None without torchrun
    main = distributed.is_main()
    run_dir = prepare_run_dir(cfg) if main else Path(cfg.train.out_dir) / cfg.train.run_name
    ckpt_root = run_dir / "checkpoints"
    resume_path = ckpt.resolve(resume, ckpt_root) if resume is not None else None
    if resume_path is None and ckpt.step_dirs(ckpt_root):
        raise UserError(f"{ckpt_root} already holds checkpoints: pass --resume to continue that run, or choose "
                        "another --train.run_name / --train.out_dir")
    with distributed.main_first():  # rank 0 prepares missing shards, the others then open them
        train_ds, val_ds = datasets if datasets is not None else open_datasets(cfg)
    if train_ds.vocab_size > cfg.model.vocab_size:
        raise UserError(f"data in {cfg.data.data_dir} has vocab_size {train_ds.vocab_size} > model.vocab_size "
                        f"{cfg.model.vocab_size}")
    if main:
        (run_dir / "config.toml").write_text(config_toml(cfg))
    device = pick_device(cfg.train.device)  # under CUDA, init_distributed made "cuda" this rank's GPU
    model = build_model(cfg, device, mesh)
    dp = (mesh.rank("dp"), mesh.dp) if mesh is not None else (0, 1)
    stage_cls = PipelinePretrainStage if cfg.parallel.pp > 1 else PretrainStage
    stage = stage_cls(cfg, train_ds, val_ds, device, *dp)
    result = train(model, stage, cfg, run_dir, resume=resume_path, mesh=mesh)
    if not main:
        return result
    s = result.summary
    if s["first_loss"] is not None:
        print(f"[pretrain] {result.status}: {s['steps']} steps, loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}, "
              f"{s['tokens_per_s']:,.0f} tokens/s, MFU {100 * s['mfu']:.2f}%, {s['elapsed_s']:.0f}s")
    print(f"[pretrain] metrics:    {run_dir / 'metrics.jsonl'} (TensorBoard: {run_dir / 'tb'})")
    print(f"[pretrain] plots:      {run_dir / 'plots'}")
    print(f"[pretrain] checkpoint: {result.checkpoint}")
    if result.status == "interrupted":
        print(f"[pretrain] resume with: moeforge pretrain --config {run_dir / 'config.toml'} --resume", flush=True)
    return result


def cli(argv: list[str]) -> int:
    from moeforge.cli import parse_config_args

    parser = argparse.ArgumentParser(prog="moeforge pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                        help="continue from the latest checkpoint of this run, or from PATH (a step or run directory)")
    args, cfg = parse_config_args(argv, parser)
    result = run_pretrain(cfg, resume=args.resume)
    return 130 if result.status == "interrupted" else 0
