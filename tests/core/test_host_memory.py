"""give_back_freed_memory returns the pages glibc keeps after a run of mid-size blocks is freed behind one that
stays: the resident size drops by most of what was freed."""

from __future__ import annotations

import os

import pytest
import torch

from qtool.core.host_memory import give_back_freed_memory

MIB = 2**20


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident size from /proc")
def test_freed_blocks_leave_the_resident_size():
    if not give_back_freed_memory():
        pytest.skip("the C library is not glibc")
    # a freed mapped block raises glibc's mmap threshold above its size: the blocks below then come from the heap
    torch.ones(8 * MIB // 4).sum()
    blocks = [torch.ones(6 * MIB // 4) for _ in range(40)]  # 240 MiB, each page touched
    keeper = torch.ones(MIB // 4)  # allocated last: the heap's top stays in use, so free() alone cannot shrink it
    before = resident_bytes()
    del blocks
    kept = resident_bytes()
    assert give_back_freed_memory()
    after = resident_bytes()
    assert kept - after > 150 * MIB, (before, kept, after)
    assert float(keeper.sum()) == MIB // 4
