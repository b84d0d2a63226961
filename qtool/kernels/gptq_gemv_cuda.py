"""The CUDA GEMV for 4-bit GPTQ layers (gptq_gemv_cuda.cu), built on first use through torch's cpp_extension into
qtool's cache root, as ExLlamaV2 builds its extension. A machine without a compiler (or without CUDA) keeps the
Triton GEMV: the build is tried once per backend, and its failure is one log line, never an error. The torch
reference is the Triton kernels' one (gptq_gemm_triton.gptq_dequantize + matmul): both read the same layout."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from qtool.core.cache_root import cache_root
from qtool.kernels.repack import GptqComputeWeight

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gptq_gemv_cuda.cu")
CUDA_GEMV_BITS = 4
CUDA_GEMV_MAX_ROWS = 4
BLOCK_ROWS = 32  # compute rows per block of 4 packed words
TILE_N = 128  # output columns per thread block
SHARED_LIMIT = 96 * 1024  # staging bytes a launch may ask for (Hopper allows 227 KB; more costs occupancy)


@dataclass(frozen=True)
class CudaGemvConfig:
    """Launch parameters: split_k thread blocks along K per 128-column tile, warps_k warps per block along K."""

    split_k: int
    warps_k: int = 4


@dataclass
class CudaGemv:
    """The built extension, or why there is none."""

    module: ModuleType | None
    problem: str | None = None


def build_directory() -> Path | None:
    """Where the extension is built: per source, torch and CUDA version, under qtool's cache root."""
    root = cache_root()
    if root is None:
        return None
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    return root / "cuda_extensions" / f"gptq_gemv-{torch.__version__}-cuda{torch.version.cuda}-{digest}"


def load_cuda_gemv(device: torch.device) -> CudaGemv:
    """Build (once per machine) and load the CUDA GEMV for `device`; CudaGemv(None, reason) where it cannot run.
    QTOOL_CUDA_KERNELS=off skips it."""
    if os.environ.get("QTOOL_CUDA_KERNELS", "").strip().lower() in ("0", "off", "no", "false"):
        return CudaGemv(None, "QTOOL_CUDA_KERNELS=off")
    if device.type != "cuda" or not torch.cuda.is_available() or torch.version.cuda is None:
        return CudaGemv(None, "needs a CUDA device and a CUDA build of torch")
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return CudaGemv(None, "no CUDA compiler (nvcc) found: set CUDA_HOME")
    directory = build_directory()
    if directory is None:
        return CudaGemv(None, "QTOOL_CACHE_DIR=off leaves nowhere to build it")
    directory.mkdir(parents=True, exist_ok=True)
    if not any(directory.glob("*.so")):
        logger.warning("building qtool's CUDA GEMV once into %s (about a minute)", directory)
    try:
        module = cpp_extension.load(
            name="qtool_gptq_gemv_cuda", sources=[str(SOURCE)], build_directory=str(directory),
            # no --use_fast_math: it flushes subnormals, and the kernel reads codes as subnormal floats
            extra_cuda_cflags=["-O3", "-lineinfo"], verbose=False,
        )
    except Exception as exc:  # a compiler or toolchain failure of any kind: the Triton GEMV serves
        first = str(exc).strip().splitlines()
        return CudaGemv(None, f"build failed: {first[0] if first else type(exc).__name__}")
    return CudaGemv(module)


def cuda_gemv_problem(weight: GptqComputeWeight, m: int, dtype: torch.dtype) -> str | None:
    """Why the CUDA GEMV cannot serve this layer and call, or None."""
    if weight.bits != CUDA_GEMV_BITS:
        return f"{weight.bits}-bit layer (the CUDA GEMV is {CUDA_GEMV_BITS}-bit)"
    if not 1 <= m <= CUDA_GEMV_MAX_ROWS:
        return f"M = {m} (the CUDA GEMV serves 1..{CUDA_GEMV_MAX_ROWS})"
    if dtype not in (torch.float16, torch.bfloat16) or weight.scales.dtype not in (torch.float16, torch.bfloat16):
        return "needs float16/bfloat16 activations and scales"
    if weight.out_features % 4 or weight.group_rows % BLOCK_ROWS or weight.k_rows % 8:
        return "needs N % 4 == 0 and groups of whole 32-row blocks"
    tensors = [weight.qweight, weight.scales] + ([weight.zeros] if weight.zeros is not None else [])
    if any(not t.is_contiguous() or t.data_ptr() % 16 for t in tensors):
        return "needs contiguous, 16-byte aligned weight tensors"
    return None


def blocks_per_split(weight: GptqComputeWeight, m: int, split_k: int) -> int:
    """32-row blocks per split for `split_k` splits, lowered (more splits) until the staged x fits SHARED_LIMIT,
    then evened out so no split is much shorter than the others."""
    total = -(-weight.k_rows // BLOCK_ROWS)
    per_split = -(-total // max(1, split_k))
    most = max(1, SHARED_LIMIT // (m * (BLOCK_ROWS + 1) * 4))
    per_split = min(per_split, most)
    splits = -(-total // per_split)
    return -(-total // splits)


def split_launch(weight: GptqComputeWeight, m: int, config: CudaGemvConfig) -> tuple[int, int]:
    """(blocks per split, splits) of one launch."""
    per_split = blocks_per_split(weight, m, config.split_k)
    total = -(-weight.k_rows // BLOCK_ROWS)
    return per_split, -(-total // per_split)


def gptq_gemv_cuda(gemv: CudaGemv, x: torch.Tensor, weight: GptqComputeWeight, config: CudaGemvConfig,
                   out: torch.Tensor, workspace: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """out[M, N] = x[M, K] @ W^T (+ bias) through the CUDA GEMV. workspace float32 [>= M*N] and counters int32
    [>= N/128] must be zero on entry when the launch splits K; they are zero again on return."""
    if gemv.module is None:
        raise ValueError(f"the CUDA GEMV is not available: {gemv.problem}")
    if x.stride(1) != 1:
        x = x.contiguous()
    per_split, _ = split_launch(weight, x.shape[0], config)
    bias = weight.bias
    if bias is not None and bias.dtype != x.dtype:  # the kernel adds a bias of x's dtype (biased layers are few)
        bias = bias.to(x.dtype)
    gemv.module.gptq_gemv4(x, weight.qweight, weight.scales, weight.zeros, weight.perm, bias, out, workspace,
                           counters, weight.k_rows, weight.group_rows, weight.zero_const, per_split, config.warps_k,
                           weight.fragment_order)
    return out
