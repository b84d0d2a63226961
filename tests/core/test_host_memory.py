"""give_back_freed_memory returns the pages glibc keeps after a run of mid-size blocks is freed behind one that
stays: the resident size drops by most of what was freed. The allocations run in a fresh interpreter: glibc's mmap
threshold moves with what the process freed before, so inside a test session earlier tests decide where the blocks
come from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MIB = 2**20

PROBE = """
import json, os, torch
from qtool.core.host_memory import give_back_freed_memory

def resident_bytes():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

if not give_back_freed_memory():
    print(json.dumps({"glibc": False}))
    raise SystemExit
MIB = 2**20
# a freed mapped block raises glibc's mmap threshold above its size: the blocks below then come from the heap
torch.ones(8 * MIB // 4).sum()
blocks = [torch.ones(6 * MIB // 4) for _ in range(40)]  # 240 MiB, each page touched
keeper = torch.ones(MIB // 4)  # allocated last: the heap's top stays in use, so free() alone cannot shrink it
del blocks
kept = resident_bytes()
given_back = give_back_freed_memory()
after = resident_bytes()
print(json.dumps({"glibc": True, "kept": kept, "after": after, "given_back": given_back,
                  "keeper": float(keeper.sum())}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident size from /proc")
def test_freed_blocks_leave_the_resident_size():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    if not probe["glibc"]:
        pytest.skip("the C library is not glibc")
    assert probe["given_back"]
    assert probe["kept"] - probe["after"] > 150 * MIB, probe
    assert probe["keeper"] == MIB // 4
