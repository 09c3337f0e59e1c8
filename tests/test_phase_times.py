"""The per-phase time summary printed at the end of ``run``."""

import pytest

from hetpure_bench.bench.phase_times import PhaseTimes


def test_phases_add_up_in_first_run_order_and_count_a_failing_phase():
    ticks = iter([0.0, 2.0, 2.0, 12.5, 12.5, 13.0, 13.0, 20.0])
    times = PhaseTimes(clock=lambda: next(ticks))
    with times.phase("loading"):
        pass
    with times.phase("attack + evaluate"):
        pass
    with times.phase("loading"):  # a second row's loading adds to the first's
        pass
    with pytest.raises(ValueError), times.phase("sanity checks"):
        raise ValueError
    assert times.seconds == {"loading": 2.5, "attack + evaluate": 10.5, "sanity checks": 7.0}
    assert times.summary() == "time per phase: loading 2.5 s, attack + evaluate 10.5 s, sanity checks 7.0 s; total 20.0 s"
