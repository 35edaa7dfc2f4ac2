"""Run directory, metrics (JSONL, TensorBoard, console, progress bar), FLOPs/MFU and plots.

Choices:
- One JSONL line per logged event (``kind`` = train | eval | skip | info) is the source
  of truth; TensorBoard gets the same numbers, and the PNG plots are drawn from the JSONL
  at the end, so a run that died can still be plotted from its file.
- On resume, JSONL lines after the resumed step are dropped and TensorBoard purges them
  (``purge_step``), so the files read as one uninterrupted run.
- Model FLOPs are counted analytically from the config (matmuls only, as in the PaLM MFU
  definition): MLA/MHA projections, causal attention scores and values (average context
  (S+1)/2), dense MLPs, the router and the *activated* experts (top-k routed + shared),
  the output head and the MTP modules. Training = 3 x forward (backward is two GEMMs per
  forward GEMM). The input embedding is a gather and costs nothing.
- The utilisation denominator is *measured*: a short dense GEMM in the compute dtype at
  start-up, best of a few repetitions, so MFU means "fraction of what a plain matmul
  reaches on this machine", not a datasheet number.
- Expert load: MaxVio = max_i load_i / mean load - 1 per MoE layer (TR §4.5.2), logged per
  step; the per-expert load shares are kept in the JSONL for the heatmap.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from moeforge.config import Config, ModelConfig
from moeforge.errors import UserError


# ----------------------------------------------------------------------------- run directory
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        # not json.dumps: it writes characters beyond U+FFFF as surrogate-pair escapes, which TOML
        # rejects, so a path with an emoji made config.toml unreadable. TOML needs \" \\ and controls escaped.
        return '"' + "".join("\\" + c if c in '"\\' else f"\\u{ord(c):04x}" if c < " " or c == "\x7f" else c
                             for c in v) + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def config_toml(cfg: Config) -> str:
    """The resolved config as TOML that ``load_config`` reads back to the same tree."""
    lines = ["# resolved configuration of this run (moeforge writes it; edit a copy to rerun)"]
    for section, values in cfg.to_dict().items():
        lines.append(f"\n[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def prepare_run_dir(cfg: Config) -> Path:
    """Create ``<out_dir>/<run_name>`` and prove it is writable before any training starts."""
    run = Path(cfg.train.out_dir) / cfg.train.run_name
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output directory {run} cannot be written ({e.strerror or e}); set train.out_dir") from None
    return run


# ----------------------------------------------------------------------------- FLOPs and peak
def forward_macs_per_token(m: ModelConfig, seq_len: int) -> float:
    """Multiply-accumulates per token of one forward pass (activated parameters only)."""
    ctx = (seq_len + 1) / 2  # causal: token t attends to t+1 positions

    def attention() -> float:
        if m.attn_type == "mla":
            qk = m.qk_nope_head_dim + m.qk_rope_head_dim
            q = m.dim * m.n_heads * qk if not m.q_lora_rank else m.dim * m.q_lora_rank + m.q_lora_rank * m.n_heads * qk
            kv = m.dim * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * m.n_heads * (m.qk_nope_head_dim + m.v_head_dim)
            out = m.n_heads * m.v_head_dim * m.dim
            return q + kv + out + m.n_heads * (qk + m.v_head_dim) * ctx
        hd = m.head_dim or m.dim // m.n_heads
        kvh = m.n_kv_heads or m.n_heads
        proj = m.dim * m.n_heads * hd * 2 + m.dim * kvh * hd * 2
        return proj + m.n_heads * hd * 2 * ctx

    dense_mlp = 3 * m.dim * m.inter_dim
    moe = m.dim * m.n_routed_experts + 3 * m.dim * m.moe_inter_dim * (m.n_activated_experts + m.n_shared_experts)
    n_moe = m.n_layers - m.n_dense_layers
    body = m.n_layers * attention() + m.n_dense_layers * dense_mlp + n_moe * moe
    head = m.dim * m.vocab_size
    mtp_block = attention() + (moe if n_moe else dense_mlp)
    mtp = m.mtp_depth * (2 * m.dim * m.dim + mtp_block + head)
    return body + head + mtp


def train_flops_per_token(m: ModelConfig, seq_len: int) -> float:
    return 3 * 2 * forward_macs_per_token(m, seq_len)


def measure_peak_flops(dtype: torch.dtype, device: torch.device, n: int = 1024, reps: int = 5) -> float:
    """Best FLOP/s of an n x n x n GEMM in ``dtype`` on ``device`` (a fraction of a second)."""
    if device.type == "cuda":
        n = 8192
    gen = torch.Generator(device).manual_seed(0)  # a private generator: the run's RNG stream stays untouched
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    best = math.inf
    for i in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t
        if i or dt > 0.25:  # the first call warms up, unless the dtype is this slow (bf16 on
            best = min(best, dt)  # AVX2 takes seconds): then one call tells enough
            if dt > 0.25:
                break
    return 2 * n ** 3 / best


def gemm_peak_flops(dtypes, device: torch.device) -> tuple[float, torch.dtype]:
    """(peak, its dtype): the best GEMM rate over the dtypes the step's GEMMs run in (the
    compute dtype, and the emulated FP8 GEMM's on CPU), so MFU is not measured against a
    slower dtype than the one really used (bf16 on an AVX2 CPU once gave "MFU 405%")."""
    return max(((measure_peak_flops(dt, device), dt) for dt in set(dtypes)), key=lambda r: r[0])


def utilisation(flops_per_s: float, peak: float) -> tuple[float, float]:
    """(MFU, peak used). A measured peak below the step's own rate is wrong (a busy host slowed
    the short measurement): the step's rate is then the best lower bound of the real peak, so
    MFU reads 100% at most, never more."""
    peak = max(peak, flops_per_s)
    return flops_per_s / max(peak, 1e-30), peak


def max_violation(counts: torch.Tensor) -> torch.Tensor:
    """[L, E] tokens per expert -> [L] MaxVio = max / mean - 1."""
    c = counts.float()
    return c.max(dim=-1).values / c.mean(dim=-1).clamp_min(1e-9) - 1


def memory_bytes(device: torch.device) -> int:
    """Current resident set size of this process (peak allocated on CUDA)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: peak RSS (KiB on Linux, bytes on macOS)
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024


