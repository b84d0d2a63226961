"""bench/quantize/live_tensors.py: the live bytes of the tensors a thread makes under the mode, against sizes
known by construction (fresh sizes each run): new storages count until freed, views and in-place results never,
tensors made before the mode or on another thread never, and temporaries inside an op count toward the peak."""

import gc
import random
import threading

import torch

from bench_scripts import load_bench_script


def test_counts_new_storages_until_they_are_freed():
    live_tensors = load_bench_script("quantize/live_tensors")
    n, m = random.randint(1000, 5000), random.randint(100, 900)
    before = torch.randn(m)
    with live_tensors.LiveTensorBytes() as live:
        a = torch.zeros(n)  # 4n bytes
        assert live.live == 4 * n
        view, t = a[1:], a.view(-1)
        a.add_(1.0)
        b = before[2:] * 1  # a view of an old tensor is not counted, its product is: 4 (m - 2) bytes
        assert live.live == 4 * n + 4 * (m - 2)
        del a
        gc.collect()
        assert live.live == 4 * n + 4 * (m - 2)  # the views keep the storage
        del view, t
        gc.collect()
        assert live.live == 4 * (m - 2)
        c = torch.ones(n, dtype=torch.float64)
        del c
        gc.collect()
        assert live.take_peak() == 4 * (m - 2) + 8 * n  # c came on top of b alone
        assert live.live == 4 * (m - 2)
        # isfinite's temporaries (an abs of the input's size among them) lift the peak above what it leaves
        big = torch.randn(n)
        start = live.take_peak()
        finite = torch.isfinite(big)
        assert live.take_peak() >= start + 4 * n + n and live.live == start + n  # the bool result stays
        elsewhere: list = []
        thread = threading.Thread(target=lambda: elsewhere.append(torch.zeros(n)))
        thread.start()
        thread.join()
        assert live.live == start + n  # another thread's tensor is not this run's
    del b, finite, big, before, elsewhere
