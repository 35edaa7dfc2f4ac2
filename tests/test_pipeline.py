"""`moeforge run` end to end at minute scale: every stage runs, the report is written,
finished stages are skipped on a rerun, and --from reruns a stage and those after it."""

import json

import pytest

from moeforge.config import load_config
from moeforge.pipeline import STAGES, run_pipeline

pytestmark = pytest.mark.slow

TINY = {
    "data.builtin_mb": 0.4, "data.vocab_size": 512, "data.tokenizer_sample_mb": 0.4,
    "model.vocab_size": 512, "model.dim": 64, "model.n_layers": 2, "model.n_heads": 2, "model.inter_dim": 128,
    "model.moe_inter_dim": 32, "model.q_lora_rank": 32, "model.kv_lora_rank": 32, "model.qk_nope_head_dim": 16,
    "model.qk_rope_head_dim": 8, "model.v_head_dim": 16,
    "train.steps": 4, "train.seq_len": 32, "train.micro_batch_size": 4, "train.warmup_steps": 1,
    "train.eval_every": 4, "train.eval_batches": 1, "train.ckpt_every": 4, "train.progress": False,
    "sft.steps": 2, "sft.seq_len": 64, "sft.eval_every": 2, "sft.eval_problems": 4, "sft.micro_batch_size": 4,
    "reward.steps": 2, "reward.seq_len": 64, "reward.generated_pairs": 40, "reward.eval_every": 2,
    "grpo.steps": 1, "grpo.micro_batch_size": 2, "grpo.group_size": 2, "grpo.max_new_tokens": 4,
    "grpo.eval_problems": 4, "grpo.eval_every": 1,
}


def marker_times(root):
    return {p.stem: p.stat().st_mtime_ns for p in (root / "stages").glob("*.json")}


def test_pipeline_runs_skips_and_reruns_from(tmp_path, capsys):
    cfg = load_config("tiny", {**TINY, "data.data_dir": str(tmp_path / "data"), "train.out_dir": str(tmp_path / "runs")})
    root = run_pipeline(cfg)
    names = [s.name for s in STAGES]
    assert sorted(marker_times(root)) == sorted(names)
    report = (root / "report.md").read_text()
    for heading in ("## Data", "## Pretraining", "## Supervised fine-tuning", "## Reward model", "## GRPO",
                    "## Evaluation"):
        assert heading in report
    html = (root / "report.html").read_text()
    assert "<script" not in html and "data:image/png;base64," in html  # self-contained, no active content
    acc = json.loads((root / "eval" / "eval.json").read_text())["accuracy"]
    assert set(acc) == {"pretrain", "sft", "grpo"}

    before = marker_times(root)
    capsys.readouterr()
    run_pipeline(cfg)  # everything is up to date
    assert marker_times(root) == before
    assert capsys.readouterr().err.count("up to date, skipped") == len(names)

    run_pipeline(cfg, from_stage="grpo")
    after = marker_times(root)
    rerun = names[names.index("grpo"):]
    assert all(after[n] > before[n] for n in rerun)
    assert all(after[n] == before[n] for n in names if n not in rerun)


def test_stage_reruns_when_its_output_disappears(tmp_path):
    cfg = load_config("tiny", {**TINY, "data.data_dir": str(tmp_path / "data"), "train.out_dir": str(tmp_path / "runs")})
    root = run_pipeline(cfg, only=["data"])
    before = marker_times(root)
    (tmp_path / "data" / "manifest.json").unlink()
    run_pipeline(cfg, only=["data"])
    assert marker_times(root)["data"] > before["data"]
    assert (tmp_path / "data" / "manifest.json").is_file()


def test_unknown_from_stage_is_one_line_error(tmp_path):
    from moeforge.errors import UserError

    cfg = load_config("tiny", {"train.out_dir": str(tmp_path)})
    with pytest.raises(UserError, match="not a stage"):
        run_pipeline(cfg, from_stage="finetune")
