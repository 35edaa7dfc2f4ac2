"""Benchmark helpers (moeforge/bench.py): interleaved timing and the results files, on a
fake clock so nothing here depends on the machine's speed."""

import json
import sys

import pytest

from moeforge import bench


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(bench.time, "perf_counter", c)
    return c


def test_interleaved_alternates_and_reports_medians(clock):
    calls = []
    costs = {"a": iter([9.0, 1.0, 2.0, 3.0]), "b": iter([9.0, 5.0, 50.0, 4.0])}  # first: the warm-up

    def fn(name):
        def run():
            calls.append(name)
            clock.now += next(costs[name])
        return run

    samples = {}
    t = bench.interleaved({"a": fn("a"), "b": fn("b")}, repeat=3, warmup=1, samples=samples)
    assert calls == ["a", "b"] * 4  # alternation, warm-up included
    assert t == {"a": 2.0, "b": 5.0}  # medians: one slow outlier (50) does not move b's
    assert samples == {"a": [1.0, 2.0, 3.0], "b": [5.0, 50.0, 4.0]}


def test_write_results_json_and_markdown(tmp_path):
    rows = [{"variant": "x", "ms": 1.23456}, {"variant": "y", "ms": 2.0}]
    js, md = bench.write_results("demo", "Demo", rows, ["a note"], {"ratio": 0.5}, out_dir=tmp_path)
    data = json.loads(js.read_text())
    assert data["rows"] == rows and data["summary"] == {"ratio": 0.5}
    text = md.read_text()
    assert "# Demo" in text and "| x | 1.235 |" in text and "a note" in text and "ratio: 0.5" in text
    # rows with more keys than the first still get their columns (blank where a row lacks one)
    js, md = bench.write_results("demo", "Demo", [*rows, {"variant": "z", "ms": 3.0, "extra": 7}], out_dir=tmp_path)
    text = md.read_text()
    assert "| variant | ms | extra |" in text and "| x | 1.235 |  |" in text and "| z | 3 | 7 |" in text


def test_results_name_the_cpu_and_its_bf16_matrix_features(tmp_path, monkeypatch):
    """Hosts differ between sessions (AMX or not): every result file says which CPU made it."""
    from moeforge import native

    monkeypatch.setattr(native, "cpu_id", lambda: "flags\t: fpu avx512_bf16 amx_tile amx_bf16\nmodel name\t: Xeon X")
    assert bench.cpu_name() == "Xeon X (amx_bf16, avx512_bf16)"
    monkeypatch.setattr(native, "cpu_id", lambda: "flags\t: fpu avx2\nmodel name\t: Old CPU")
    assert bench.cpu_name() == "Old CPU (no bf16 matrix instructions)"
    js, md = bench.write_results("demo", "Demo", [{"a": 1}], out_dir=tmp_path)
    assert json.loads(js.read_text())["environment"]["cpu"] == "Old CPU (no bf16 matrix instructions)"
    assert "Old CPU (no bf16 matrix instructions)" in md.read_text().splitlines()[2]


@pytest.mark.parametrize("choice, cls, suffix", [("bf16", "bf16-capable", ""), ("fp32", "AVX2 class", "_avx2")])
def test_results_name_the_cpu_class_and_keep_one_file_per_class(tmp_path, monkeypatch, choice, cls, suffix):
    """Results are per CPU class (the dtype auto picks there), the ISA cap named when set."""
    from moeforge import precision

    monkeypatch.setattr(precision, "machine_choice", lambda device: precision.Choice(choice, "mocked"))
    for k in precision.ISA_SWITCHES:
        monkeypatch.delenv(k, raising=False)
    assert bench.cpu_class() == cls and bench.class_suffix() == suffix
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert bench.cpu_class() == f"{cls} (ONEDNN_MAX_CPU_ISA=AVX2)" and bench.class_suffix() == suffix
    js, md = bench.write_results("demo", "Demo", [{"a": 1}], out_dir=tmp_path)
    assert json.loads(js.read_text())["environment"]["cpu_class"] == bench.cpu_class()
    assert f"CPU class: {cls}" in md.read_text().splitlines()[2]


