"""bench speed's memory specs (POLICY[@PRESET][:KEY=VALUE...]) and interleaved repeats."""

from __future__ import annotations

import pytest

from slotgen.bench.speed import _median_row, memory_spec, run_speed_bench
from slotgen.errors import SlotgenError


def test_memory_specs_name_policy_preset_and_keys():
    assert memory_spec("sink") == {"policy": "sink"}
    assert memory_spec("bank@memflow:write_every=1") == {"policy": "bank", "preset": "memflow", "write_every": "1"}
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        memory_spec("sink:window")
    from slotgen.cli import memory_spec_list

    assert memory_spec_list("sink:window=6, sink@longlive") == ["sink:window=6", "sink@longlive"]
    with pytest.raises(SlotgenError, match="unknown attention preset"):
        memory_spec_list("sink@nope")


def test_repeats_report_medians():
    rows = [{"policy": "a", "chunk_ms_median": x, "drift": None, "model": "m"} for x in (3.0, 1.0, 2.0)]
    assert _median_row(rows) == {"policy": "a", "chunk_ms_median": 2.0, "drift": None, "model": "m", "repeats": 3}


def test_a_preset_runs_beside_a_plain_policy(tmp_path):
    rows = run_speed_bench(["sink:window=6", "sink@longlive"], [1.0], chunks=2, steps=1, isolate=False, repeat=2)
    assert [r["policy"] for r in rows] == ["sink:window=6", "sink@longlive"] and all(r["repeats"] == 2 for r in rows)
    assert rows[0]["memory_bytes"] == rows[1]["memory_bytes"]  # the same frames held: 3 sink + 6 past
