"""The guard every Triton kernel test runs behind (tests/conftest.py sets TRITON_INTERPRET on a CPU-only machine
before any kernel module is imported)."""

import pytest
from kernel_env import DEVICE


@pytest.fixture
def kernels_can_run():
    """Fails a test whose kernels could not run here: on a CPU they must have been built by the interpreter."""
    from qtool.kernels import exl2_triton, gptq_gemm_triton

    assert DEVICE == "cuda" or (gptq_gemm_triton.triton_interpreted() and exl2_triton.triton_interpreted()), (
        "qtool.kernels were imported before TRITON_INTERPRET=1 was set; on a CPU-only machine set it in "
        "tests/conftest.py or the environment"
    )
