import torch

from hetpure_bench.peak_memory import PeakMemory, current_rss_bytes


def test_the_peak_covers_a_short_lived_allocation():
    before = current_rss_bytes()
    with PeakMemory("cpu", interval_s=0.001) as peak:
        big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        for _ in range(20):
            big.add_(1)
        del big
    assert peak.mib * 2**20 >= before + 48 * 2**20
    assert current_rss_bytes() < peak.peak_bytes
