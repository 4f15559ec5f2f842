"""The policy-cost benchmark runs at small shapes and reports what each policy hands to attention."""

from slotgen.bench.policy_cost import run


def test_policy_cost_reports_every_policy():
    rows = run((64, 32), chunks=6, policies=["window", "sink", "slot"], full_size_slot=False, layers=2)
    by = {r["policy"]: r for r in rows}
    assert set(by) == {"window", "sink", "slot"}
    assert all(r["ms_per_chunk"] > 0 and r["ms_per_chunk_30_layers"] == r["ms_per_chunk"] * 15 for r in rows)
    # window 12 frames of 2×4 tokens; sink 3 + 9 frames; slot adds retrieved rows beyond its sink base
    assert by["window"]["rows_read_last_layer"] == 12 * 8
    assert by["sink"]["rows_read_last_layer"] == 12 * 8
    assert by["slot"]["rows_read_last_layer"] > by["sink"]["rows_read_last_layer"]
