"""The report card of a `moeforge run`: report.md and a self-contained report.html.

Choices:
- The report is built from what the stages left on disk (their summary markers,
  metrics.jsonl files, plots, the data manifest, benchmark JSON), never from live
  objects, so it can be rebuilt at any time with ``--from report``.
- One list of blocks (heading, text, table, image, code) renders to both formats: the
  markdown links the PNGs by relative path, the HTML embeds them as base64 so it can be
  mailed around as one file. Every text goes through ``html.escape`` — sample
  generations are model output and must never become markup.
"""

from __future__ import annotations

import base64
import html
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeforge.bench import RESULTS_DIR


@dataclass
class Block:
    kind: str  # "h1" | "h2" | "p" | "table" | "img" | "code"
    text: str = ""
    rows: list[list[Any]] | None = None  # table: first row is the header
    path: Path | None = None  # img


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return "" if v is None else str(v)


def to_markdown(blocks: list[Block], root: Path) -> str:
    out: list[str] = []
    for b in blocks:
        if b.kind == "h1":
            out += [f"# {b.text}", ""]
        elif b.kind == "h2":
            out += [f"## {b.text}", ""]
        elif b.kind == "p":
            out += [b.text, ""]
        elif b.kind == "code":
            out += ["```", b.text, "```", ""]
        elif b.kind == "img" and b.path is not None:
            rel = b.path.relative_to(root) if b.path.is_relative_to(root) else b.path
            out += [f"![{b.text}]({rel})", ""]
        elif b.kind == "table" and b.rows:
            head, *body = b.rows
            out.append("| " + " | ".join(_fmt(c) for c in head) + " |")
            out.append("|" + "---|" * len(head))
            out += ["| " + " | ".join(_fmt(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |" for r in body]
            out.append("")
    return "\n".join(out)


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}pre{background:#f6f8fa;padding:.8em;white-space:pre-wrap}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}"""


def to_html(blocks: list[Block], title: str) -> str:
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{CSS}</style></head><body>"]
    for b in blocks:
        if b.kind in ("h1", "h2"):
            out.append(f"<{b.kind}>{e(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{e(b.text)}</p>")
        elif b.kind == "code":
            out.append(f"<pre>{e(b.text)}</pre>")
        elif b.kind == "img" and b.path is not None and b.path.is_file():
            data = base64.b64encode(b.path.read_bytes()).decode()
            out.append(f"<figure><img alt='{e(b.text)}' src='data:image/png;base64,{data}'><figcaption>{e(b.text)}"
                       "</figcaption></figure>")
        elif b.kind == "table" and b.rows:
            head, *body = b.rows
            out.append("<table><tr>" + "".join(f"<th>{e(_fmt(c))}</th>" for c in head) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{e(_fmt(c))}</td>" for c in r) + "</tr>" for r in body]
            out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)


# ----------------------------------------------------------------------------- sections
def _data_section(s: dict[str, Any]) -> list[Block]:
    m = s.get("manifest") or {}
    if not m:
        return []
    blocks = [Block("h2", "Data")]
    doms = m.get("domains", {})
    rows = [["domain", "documents", "tokens", "share", "epochs"]]
    for d, v in doms.items():
        rows.append([d, v.get("documents"), v.get("tokens"), v.get("share"), v.get("epochs", v.get("upsample"))])
    blocks.append(Block("table", rows=rows))
    drops = m.get("filter_drops") or {}
    if drops:
        rows = [["filter", "documents dropped"]] + [[k, v] for k, v in sorted(drops.items(), key=lambda kv: -_num(kv[1]))]
        blocks += [Block("p", f"Documents read: {_per_domain(m.get('documents_read'))}. Quality filters:"),
                   Block("table", rows=rows)]
    dd = m.get("dedup") or {}
    if dd:
        blocks.append(Block("p", f"Deduplication: {_fmt(dd.get('exact_removed'))} exact and "
                                 f"{_fmt(dd.get('near_removed'))} near duplicates removed (MinHash + LSH), "
                                 f"documents kept: {_per_domain(_last_stage(dd.get('documents_after')))}."))
    tok = m.get("tokenizer") or {}
    sp = m.get("splits", {})
    blocks.append(Block("p", f"Tokenizer: byte-level BPE, vocabulary {_fmt(tok.get('vocab_size'))}, "
                             f"{_fmt(tok.get('bytes_per_token'))} bytes per token, trained on "
                             f"{_fmt(tok.get('trained_on_bytes'))} bytes. Train tokens "
                             f"{_fmt(sp.get('train', {}).get('tokens'))}, validation tokens "
                             f"{_fmt(sp.get('val', {}).get('tokens'))}."))
    return blocks


def _per_domain(d: Any) -> str:
    """'3,412 (code 112, prose 205, ...)' for a {domain: count} dict; plain text otherwise."""
    if not isinstance(d, dict):
        return _fmt(d)
    return f"{_fmt(sum(int(_num(v)) for v in d.values()))} ({', '.join(f'{k} {_fmt(v)}' for k, v in d.items())})"


def _last_stage(d: Any) -> Any:
    """Dedup reports counts after each stage ({stage: {domain: n}}); the report wants the
    survivors: the last stage that saw each domain."""
    if not isinstance(d, dict) or not all(isinstance(v, dict) for v in d.values()):
        return d
    out: dict[str, Any] = {}
    for counts in d.values():
        out.update(counts)
    return out


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return 0.0


def _train_section(title: str, s: dict[str, Any], keys: list[str]) -> list[Block]:
    if not s:
        return []
    blocks = [Block("h2", title)]
    summ = dict(s.get("summary") or {})
    if isinstance(summ.get("mfu"), float):
        peak = summ.pop("mfu_peak_dtype", None)
        summ["mfu"] = f"{100 * summ['mfu']:.2f}% of the measured {peak + ' ' if peak else ''}GEMM peak"
    run_dir = Path(s.get("run_dir", ""))
    last_eval = _last_eval(run_dir)
    summ.update({f"final eval {k}": v for k, v in last_eval.items()})
    rows = [["metric", "value"]] + [[k, summ[k]] for k in keys if k in summ]
    rows += [[k, v] for k, v in summ.items() if k not in keys and isinstance(v, (int, float, str))]
    if len(rows) > 1:
        blocks.append(Block("table", rows=rows))
    plots = run_dir / "plots"
    _reward_plot(run_dir)
    for name, caption in (("loss.png", f"{title}: loss curves"), ("expert_load.png", f"{title}: expert load"),
                          ("reward.png", f"{title}: reward")):
        if (plots / name).is_file():
            blocks.append(Block("img", caption, path=plots / name))
    return blocks


def _last_eval(run_dir: Path) -> dict[str, float]:
    from moeforge.train.metrics import read_records

    evals = [r for r in read_records(run_dir / "metrics.jsonl") if r.get("kind") == "eval"]
    return {k: v for k, v in evals[-1].items() if k not in ("kind", "step")} if evals else {}


def _reward_plot(run_dir: Path) -> None:
    """plots/reward.png from an RL run's metrics (mean rollout reward and correctness per step)."""
    from moeforge.train.metrics import read_records

    train = [r for r in read_records(run_dir / "metrics.jsonl") if r.get("kind") == "train" and "reward_mean" in r]
    if not train:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    steps = [r["step"] for r in train]
    ax[0].plot(steps, [r["reward_mean"] for r in train], label="mean rollout reward")
    ax[0].set(xlabel="step", ylabel="reward", title="GRPO reward")
    for key, label in (("correct", "correct answers"), ("format", "answer format")):
        if any(key in r for r in train):
            ax[1].plot(steps, [r.get(key) for r in train], label=label)
    ax[1].set(xlabel="step", ylabel="fraction of rollouts", title="rollout accuracy", ylim=(0, 1.05))
    for a in ax:
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    (run_dir / "plots").mkdir(exist_ok=True)
    fig.savefig(run_dir / "plots" / "reward.png", dpi=110)
    plt.close(fig)


def _fp8_section() -> list[Block]:
    files = sorted(RESULTS_DIR.glob("fp8*.json"))
    if not files:
        return []
    blocks = [Block("h2", "FP8 vs BF16 (benchmarks/results)")]
    for f in files:
        try:
            d = json.loads(f.read_text())
        except ValueError:
            continue
        rows = [["measure", "value"]] + [[k, v] for k, v in (d.get("summary") or {}).items()]
        blocks += [Block("p", f"{d.get('title', f.stem)} ({f.name}, {d.get('environment', {}).get('time', '')})")]
        if len(rows) > 1:
            blocks.append(Block("table", rows=rows))
        png = f.with_suffix(".png")
        if png.is_file():
            blocks.append(Block("img", d.get("title", f.stem), path=png))
    return blocks


def _eval_section(s: dict[str, Any]) -> list[Block]:
    if not s:
        return []
    blocks = [Block("h2", "Evaluation")]
    acc = s.get("accuracy") or {}
    if acc:
        rows = [["after stage", *next(iter(acc.values())).keys()]]
        rows += [[stage, *vals.values()] for stage, vals in acc.items()]
        blocks += [Block("p", s.get("accuracy_note", "Held-out accuracy after each stage.")), Block("table", rows=rows)]
    for g in s.get("samples", []):
        blocks.append(Block("code", f"[{g.get('stage')}] prompt: {g.get('prompt')}\n\n{g.get('completion')}"))
    return blocks


def build_report(root: Path, summaries: dict[str, dict[str, Any]], title: str = "") -> tuple[Path, Path]:
    title = title or f"moeforge run: {root.name}"
    blocks = [Block("h1", title), Block("p", f"Written {time.strftime('%Y-%m-%d %H:%M')} from {root}.")]
    times = []
    for name in summaries:
        marker = root / "stages" / f"{name}.json"
        if marker.is_file():
            times.append([name, round(json.loads(marker.read_text()).get("seconds", 0.0) / 60, 2)])
    if times:
        blocks += [Block("table", rows=[["stage", "minutes"]] + times)]
    blocks += _data_section(summaries.get("data", {}))
    blocks += _train_section("Pretraining", summaries.get("pretrain", {}),
                             ["final_loss", "eval_loss", "eval_ppl", "eval_bpb", "tokens_per_s", "mfu", "fp8",
                              "train.dtype", "train.dtype_reason", "fp8.cpu_gemm_dtype"])
    blocks += _fp8_section()
    blocks += _train_section("Supervised fine-tuning", summaries.get("sft", {}), ["final_loss", "eval_loss"])
    blocks += _train_section("Reward model", summaries.get("reward", {}), ["pairs_source", "heldout_accuracy"])
    blocks += _train_section("GRPO", summaries.get("grpo", {}), ["reward_before", "reward_after"])
    blocks += _eval_section(summaries.get("eval", {}))
    md, page = root / "report.md", root / "report.html"
    md.write_text(to_markdown(blocks, root))
    page.write_text(to_html(blocks, title))
    return md, page
