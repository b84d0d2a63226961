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


def test_wgmma_loops_are_not_serialized(compiled_kernels):
    """ptxas serializes a kernel's wgmma instructions when it cannot prove the accumulator untouched while they run
    (C7515); the K loops must give it that proof (split_tile_range), or the MMA of one tile never overlaps the
    unpacking of the next."""
    with_wgmma = [r for r in compiled_kernels if r.get("wgmma")]
    assert len(with_wgmma) >= 10 and any("tuned" in r["kernel"] for r in with_wgmma)
    serialized = [r["kernel"] for r in with_wgmma if r["wgmma_serialized"]]
    assert not serialized, serialized


def test_denormal_gemv_keeps_subnormal_inputs(compiled_kernels):
    """The denormal unpacking multiplies subnormal codes: no flush-to-zero arithmetic may be emitted."""
    denormal = [r for r in compiled_kernels if "denormal" in r["kernel"]]
    assert len(denormal) >= 8 and not any(r["flushes_subnormals"] for r in denormal), denormal


def test_fragment_order_tiles_skip_the_shared_memory_round_trip(compiled_kernels):
    """What fragment order is for: the unpacked 4-bit tile is already in wgmma's A-fragment layout, so the kernel
    has no transposing ldmatrix (the plain-order tile goes registers -> shared memory -> ldmatrix.trans on every K
    step to reach that layout)."""
    by_name = {r["kernel"]: r for r in compiled_kernels}
    fragment = [by_name["left fragment denormal 4-bit"], by_name["left fragment dequant 4-bit"],
                by_name["left fragment packed 4-bit"], by_name["left fragment packed 4-bit float16"]]
    assert all(r["ok"] and r["ldmatrix_trans"] == 0 for r in fragment), fragment
    assert by_name["left denormal 4-bit"]["ldmatrix_trans"] > 0


def test_packed_tiles_are_built_by_paired_fma_without_spilling(compiled_kernels):
    """LEFT_PACKED's GPU path: the inline PTX (an and-or and a paired 16-bit FMA per two codes) reaches the kernel
    for both 16-bit types, and the tile plus its per-tile product fit in registers."""
    packed = [r for r in compiled_kernels if "packed" in r["kernel"]]
    assert len(packed) == 3 and all(r["ok"] and r["paired_fma"] > 0 and not r["local_memory"] for r in packed), packed
    assert not any(r.get("paired_fma") for r in compiled_kernels if "packed" not in r["kernel"])


def test_checkpoint_dequantize_writes_whole_vectors(compiled_kernels):
    """The dequant backend's kernel is bound by its bf16 writes: they must be 16-byte stores, and nothing spilled."""
    dequant = [r for r in compiled_kernels if "checkpoint dequantize" in r["kernel"]]
    assert len(dequant) == 2 and all(r["ok"] and r["vector_stores"] > 0 and not r["local_memory"] for r in dequant), dequant
