"""`moeforge run`: the whole recipe, stage by stage, resumable, ending in a report card.

    data -> pretrain (FP8) -> sft -> reward -> grpo -> eval -> report

Choices:
- Every stage writes into ``<train.out_dir>/<train.run_name>/<stage>/`` and, when it
  succeeds, a marker ``stages/<stage>.json`` holding its summary and the files it
  produced with their sizes. A stage is skipped when its marker exists and those files
  are still there with the same sizes; anything else reruns it. An interrupted run
  therefore picks up at the first unfinished stage, and ``--from STAGE`` deletes the
  markers of that stage and all later ones.
- Stages that train resume from their own latest checkpoint when one exists, so a kill
  in the middle of pretraining loses at most ``ckpt_every`` steps. ``--from`` instead
  deletes the outputs of the stages it reruns, so they start from scratch.
- The console shows one header per stage with the pipeline's elapsed time and ETA
  (from the expected share of each stage), and the stage's own progress bar below it.
- Stage summaries are plain JSON; ``moeforge.report`` renders them with the plots.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from moeforge.config import Config
from moeforge.errors import UserError

console = Console(stderr=True)


@dataclass
class Context:
    cfg: Config
    root: Path  # runs/<name>
    summaries: dict[str, dict[str, Any]]
    rebuild_data: bool = False  # --from data: rebuild the shards even if they verify

    def stage_dir(self, name: str) -> Path:
        return self.root / name

    def stage_cfg(self, name: str, **train_overrides: Any) -> Config:
        """A copy of the config whose training output goes to this stage's directory."""
        cfg = copy.deepcopy(self.cfg)
        cfg.train.out_dir = str(self.root)
        cfg.train.run_name = name
        for k, v in train_overrides.items():
            setattr(cfg.train, k, v)
        return cfg

    def checkpoint_of(self, name: str) -> Path:
        ck = self.summaries.get(name, {}).get("checkpoint")
        if not ck or not Path(ck).exists():
            raise UserError(f"stage {name!r} has no checkpoint; rerun with --from {name}")
        return Path(ck)


@dataclass
class Stage:
    name: str
    weight: float  # expected share of the pipeline's time, for the ETA
    run: Callable[[Context], dict[str, Any]]  # returns a JSON-safe summary; 'outputs': [paths]
    description: str


# ----------------------------------------------------------------------------- stages
def _resume_arg(run_dir: Path) -> str | None:
    """'latest' when an earlier attempt of this stage left checkpoints, else a fresh start."""
    from moeforge.train import checkpoint as ckpt

    return "latest" if ckpt.step_dirs(run_dir / "checkpoints") else None


def stage_data(ctx: Context) -> dict[str, Any]:
    from moeforge.data.prepare import prepare

    data_dir = prepare(ctx.cfg, force=ctx.rebuild_data)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    return {"data_dir": str(data_dir), "manifest": manifest, "outputs": [str(data_dir / "manifest.json")]}


def stage_pretrain(ctx: Context) -> dict[str, Any]:
    from moeforge.train.pretrain import run_pretrain

    cfg = ctx.stage_cfg("pretrain")
    res = run_pretrain(cfg, resume=_resume_arg(ctx.stage_dir("pretrain")))
    return _train_summary(res)


def stage_sft(ctx: Context) -> dict[str, Any]:
    from moeforge.train.sft import sft

    cfg = ctx.stage_cfg("sft")
    cfg.sft.run_name = "sft"
    return _train_summary(sft(cfg, ctx.checkpoint_of("pretrain"), _resume_arg(ctx.stage_dir("sft"))))


def _labelled_pairs(ctx: Context) -> Path | None:
    """Preference pairs exported from `moeforge label` when people have labelled some."""
    from moeforge.feedback import export_pairs

    db = Path(ctx.cfg.train.out_dir) / "feedback.db"
    if not db.is_file():
        return None
    out = ctx.root / "reward" / "labelled_pairs.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    n = export_pairs(db, out)
    console.print(f"[reward] {n} labelled preference pairs exported from {db}")
    return out if n >= 10 else None


def stage_reward(ctx: Context) -> dict[str, Any]:
    from moeforge.train.reward import train_reward

    cfg = ctx.stage_cfg("reward")
    cfg.reward.run_name = "reward"
    res = train_reward(cfg, ctx.checkpoint_of("sft"), _labelled_pairs(ctx), _resume_arg(ctx.stage_dir("reward")))
    return _train_summary(res)


def stage_grpo(ctx: Context) -> dict[str, Any]:
    from moeforge.train.grpo import grpo

    cfg = ctx.stage_cfg("grpo")
    cfg.grpo.run_name = "grpo"
    rm = ctx.checkpoint_of("reward") if cfg.grpo.reward_model_weight > 0 else None
    return _train_summary(grpo(cfg, ctx.checkpoint_of("sft"), rm, _resume_arg(ctx.stage_dir("grpo"))))


