"""Every GPTQ Triton kernel compiles for Hopper (sm_90) on this machine, GPU or not, and the weight-left kernel
gets wgmma, the instruction it was built around. The interpreter that runs the numerical tests on a CPU accepts
code the compiler rejects, so without this a kernel could pass CI and fail on its first GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("sm90_compile_script.py")


@pytest.fixture(scope="module")
def compiled_kernels():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_every_gptq_kernel_compiles_for_sm90(compiled_kernels):
    assert len(compiled_kernels) >= 9
    failed = [f"{r['kernel']}: {r.get('error')}" for r in compiled_kernels if not r["ok"]]
    assert not failed, "\n".join(failed)


def test_weight_left_kernel_uses_wgmma_on_hopper(compiled_kernels):
    left = [r for r in compiled_kernels if r["kernel"].startswith("left")]
    assert left and all(r["wgmma"] > 0 and r["mma_sync"] == 0 for r in left), left


def test_denormal_gemv_keeps_subnormal_inputs(compiled_kernels):
    """The denormal unpacking multiplies subnormal codes: no flush-to-zero arithmetic may be emitted."""
    denormal = [r for r in compiled_kernels if "denormal" in r["kernel"]]
    assert len(denormal) == 7 and not any(r["flushes_subnormals"] for r in denormal), denormal
