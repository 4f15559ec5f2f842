"""Time estimates come from steady chunks: a first chunk that compiled (``--compile``) or warmed up is
never extrapolated, and no estimate is shown until the pace is steady."""

from __future__ import annotations

from types import SimpleNamespace

from slotgen.pace import SteadyPace, clock
from slotgen.render import ChunkEvent


def test_no_pace_until_steady_chunks_after_the_first():
    pace = SteadyPace()
    for s in (600.0, 1.0, 1.1):  # the compile, then two chunks: not yet a window of steady ones
        pace.add(s)
        assert pace.per_item is None and pace.remaining(40) is None
    pace.add(0.9)
    assert pace.per_item == 1.0 and pace.remaining(40) == 40.0


def test_a_pace_still_changing_gives_no_estimate():
    pace = SteadyPace()
    for s in (5.0, 8.0, 4.0, 1.0, 2.0):  # recompiles while the memory grows
        pace.add(s)
    assert pace.per_item is None
    for s in (1.0, 1.0, 1.0):
        pace.add(s)
    assert pace.per_item == 1.0


def test_clock():
    assert clock(None) == "-" and clock(65) == "1:05" and clock(3723) == "1:02:03"


def _stream(chunk_seconds: list[float], capsys) -> str:
    from slotgen.cli import _run_streaming

    n = len(chunk_seconds)
    renderer = SimpleNamespace(total_chunks=lambda: n, storyboard=SimpleNamespace(total_frames=12 * n), size=(832, 480))

    def run(on_chunk, should_stop):
        for i, s in enumerate(chunk_seconds):
            on_chunk(ChunkEvent(i, n, 0, "p", 12 * (i + 1), 12 * n, 16, s, sum(chunk_seconds[: i + 1])))

    _run_streaming(True, renderer, run)
    return capsys.readouterr().err


def test_the_long_render_warning_uses_the_steady_pace_not_the_compile(capsys):
    # 43 chunks, the first one compiling for 20 s, then 0.2 s each: 14 minutes by the first chunk's pace
    assert "will take" not in _stream([20.0] + [0.2] * 42, capsys)
    # steady 30 s chunks: the warning comes, from the steady pace
    err = _stream([31.0] + [30.0] * 42, capsys)
    assert "a chunk takes 30.0s; the 39 chunks left will take about 20 min" in err, err
