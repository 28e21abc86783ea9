"""The cost benchmark's live-memory meter: peak bytes of live tensors while a function runs."""

import torch

from merging.bench.perf import _peak_live_bytes


def test_peak_live_bytes_sees_live_tensors_not_freed_ones():
    mb = 2**20

    def one_at_a_time():
        for _ in range(5):  # five 4 MB tensors, each freed before the next: peak is one of them
            x = torch.ones(mb)
            x.add_(1)
            del x

    def all_alive():
        keep = [torch.ones(mb) for _ in range(5)]
        return keep

    a, b = _peak_live_bytes(one_at_a_time), _peak_live_bytes(all_alive)
    assert 4 * mb <= a < 9 * mb
    assert 20 * mb <= b < 26 * mb
