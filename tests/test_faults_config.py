"""Property-based fuzzing (hypothesis) of the config loader and the command line.

Proves, for random input built from the real dataclass fields and random-typed values:
- ``load_config(None, overrides)`` either returns a valid config or raises one
  :class:`ConfigError` whose message is a single line; nothing else escapes;
- a config that loads is written by the trainer (``config.toml`` in every run dir) in a
  form that loads back to the same tree, so a run can always be re-run from its file;
- random TOML documents (real and made-up sections, keys and values of every TOML type,
  and arbitrary text) give a config or a one-line ConfigError;
- ``moeforge.cli.main`` with random overrides and random argument lists exits 0 or 2,
  prints at most one stderr line for a config error and never a traceback.
Example counts are bounded so the whole file takes seconds.
"""

from __future__ import annotations

import dataclasses
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fault_helpers import cli
from moeforge.config import Config, ConfigError, load_config
from moeforge.train.metrics import config_toml

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _fields(cls=Config, prefix: str = "") -> dict[str, typing.Any]:
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        if name.isupper():  # class constants such as SECTION
            continue
        if dataclasses.is_dataclass(tp):
            out.update(_fields(tp, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = tp
    return out


FIELDS = _fields()
KEYS = sorted(FIELDS)
SECTIONS = sorted({k.split(".")[0] for k in KEYS})
NAME = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=8)

keys = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(KEYS).map(lambda k: k + ".deeper"),
    st.builds(lambda s, n: f"{s}.{n}", st.sampled_from(SECTIONS), NAME),  # unknown field of a real section
    st.builds(lambda a, b: f"{a}.{b}", NAME, NAME),
    st.sampled_from(SECTIONS),  # a whole section replaced by a scalar
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["mla", "mha", "fp32", "bf16", "v3", "cpu", "auto", "sigmoid", ""]),
    st.integers(-3, 300),
)
values = st.one_of(scalars, st.lists(scalars, max_size=4), st.dictionaries(NAME, scalars, max_size=3))


def _check_one_line(e: ConfigError) -> None:
    msg = str(e)
    assert msg and "\n" not in msg, repr(msg)


@SETTINGS
@given(over=st.dictionaries(keys, values, min_size=1, max_size=3))
def test_random_overrides_give_a_config_or_one_line_error(tmp_path, over):
    try:
        cfg = load_config(None, dict(over))
    except ConfigError as e:
        _check_one_line(e)
        return
    (tmp_path / "config.toml").write_text(config_toml(cfg))  # what every run directory keeps
    assert load_config(tmp_path / "config.toml").to_dict() == cfg.to_dict()


def _toml_value(v) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(v), repr(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return "1979-05-27T07:32:00Z"  # None: a TOML datetime, a type no field has


@st.composite
def toml_documents(draw) -> str:
    lines = []
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.one_of(st.sampled_from(SECTIONS), NAME))
        lines.append(f'["{section}"]' if draw(st.booleans()) else f"[{section}]")
        for _ in range(draw(st.integers(0, 4))):
            real = [k.split(".", 1)[1] for k in KEYS if k.startswith(section + ".")]
            key = draw(st.sampled_from(real) if real and draw(st.booleans()) else NAME)
            lines.append(f"{__import__('json').dumps(key)} = {_toml_value(draw(values))}")
    return "\n".join(lines) + "\n"


@SETTINGS
@given(doc=st.one_of(toml_documents(), st.text(max_size=200)))
def test_random_toml_gives_a_config_or_one_line_error(tmp_path, doc):
    path = tmp_path / "recipe.toml"
    path.write_text(doc, encoding="utf-8", errors="surrogatepass")
    try:
        load_config(path)
    except ConfigError as e:
        _check_one_line(e)


@pytest.fixture
def no_counting(monkeypatch):
    """`moeforge count` without building the model: a valid random config may be huge."""
    from moeforge.model import count

    monkeypatch.setattr(count, "count_config", lambda m: dict.fromkeys(
        ["total", "activated", "activated_without_embedding", "embedding", "head", "mtp_total", "mtp_activated"], 0))


ARG = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)


def _assert_clean(rc: int, err: list[str]) -> None:
    assert rc in (0, 2), (rc, err)
    assert not any("Traceback" in ln for ln in err), err
    if err and err[0].startswith("usage:"):  # argparse's own usage error (it prints the argument as given)
        assert ": error:" in err[1], err
    elif rc == 2:
        assert len(err) == 1 and "moeforge" in err[0], err  # a moeforge error is one line


@SETTINGS
@given(key=keys, text=st.one_of(ARG, values.map(str)))
def test_cli_override_never_prints_a_traceback(no_counting, key, text):
    rc, _, err = cli(["count", "--config", "tiny", f"--{key}", text])
    _assert_clean(rc, err)


@SETTINGS
@given(argv=st.lists(st.one_of(ARG, st.sampled_from(["--config", "tiny", "--json", "--", "-h", "--model.dim",
                                                       "--train.steps=", "nope.toml"]),
                               keys.map(lambda k: f"--{k}")), max_size=6))
def test_cli_random_arguments_never_print_a_traceback(no_counting, argv):
    rc, _, err = cli(["count", *argv])
    _assert_clean(rc, err)