# ----------------------------------------------------------------------------- the writer
def _finite(x: Any) -> Any:
    """JSON has no NaN: non-finite floats become null (and the 'skip' record says why)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


class Metrics:
    """JSONL + TensorBoard + console/progress for one run; ``start_step`` > 0 when resuming."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, progress: bool = True):
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = run_dir / "metrics.jsonl"
        if start_step and self.jsonl.exists():  # drop what the resumed run will redo
            keep = [json.dumps(r) + "\n" for r in read_records(self.jsonl) if r.get("step", 0) <= start_step]
            self.jsonl.write_text("".join(keep))
        elif not start_step:
            self.jsonl.unlink(missing_ok=True)
        self._file = open(self.jsonl, "a")
        from torch.utils.tensorboard import SummaryWriter  # imported late: tensorboard is slow to import

        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        self.progress = None
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[live]}"),
                                     TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, live="")
            self.progress.start()

    def print(self, msg: str) -> None:
        if self.progress is not None:
            self.progress.console.print(msg, markup=False, highlight=False)
        else:
            print(msg, flush=True)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record to the JSONL and its numbers to TensorBoard."""
        record = {k: _finite(v) for k, v in record.items()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step, kind = record.get("step", 0), record.get("kind", "train")
        for k, v in record.items():
            if k in ("step", "kind", "expert_load") or v is None:
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.tb.add_scalar(f"{kind}/{k}", v, step)
            elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
                for i, x in enumerate(v):
                    self.tb.add_scalar(f"{kind}/{k}/{i}", x, step)

    def advance(self, step: int, loss: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, live=f"loss {loss:.4f}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self.tb.close()
        self._file.close()


def format_train(r: dict[str, Any], total: int) -> str:
    parts = [f"step {r['step']}/{total}", f"loss {r['loss']:.4f}"]
    parts += [f"{k} {r[k]:.4f}" for k in ("lm", "mtp", "aux") if r.get(k) is not None]
    parts += [f"lr {r['lr']:.2e}", f"gnorm {r['grad_norm']:.3f}", f"{r['tokens_per_s']:,.0f} tok/s",
              f"MFU {100 * r['mfu']:.2f}%", f"MaxVio {r['maxvio_mean']:.2f}" if r.get("maxvio_mean") is not None else ""]
    return " | ".join(p for p in parts if p)


# ----------------------------------------------------------------------------- plots
def read_records(jsonl: Path) -> list[dict[str, Any]]:
    if not jsonl.exists():
        return []
    out = []
    for ln in jsonl.read_text().splitlines():
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:  # the last line of a killed run may be cut short
            continue
    return out


def plot_run(run_dir: Path) -> list[Path]:
    """loss.png (train lm/mtp/aux, eval) and expert_load.png (layer x expert over time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_records(run_dir / "metrics.jsonl")
    train = [r for r in recs if r.get("kind") == "train"]
    evals = [r for r in recs if r.get("kind") == "eval"]
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    if train:
        fig, (ax, ax_aux) = plt.subplots(1, 2, figsize=(12, 4.5))
        steps = [r["step"] for r in train]
        for key in ("lm", "mtp"):
            if any(r.get(key) is not None for r in train):
                ax.plot(steps, [r.get(key) for r in train], label=f"train {key}")
        if evals:
            ax.plot([r["step"] for r in evals], [r.get("loss") for r in evals], "o-", label="eval lm")
        ax.set(xlabel="step", ylabel="cross-entropy (nats)", title="loss")
        ax.legend()
        ax.grid(alpha=0.3)
        ax_aux.plot(steps, [r.get("aux") for r in train], color="tab:purple")
        ax_aux.set(xlabel="step", ylabel="alpha * sequence balance loss", title="aux loss")
        ax_aux.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / "loss.png", dpi=110)
        plt.close(fig)
        written.append(out_dir / "loss.png")
    loads = [(r["step"], r["expert_load"]) for r in train if r.get("expert_load")]
    if loads:
        import numpy as np

        arr = np.array([l for _, l in loads], dtype=float)  # [T, L, E] share of tokens per expert
        n_layers = arr.shape[1]
        fig, axes = plt.subplots(n_layers, 1, figsize=(10, 1.2 + 1.6 * n_layers), squeeze=False, sharex=True)
        extent = (loads[0][0], max(loads[-1][0], loads[0][0] + 1), arr.shape[2] - 0.5, -0.5)
        for i in range(n_layers):
            im = axes[i, 0].imshow(arr[:, i, :].T, aspect="auto", cmap="viridis", extent=extent, interpolation="nearest")
            axes[i, 0].set_ylabel(f"MoE {i}\nexpert")
            fig.colorbar(im, ax=axes[i, 0], label="load share")
        axes[-1, 0].set_xlabel("step")
        fig.suptitle("expert load (share of routed tokens), layer x expert over time")
        fig.tight_layout()
        fig.savefig(out_dir / "expert_load.png", dpi=110)
        plt.close(fig)
        written.append(out_dir / "expert_load.png")
    return written
