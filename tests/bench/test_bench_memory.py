import pytest
import torch

from bmojo.bench.memory import allocation_peak, peak_bytes

MB = 1_000_000


def test_allocation_peak_is_the_maximum_running_sum_in_time_order():
    events = [(3, -4), (1, 4), (2, 4), (4, 8), (5, -100)]  # out of order, and a free of older memory
    assert allocation_peak(events) == 12
    assert allocation_peak([(1, -5)]) == 0


def test_cpu_peak_counts_tensors_live_at_once_during_the_run_only():
    held_before = torch.zeros(MB // 4)  # 1 MB held before the run: not counted

    def run():
        a = torch.zeros(MB)  # 4 MB
        b = torch.zeros(MB)  # 8 MB live
        del a
        c = torch.zeros(2 * MB)  # 4 + 8 = 12 MB live: the peak
        del b, c

    peak = peak_bytes(run, torch.device("cpu"))
    assert 12 * MB <= peak < 12 * MB + 4096
    assert held_before.numel() == MB // 4


def test_other_devices_are_refused():
    with pytest.raises(ValueError, match="cpu and cuda devices only"):
        peak_bytes(lambda: None, torch.device("meta"))