def test_cli_runs_each_benchmark_with_quick_and_reports_failures(tmp_path, monkeypatch, capsys):
    """`moeforge bench --quick` passes --quick to every script, keeps going after one fails
    (an argparse error or sys.exit(1)) and returns nonzero naming it."""
    (tmp_path / "bench_a_fails.py").write_text("import sys\nsys.exit(2)\n")
    (tmp_path / "bench_b_ok.py").write_text(
        "import sys, pathlib\npathlib.Path(sys.argv[0]).with_suffix('.ran').write_text(' '.join(sys.argv[1:]))\n")
    monkeypatch.setattr(bench, "BENCH_DIR", tmp_path)
    assert bench.cli(["--quick"]) == 1
    assert (tmp_path / "bench_b_ok.ran").read_text() == "--quick"
    assert "failed: a_fails" in capsys.readouterr().err
    assert bench.cli(["b_ok"]) == 0


def test_every_benchmark_that_parses_arguments_accepts_quick():
    """`moeforge bench --quick` hands --quick to all of them; one without it would stop with
    an argparse error (as activations and fp8_cost did)."""
    scripts = sorted(bench.BENCH_DIR.glob("bench_*.py"))
    assert len(scripts) >= 10
    missing = [p.name for p in scripts if "parse_args" in p.read_text() and '"--quick"' not in p.read_text()]
    assert not missing, missing


def _bench_script(name: str):
    """benchmarks/<name>.py as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, bench.BENCH_DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_run(root, name: str, losses: list[float], seed: int) -> None:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.toml").write_text(f'[train]\nseed = {seed}\nsteps = {len(losses)}\nmicro_batch_size = 16\n'
                                   'seq_len = 128\nwarmup_steps = 10\nschedule = "v3"\n')
    (d / "metrics.jsonl").write_text("".join(
        json.dumps({"kind": "train", "step": i + 1, "loss": v, "lm": v / 2}) + "\n" for i, v in enumerate(losses)))


def test_fp8_training_compare_reports_gaps_per_seed_and_the_bf16_noise_floor(tmp_path, monkeypatch):
    """bench_fp8_training --compare on synthetic runs: the FP8 gap per seed pair and each BF16
    control run's distance from its BF16 run, judged on the mean of the last 100 steps only."""

    mod = _bench_script("bench_fp8_training")
    runs, out = tmp_path / "runs", tmp_path / "results"
    monkeypatch.setattr(mod, "RUN_ROOT", runs)
    monkeypatch.setattr(mod, "RESULTS_DIR", out)
    monkeypatch.setattr(bench, "RESULTS_DIR", out)
    out.mkdir()
    early = [9.0] * 50  # steps 1-50: outside the final window, must not count
    for name, seed, final in [("bf16", 1234, 2.0), ("fp8", 1234, 2.01), ("bf16_control", 1234, 1.99),
                              ("bf16_seed2", 2, 3.0), ("fp8_seed2", 2, 3.03), ("bf16_control_seed2", 2, 3.06),
                              ("fp8norm_seed2", 2, 3.09)]:
        _fake_run(runs, name, early + [final] * 100, seed)
    _fake_run(runs, "fp8norm", early + [2.0] * 99, 1234)  # unfinished (one step short): left out
    assert mod.compare("fp8_demo") == 0
    s = json.loads((out / "fp8_demo.json").read_text())["summary"]
    assert s["relative_difference"] == pytest.approx(0.005)
    assert s["relative_difference_by_seed"] == pytest.approx({"1234": 0.005, "2": 0.01})
    assert s["control_relative_difference_by_seed"] == pytest.approx({"1234": -0.005, "2": 0.02})
    assert s["control_relative_difference_bf16_vs_bf16"] == pytest.approx(0.005)
    assert s["fp8_vs_control_by_seed"] == pytest.approx({"1234": 2.01 / 1.99 - 1, "2": 3.03 / 3.06 - 1})
    assert list(s["fp8norm_by_seed"]) == ["2"]
    assert s["fp8norm_by_seed"]["2"] == pytest.approx({"bf16": 0.03, "fp8": 3.09 / 3.03 - 1, "control": 3.09 / 3.06 - 1})
    assert not s["passed"]  # 150 steps, not 2,000
    assert (out / "fp8_demo.png").is_file() and "bf16 control seed 2" in (out / "fp8_demo.md").read_text()


