import pytest

from hetpure_bench.reporting.cost_table import cost_table, setup_cost, threads_of

# Two batches of one setup: the first attacked at 2 threads, the second judged examples another
# setup had stored (its attack seconds are that setup's) at 1 thread; 6 minutes of sanity checks.
COSTS = [
    {"attack_s": 3600.0, "eval_s": {"expected:10": 1800.0, "vote:20": 3600.0}, "device": "cpu (2 threads)"},
    {"attack_s": 7200.0, "eval_s": {"expected:10": 900.0, "vote:20": 1800.0}, "device": "cpu (1 thread)",
     "attack_reused_from": "other"},
]


def test_threads_are_read_from_the_device_label():
    assert (threads_of("cpu (2 threads)"), threads_of("cpu (1 thread)"), threads_of("NVIDIA H200")) == (2, 1, None)


def test_setup_cost_counts_what_was_spent_here_by_hand():
    cost = setup_cost(COSTS, sanity_s=360.0)
    assert cost.batches == 2 and cost.attack_s == 3600.0  # the reused attack is not spent again
    assert cost.eval_s == 3600.0 + 1800.0  # each batch's longest mode: the modes share one draw
    assert cost.wall_s == pytest.approx(3600 + 5400 + 360)
    # core-seconds: (3600 + 3600) * 2 + 1800 * 1, sanity at the last batch's single thread
    assert cost.core_s == pytest.approx(14400 + 1800 + 360)


def test_a_gpu_batch_leaves_core_hours_out():
    assert setup_cost([{**COSTS[0], "device": "NVIDIA H200"}], 0.0).core_s is None


class _Store:
    def batch_costs(self, key):
        return {"a": COSTS, "g": [{**COSTS[0], "device": "NVIDIA H200"}]}[key]

    def sanity(self, key):
        return ({}, 360.0) if key == "a" else None


def _row(key, mode, converged, device="cpu (2 threads) + cpu (1 thread)"):
    return {"setup_hash": key, "evaluation": mode, "defense": "hetpure", "attack": "suite(A + B)",
            "gradient_mode": "full", "device": device, "converged": converged}


def test_cost_table_has_one_line_per_setup_and_a_total():
    rows = [_row("a", "vote:20", "no"), _row("a", "expected:10", "yes"), _row("g", "vote:20", "yes", "NVIDIA H200")]
    table, total = cost_table(rows, _Store(), ("vote:20", "expected:10"))
    assert table["batches"].tolist() == [2, 1]
    first = table.iloc[0]
    assert (first["attack h"], first["evaluation h"], first["sanity h"], first["wall h"], first["core-h"]) == (
        "1.00", "1.50", "0.10", "2.60", "4.60")
    assert table["converged (vote:20 / expected:10)"].tolist() == ["no / yes", "yes / -"]
    assert table.iloc[1]["core-h"] == "-"
    # wall: 2.6 h + (1 h attack + 1 h evaluation) on the GPU
    assert total == "Total over 2 setups: 4.60 wall hours, 4.60 CPU core-hours (1 of them on a GPU, not in the core-hours)."
