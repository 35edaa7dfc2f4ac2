"""`moeforge plan` and layout validation: no process groups, one-line errors naming the field."""

import pytest

from moeforge.config import ConfigError, load_config
from moeforge.model.count import count_config
from moeforge.parallel.mesh import check_layout
from moeforge.parallel.plan import cli, plan


def test_plan_partitions_every_parameter_exactly_once_without_parallelism():
    cfg = load_config("tiny")
    out = plan(cfg)
    counts = count_config(cfg.model)
    assert out["ranks"][0]["params_per_rank"] == counts["total"] + counts["mtp_total"]


def test_v3_layout_places_v_stages_and_experts():
    cfg = load_config("deepseek-v3-671b")
    out = plan(cfg)
    assert out["world_size"] == 2048 and out["mesh"]["edp"] == 2
    r0 = out["ranks"][0]["stages"]
    assert [s["stage"] for s in r0] == [0, 31] and r0[0]["embed"] and r0[1]["head_and_mtp"]
    assert len(out["experts_per_ep_rank"]) == 64 and out["experts_per_ep_rank"][-1] == [252, 255]
    layers = sorted(i for r in out["ranks"] for s in r["stages"] for i in range(s["layers"][0], s["layers"][1] + 1))
    assert layers == list(range(61))


@pytest.mark.parametrize("over, world, field", [
    ({"parallel.tp": 2}, 4, "world size 4"),
    ({"parallel.ep": 3}, 1, "parallel.ep=3"),
    ({"parallel.dp_shard": 2, "parallel.ep": 4}, 2, "parallel.ep=4"),
    ({"parallel.pp": 2, "parallel.pp_schedule": "dualpipev", "parallel.pp_microbatches": 2}, 2, "pp_microbatches"),
    ({"parallel.pp": 2, "parallel.pp_schedule": "zbv", "model.n_layers": 3}, 2, "needs 4 stages"),
    ({"parallel.param_dtype": "fp16"}, 1, "parallel.param_dtype"),
])
def test_impossible_layouts_fail_before_process_groups(over, world, field):
    with pytest.raises(ConfigError, match=field):
        check_layout(load_config("tiny", over), world)


def test_plan_cli_prints_and_rejects(capsys):
    assert cli(["--config", "tiny", "--parallel.pp", "2", "--parallel.dp_shard", "2", "--world-size", "4"]) == 0
    assert "+head/mtp" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="world size 8"):
        cli(["--config", "tiny", "--world-size", "8"])