def test_gpu_script_runs_every_path_on_cpu_at_toy_sizes(tmp_path, monkeypatch):
    """benchmarks/gpu_fp8.py has never run on a GPU: its --device cpu --quick smoke test
    goes through the same functions (GEMM table, BF16/FP8 step, transformers pair, MoE pair)."""
    pytest.importorskip("transformers")
    monkeypatch.syspath_prepend(str(bench.BENCH_DIR))
    mod = _bench_script("gpu_fp8")
    assert mod.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    gemm, step, hf = (json.loads((tmp_path / f"gpu_{n}.json").read_text()) for n in ("gemm", "step", "hf"))
    assert len(gemm["rows"]) == 5 and all(r["ok"] for r in gemm["rows"])  # calc_diff < 1e-3 on every shape
    assert {r["variant"] for r in step["rows"]} == {"bf16", "fp8"}
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu_vs_bf16_matmul"] for r in step["rows"])
    assert step["summary"]["fp8_step_time_vs_bf16"] > 0 and hf["rows"][0]["speedup"] > 0
    moe = json.loads((tmp_path / "gpu_moe.json").read_text())
    assert [r["experts"] for r in moe["rows"]] == [8, 32] and all(r["speedup"] > 0 for r in moe["rows"])


def test_fp8_training_all_plans_only_the_missing_runs(tmp_path, monkeypatch):
    """--all trains BF16, FP8 and the BF16 control per seed, skipping finished runs (an
    unfinished one is planned again: it resumes) and the preset's own seed given twice."""

    mod = _bench_script("bench_fp8_training")
    monkeypatch.setattr(mod, "RUN_ROOT", tmp_path)
    _fake_run(tmp_path, "bf16", [2.0] * 150, 1234)
    _fake_run(tmp_path, "fp8", [2.0] * 100, 1234)  # interrupted at step 100
    _fake_run(tmp_path, "bf16_seed2", [2.0] * 150, 2)
    plan = dict(mod.planned_runs([2, 1234], steps=150))
    assert plan == {"fp8": ["--precision", "fp8"], "bf16_control": ["--precision", "bf16", "--control"],
                    "fp8_seed2": ["--precision", "fp8", "--seed", "2"],
                    "bf16_control_seed2": ["--precision", "bf16", "--control", "--seed", "2"]}



def test_fp8_training_side_named_by_seed_the_preset_seed_unsuffixed(tmp_path, monkeypatch):
    """--seed N trains run {precision}_seedN, but the preset's own seed given explicitly is the
    unsuffixed run that --compare reads (session 16 trained fp8norm_seed1234, never compared);
    on a fresh machine, before any run exists."""
    from moeforge.config import load_config

    mod = _bench_script("bench_fp8_training")
    monkeypatch.setattr(mod, "RUN_ROOT", tmp_path)  # empty: no run to read the seed from
    preset_seed = load_config("tiny").train.seed
    got = []
    # the run directory train_side uses: its name argument, or the precision when that is None
    monkeypatch.setattr(mod, "train_side", lambda precision, *a: got.append((precision, a[3] or precision, a[4])))
    for argv in (["--precision", "fp8norm", "--seed", str(preset_seed)], ["--precision", "fp8", "--seed", "7"],
                 ["--precision", "bf16", "--control", "--seed", str(preset_seed)],
                 ["--precision", "bf16", "--control", "--seed", "7"], ["--precision", "fp8"]):
        monkeypatch.setattr(sys, "argv", ["bench_fp8_training.py", *argv])
        assert mod.main() == 0
    assert got == [("fp8norm", "fp8norm", preset_seed), ("fp8", "fp8_seed7", 7), ("bf16", "bf16_control", preset_seed),
                   ("bf16", "bf16_control_seed7", 7), ("fp8", "fp8", None)]

