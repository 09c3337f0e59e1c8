import gc
import time

import torch
from conftest import HANG_GUARD_S

from hetpure_bench.bench.peak_memory import PeakMemory, current_rss_bytes, peak_tensor_bytes


def _until_sampled_twice(peak: PeakMemory) -> None:
    """Wait (however long the scheduler takes) until the sampler has read the RSS at least once
    after this call began: the second reading from now started after the first one ended."""
    seen = time.monotonic(), peak.samples
    while peak.samples < seen[1] + 2:
        assert time.monotonic() - seen[0] < HANG_GUARD_S, "the sampler thread never ran"  # a hang guard only
        time.sleep(0.001)


def test_the_peak_covers_a_short_lived_allocation():
    # Earlier tests' garbage freed by a collection during the block would lower the RSS as the
    # tensor raises it (this failed once under load, the peak equal to the baseline): collect
    # first and let no collection run inside.
    gc.collect()
    gc.disable()
    try:
        before = current_rss_bytes()
        with PeakMemory("cpu", interval_s=0.001) as peak:
            big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
            _until_sampled_twice(peak)  # not a race with the sampler: it has provably seen the tensor live
            del big
    finally:
        gc.enable()
    assert peak.mib * 2**20 >= before + 48 * 2**20
    assert current_rss_bytes() < peak.peak_bytes


def test_peak_tensor_bytes_counts_live_tensors_only():
    kept = torch.ones(2**20)  # allocated before: not counted

    def work():
        a = torch.ones(2**20)  # 4 MiB
        b = a * 2  # 8 MiB live at the peak
        del a, b
        c = torch.ones(2**19)  # 2 MiB, after the peak
        return c

    peak = peak_tensor_bytes(work, torch.device("cpu"))
    assert 8 * 2**20 <= peak < 8 * 2**20 + 2**16
    assert kept.sum() == 2**20
