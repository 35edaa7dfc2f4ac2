"""Benchmark helpers (moeforge/bench.py): interleaved timing and the results files, on a
fake clock so nothing here depends on the machine's speed."""

import json

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
