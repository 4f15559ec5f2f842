"""Every bench subcommand reports its progress on stderr as it goes (one line per item off a terminal, a
rich bar on one), instead of printing nothing for minutes."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from slotgen.cli import app


def _err(res) -> str:
    try:
        return res.stderr
    except (ValueError, AttributeError):
        return res.output


@pytest.mark.parametrize("args, lines", [
    (["policy-cost", "--resolution", "64x64", "--chunks", "3", "--layers", "1", "--policies", "window,sink"],
     ["bench policy-cost 1/3: chunk 1 of 3", "bench policy-cost 3/3: chunk 3 of 3"]),
    pytest.param(["flops", "--model", "miniature", "--resolution", "64x64", "--memory", "window", "--memory", "sink"],
                 ["bench flops 1/2: window", "bench flops 2/2: sink"], marks=pytest.mark.slow),
])
def test_bench_reports_each_item_as_it_starts(args, lines):
    res = CliRunner().invoke(app, ["bench", *args])
    assert res.exit_code == 0, _err(res)
    err = _err(res)
    for line in lines:
        assert line in err, err


@pytest.mark.slow
def test_bench_snapshot_sizes_and_syncs_report_progress():
    res = CliRunner().invoke(app, ["bench", "snapshot-sizes", "--durations", "1", "--policies", "window,sink",
                                   "--resolution", "32x32", "--steps", "1"])
    assert res.exit_code == 0, _err(res)
    assert "bench snapshot-sizes 1/2: window, 1 s" in _err(res) and "bench snapshot-sizes 2/2: sink, 1 s" in _err(res)
    res = CliRunner().invoke(app, ["bench", "syncs", "--policies", "window", "--chunks", "3", "--steps", "1",
                                   "--resolution", "32x32"])
    assert res.exit_code == 0, _err(res)
    assert "bench syncs 1/1: window" in _err(res)


def test_bench_speed_reports_each_run(monkeypatch):
    import slotgen.bench.speed as speed

    seen = []
    monkeypatch.setattr(speed, "run_worker", lambda **kw: seen.append(kw) or {
        "policy": kw["policy"], "video_s": kw["duration"], "model": "m", "resolution": "32x32", "wall_s": 1.0,
        "realtime_x": 1.0, "gen_fps": 1.0, "chunk_ms_median": 1.0, "chunk_ms_p95": 1.0, "drift": None,
        "peak_rss_mb": 1.0, "memory_bytes": 0})
    rows = speed.run_speed_bench(["window", "sink"], [1.0, 2.0], isolate=False, on_item=lambda m: seen.append(m))
    labels = [s for s in seen if isinstance(s, str)]
    assert labels == ["window, 1 s", "sink, 1 s", "window, 2 s", "sink, 2 s"] and len(rows) == 4
