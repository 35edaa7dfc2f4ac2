"""Config tree: presets load, overrides are typed, bad values fail with one line naming the field."""

import subprocess
import sys
from pathlib import Path

import pytest

from moeforge.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ["tiny", "small", "16b", "deepseek-v3-671b"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(name):
    cfg = load_config(ROOT / "configs" / f"{name}.toml")
    assert cfg.model.n_activated_experts <= cfg.model.n_routed_experts


def test_preset_by_name_and_typed_overrides():
    cfg = load_config("tiny", ["--model.n_layers", "6", "--train.lr", "1e-3", "--fp8.enabled", "false",
                               "--train.run_name=abc"])
    assert cfg.model.n_layers == 6 and isinstance(cfg.model.n_layers, int)
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.fp8.enabled is False and cfg.train.run_name == "abc"
    # integer given for a float field is accepted as a float
    assert isinstance(load_config(None, ["--train.lr", "1"]).train.lr, float)


@pytest.mark.parametrize("overrides, field", [
    (["--model.n_activated_experts", "9"], "model.n_activated_experts"),
    (["--model.n_limited_groups", "3", "--model.n_expert_groups", "2"], "model.n_limited_groups"),
    (["--model.n_expert_groups", "3"], "model.n_expert_groups"),
    (["--model.attn_type", "mha", "--model.n_heads", "5"], "model.dim"),
    (["--model.attn_type", "mha", "--model.n_kv_heads", "3"], "model.n_kv_heads"),
    (["--model.qk_rope_head_dim", "15"], "model.qk_rope_head_dim"),
    (["--model.nlayers", "2"], "model.nlayers"),
    (["--train.lr", "fast"], "train.lr"),
    (["--train.steps", "1.5"], "train.steps"),
    (["--fp8.enabled", "yes"], "fp8.enabled"),
    (["--train.dtype", "fp16"], "train.dtype"),
    (["--parallel.tp", "3"], "parallel.tp"),
    (["--nosection", "1"], "nosection"),
])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    msg = str(e.value)
    assert field in msg and "\n" not in msg


def test_unknown_key_in_toml(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[model]\ndim = 64\nwidth = 3\n")
    with pytest.raises(ConfigError, match="unknown key model.width"):
        load_config(p)
    p.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")


def test_cli_reports_config_error_in_one_line():
    r = subprocess.run([sys.executable, "-m", "moeforge.cli", "count", "--config", "tiny",
                        "--model.n_activated_experts", "99"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "model.n_activated_experts" in r.stderr
    assert "Traceback" not in r.stderr