def stage_eval(ctx: Context) -> dict[str, Any]:
    from moeforge.evaluate import evaluate_checkpoints

    cks = {name: ctx.checkpoint_of(name) for name in ("pretrain", "sft", "grpo") if name in ctx.summaries}
    result = evaluate_checkpoints(ctx.cfg, cks, n_problems=ctx.cfg.grpo.eval_problems,
                                  max_new_tokens=ctx.cfg.grpo.max_new_tokens)
    out = ctx.stage_dir("eval") / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    for stage, acc in result["accuracy"].items():
        console.print(f"[eval] after {stage}: accuracy {acc['accuracy']:.2%}, format {acc['format']:.2%}")
    return {**result, "outputs": [str(out)]}


def _train_summary(res) -> dict[str, Any]:
    if res.status != "done":
        raise KeyboardInterrupt
    return {"run_dir": str(res.run_dir), "checkpoint": str(res.checkpoint), "step": res.step,
            "summary": res.summary, "outputs": [str(res.checkpoint / "model.safetensors")]}


def stage_report(ctx: Context) -> dict[str, Any]:
    from moeforge.report import build_report

    md, page = build_report(ctx.root, ctx.summaries)
    console.print(f"report: {md} and {page}")
    return {"report_md": str(md), "report_html": str(page), "outputs": [str(md), str(page)]}


STAGES: list[Stage] = [
    Stage("data", 0.10, stage_data, "built-in corpus -> clean -> dedup -> tokenizer -> shards"),
    Stage("pretrain", 0.50, stage_pretrain, "pretrain the MoE (FP8 when fp8.enabled)"),
    Stage("sft", 0.12, stage_sft, "supervised fine-tuning on chat conversations"),
    Stage("reward", 0.08, stage_reward, "reward model on preference pairs"),
    Stage("grpo", 0.15, stage_grpo, "GRPO with verifiable rewards"),
    Stage("eval", 0.04, stage_eval, "held-out accuracy after each stage, samples"),
    Stage("report", 0.01, stage_report, "write report.md and report.html"),
]


# ----------------------------------------------------------------------------- runner
def _marker(root: Path, name: str) -> Path:
    return root / "stages" / f"{name}.json"


def _is_done(root: Path, name: str) -> dict[str, Any] | None:
    path = _marker(root, name)
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
        for p, size in rec["files"].items():
            if not Path(p).is_file() or Path(p).stat().st_size != size:
                return None
        return rec["summary"]
    except (OSError, ValueError, KeyError):
        return None


def _mark_done(root: Path, name: str, summary: dict[str, Any], seconds: float) -> None:
    files = {p: Path(p).stat().st_size for p in summary.get("outputs", [])}
    path = _marker(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"summary": summary, "files": files, "seconds": round(seconds, 2),
                               "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1, default=str))
    tmp.replace(path)


def run_pipeline(cfg: Config, from_stage: str | None = None, only: list[str] | None = None) -> Path:
    names = [s.name for s in STAGES]
    if from_stage is not None and from_stage not in names:
        raise UserError(f"--from {from_stage!r}: not a stage (stages: {', '.join(names)})")
    root = Path(cfg.train.out_dir) / cfg.train.run_name
    root.mkdir(parents=True, exist_ok=True)
    if from_stage is not None:  # rerun from scratch: markers and the stages' own outputs go
        for name in names[names.index(from_stage):]:
            _marker(root, name).unlink(missing_ok=True)
            if name != "data" and (root / name).is_dir():
                shutil.rmtree(root / name)
    ctx = Context(cfg, root, {}, rebuild_data=from_stage == "data")
    t_start = time.perf_counter()
    done_weight = 0.0
    total_weight = sum(s.weight for s in STAGES)
    for i, stage in enumerate(STAGES, start=1):
        if only and stage.name not in only:
            continue
        summary = _is_done(root, stage.name)
        head = f"[{i}/{len(STAGES)}] {stage.name}"
        if summary is not None:
            console.print(f"[dim]{head}: up to date, skipped ({stage.description})[/dim]")
            ctx.summaries[stage.name] = summary
            continue
        elapsed = time.perf_counter() - t_start
        eta = ""
        if done_weight > 0:
            eta = f" · pipeline ETA ~{elapsed / done_weight * (total_weight - done_weight) / 60:.1f} min"
        console.rule(f"[bold]{head}[/bold] — {stage.description} · elapsed {elapsed / 60:.1f} min{eta}")
        t0 = time.perf_counter()
        summary = stage.run(ctx)
        _mark_done(root, stage.name, summary, time.perf_counter() - t0)
        ctx.summaries[stage.name] = json.loads(json.dumps(summary, default=str))
        done_weight += stage.weight
    console.rule(f"[bold green]done in {(time.perf_counter() - t_start) / 60:.1f} min[/bold green]")
    return root


def cli(argv: list[str]) -> int:
    from moeforge.cli import parse_config_args

    parser = argparse.ArgumentParser(prog="moeforge run", description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="from_stage", default=None, help="rerun from this stage on")
    parser.add_argument("--only", nargs="+", default=None, help="run only these stages")
    args, cfg = parse_config_args(argv, parser)
    root = run_pipeline(cfg, args.from_stage, args.only)
    report = root / "report.md"
    if report.exists():
        print(f"report: {report} and {root / 'report.html'}")
    return 0