FAKE_SIDE = """
import argparse, json, os, pathlib
ap = argparse.ArgumentParser()
ap.add_argument("--precision"); ap.add_argument("--control", action="store_true"); ap.add_argument("--seed", type=int)
ap.add_argument("--steps", type=int); ap.add_argument("--micro-batch"); ap.add_argument("--data-mb")
a = ap.parse_args()
name = ("bf16_control" if a.control else a.precision) + ("" if a.seed is None else f"_seed{a.seed}")
final = {"bf16": 2.0, "fp8": 2.004, "bf16_control": 1.998}[name.split("_seed")[0]] * (1 if a.seed is None else 1.5)
d = pathlib.Path(os.environ["FAKE_ROOT"]) / name
d.mkdir(parents=True, exist_ok=True)
(d / "config.toml").write_text(f'[train]\\nseed = {a.seed or 1234}\\nsteps = {a.steps}\\nmicro_batch_size = 16\\n'
                               'seq_len = 128\\nwarmup_steps = 10\\nschedule = "v3"\\neval_batches = 4\\n')
(d / "metrics.jsonl").write_text("".join(json.dumps({"kind": "train", "step": i + 1, "loss": final, "lm": final})
                                         + "\\n" for i in range(a.steps)))
"""


def test_fp8_training_all_trains_the_missing_runs_then_compares(tmp_path, monkeypatch):
    """--all's orchestration with a stand-in for the training script: every planned run is
    started (two at a time), and the comparison then reads them all."""

    mod = _bench_script("bench_fp8_training")
    runs, out = tmp_path / "runs", tmp_path / "results"
    out.mkdir()
    (tmp_path / "side.py").write_text(FAKE_SIDE)
    monkeypatch.setattr(mod, "__file__", str(tmp_path / "side.py"))
    for m, attr, value in [(mod, "RUN_ROOT", runs), (mod, "RESULTS_DIR", out), (bench, "RESULTS_DIR", out)]:
        monkeypatch.setattr(m, attr, value)
    monkeypatch.setenv("FAKE_ROOT", str(runs))
    assert mod.run_all([3], jobs=2, steps=120, passed=["--steps", "120"], stem="demo") == 0
    s = json.loads((out / "demo.json").read_text())["summary"]
    assert s["relative_difference_by_seed"] == pytest.approx({"1234": 0.002, "3": 0.002})
    assert s["control_relative_difference_by_seed"] == pytest.approx({"1234": -0.001, "3": -0.001})
    assert mod.planned_runs([3], steps=120) == []  # nothing left to train


def test_fp8_training_weight_distance_at_the_newest_common_checkpoint(tmp_path, monkeypatch):

    import torch
    from safetensors.torch import save_file

    mod = _bench_script("bench_fp8_training")
    monkeypatch.setattr(mod, "RUN_ROOT", tmp_path)
    for name, step, w in [("a", 250, [3.0, 4.0]), ("a", 500, [3.0, 4.0]), ("b", 250, [3.0, 4.0]),
                          ("b", 500, [0.0, 4.0]), ("b", 750, [9.0, 9.0])]:
        d = tmp_path / name / "checkpoints" / f"step_{step:06d}"
        d.mkdir(parents=True)
        save_file({"x": torch.tensor(w), "y": torch.zeros(2)}, str(d / "model.safetensors"))
    assert mod.weight_distance("a", "b") == pytest.approx(3 / 5)  # step 500: ||(3, 0)|| / ||(3, 4)||
    assert mod.weight_distance("a", "c") is None


def test_fp8_training_lr_option_moves_the_runs_and_sets_both_rates(tmp_path, monkeypatch, capsys):
    """--lr trains at another peak LR (min_lr a tenth of it) in a run root of its own, so
    that its runs never mix with the preset's; without it the preset's rates stay."""
    from moeforge.config import load_config

    mod = _bench_script("bench_fp8_training")
    monkeypatch.setattr(mod, "RUN_ROOT", tmp_path / "fp8_training")
    preset = load_config("tiny").train
    cfg = mod.run_config("fp8", 100, 16, 1.0)
    assert (cfg.train.lr, cfg.train.min_lr) == (preset.lr, preset.min_lr)
    monkeypatch.setattr("sys.argv", ["bench_fp8_training.py", "--compare", "--lr", "5e-4"])
    assert mod.main() == 1  # nothing trained there yet
    assert mod.RUN_ROOT == tmp_path / "fp8_training_lr0.0005" and "fp8_training_lr0.0005" in capsys.readouterr().out
    cfg = mod.run_config("bf16", 100, 16, 1.0, name="bf16_control")
    assert (cfg.train.lr, cfg.train.min_lr) == (5e-4, 5e-5) and cfg.train.grad_accum == 2
    assert cfg.train.out_dir == str(tmp_path / "fp8_training_lr0.0005")
