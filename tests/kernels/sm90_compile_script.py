"""Compiles the GPTQ Triton kernels for sm_90 (Hopper) without a GPU: Triton's compiler and ptxas run on the CPU.
The interpreter runs the kernels' Python directly and accepts code the compiler rejects (e.g. returns of different
shapes under a constexpr branch), so the CPU test suite runs this in a fresh process (TRITON_INTERPRET unset).
Prints one JSON line per kernel: name, whether it compiled, and the PTX instruction families that matter."""

import json
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from qtool.kernels.gptq_gemm_left_triton import gptq_gemm_left_kernel  # noqa: E402
from qtool.kernels.gptq_gemm_triton import gptq_dequant_kernel, gptq_gemm_kernel  # noqa: E402
from qtool.kernels.gptq_dequant_triton import gptq_checkpoint_dequant_kernel  # noqa: E402
from qtool.kernels.gptq_gemv_triton import gptq_gemv_kernel, gptq_gemv_rows_kernel  # noqa: E402

POINTER_TYPES = {"x_ptr": "*bf16", "qweight_ptr": "*i32", "scales_ptr": "*fp16", "zeros_ptr": "*u8", "perm_ptr": "*i32",
                 "bias_ptr": "*fp16", "out_ptr": "*bf16", "ws_ptr": "*fp32", "counter_ptr": "*i32", "g_idx_ptr": "*i32"}
COMMON = dict(HAS_PERM=True, HAS_ZEROS=True, HAS_BIAS=True, FRAGMENT=False)
LEFT = dict(X_IN_BOUNDS=False, PACKED_ASM=True, STAGED_WORDS=False, SCALE_AHEAD=False, STREAM_K=False)  # act order: x gathered with masks
TUNED_FEED = dict(PACKED_ASM=True, STAGED_WORDS=False, SCALE_AHEAD=False, STREAM_K=False)
FLOAT16 = {"x_ptr": "*fp16", "out_ptr": "*fp16"}
FRAGMENT = dict(COMMON, FRAGMENT=True)
CASES = [  # (name, kernel, constexprs, num_warps, num_stages[, pointer types other than POINTER_TYPES])
    ("gemv denormal 4-bit", gptq_gemv_kernel, dict(BITS=4, UNITS=4, BLOCK_N=1024, SPLIT_K=4, EVEN_N=True, EVEN_UNITS=True,
                                                   ROW_SUM_EACH_TILE=True, PREFETCH=True, DENORMAL=True, ROWS=1, **FRAGMENT), 4, 1),
    ("gemv two rows denormal 4-bit", gptq_gemv_kernel, dict(BITS=4, UNITS=4, BLOCK_N=1024, SPLIT_K=4, EVEN_N=True,
                                                            EVEN_UNITS=True, ROW_SUM_EACH_TILE=True, PREFETCH=True,
                                                            DENORMAL=True, ROWS=2, **COMMON), 4, 1),
    ("gemv denormal 2-bit", gptq_gemv_kernel, dict(BITS=2, UNITS=2, BLOCK_N=256, SPLIT_K=1, EVEN_N=False, EVEN_UNITS=False,
                                                   ROW_SUM_EACH_TILE=False, PREFETCH=False, DENORMAL=True, ROWS=1, **COMMON), 4, 1),
    ("gemv 4-bit", gptq_gemv_kernel, dict(BITS=4, UNITS=4, BLOCK_N=1024, SPLIT_K=4, EVEN_N=True, EVEN_UNITS=True,
                                          ROW_SUM_EACH_TILE=True, PREFETCH=True, DENORMAL=False, ROWS=1, **COMMON), 4, 1),
    ("gemv 3-bit", gptq_gemv_kernel, dict(BITS=3, UNITS=1, BLOCK_N=128, SPLIT_K=1, EVEN_N=False, EVEN_UNITS=False,
                                          ROW_SUM_EACH_TILE=False, PREFETCH=False, DENORMAL=False, ROWS=2, **COMMON), 4, 1),
    ("gemv rows denormal 8-bit", gptq_gemv_rows_kernel, dict(BITS=8, UNITS=4, BLOCK_N=256, SPLIT_K=2, ROWS=4, EVEN_N=True,
                                                             EVEN_UNITS=True, ROW_SUM_EACH_TILE=True, DENORMAL=True, **COMMON), 4, 1),
    ("gemm magic 4-bit", gptq_gemm_kernel, dict(BITS=4, BM=16, BN=128, BK=128, GROUP_M=8, SPLIT_K=2, MODE=0, UNPACK=1,
                                                IS_BF16=True, DOT_IN_F32=False, EVEN=True, **FRAGMENT), 4, 2),
    ("gemm dequant 3-bit", gptq_gemm_kernel, dict(BITS=3, BM=128, BN=128, BK=64, GROUP_M=8, SPLIT_K=1, MODE=1, UNPACK=0,
                                                  IS_BF16=True, DOT_IN_F32=False, EVEN=False, **COMMON), 8, 3),
    ("dequantize 4-bit", gptq_dequant_kernel, dict(BITS=4, BK=64, BN=256, UNPACK=1, HAS_PERM=True, HAS_ZEROS=True,
                                                     FRAGMENT=True), 8, 1),
    ("left pairs 4-bit", gptq_gemm_left_kernel, dict(BITS=4, BM=16, BN=128, BK=128, SPLIT_K=2, MODE=0, IS_BF16=True,
                                                     DOT_IN_F32=False, EVEN_N=True, EVEN_K=True, TILES_PER_GROUP=1,
                                                     **COMMON, **LEFT), 4, 3),
    ("left dequant 8-bit", gptq_gemm_left_kernel, dict(BITS=8, BM=64, BN=128, BK=128, SPLIT_K=1, MODE=1, IS_BF16=True,
                                                       DOT_IN_F32=False, EVEN_N=False, EVEN_K=False, TILES_PER_GROUP=3,
                                                       **COMMON, **LEFT), 8, 3),
    ("left dequant 2-bit", gptq_gemm_left_kernel, dict(BITS=2, BM=16, BN=64, BK=128, SPLIT_K=4, MODE=1, IS_BF16=True,
                                                       DOT_IN_F32=False, EVEN_N=True, EVEN_K=True, TILES_PER_GROUP=1,
                                                       **COMMON, **LEFT), 4, 4),
    ("left denormal 4-bit", gptq_gemm_left_kernel, dict(BITS=4, BM=256, BN=64, BK=64, SPLIT_K=1, MODE=2, IS_BF16=True,
                                                        DOT_IN_F32=False, EVEN_N=True, EVEN_K=True, TILES_PER_GROUP=2,
                                                        **COMMON, **LEFT), 4, 3),
    ("left fragment denormal 4-bit", gptq_gemm_left_kernel, dict(BITS=4, BM=16, BN=64, BK=128, SPLIT_K=2, MODE=2,
                                                                 IS_BF16=True, DOT_IN_F32=False, EVEN_N=True, EVEN_K=True,
                                                                 TILES_PER_GROUP=1, **FRAGMENT, **LEFT), 4, 4),
    ("left fragment dequant 4-bit", gptq_gemm_left_kernel, dict(BITS=4, BM=128, BN=128, BK=64, SPLIT_K=1, MODE=1,
                                                                IS_BF16=True, DOT_IN_F32=False, EVEN_N=False, EVEN_K=True,
                                                                TILES_PER_GROUP=2, **FRAGMENT, **LEFT), 8, 3),
    ("left fragment pairs 4-bit", gptq_gemm_left_kernel, dict(BITS=4, BM=16, BN=64, BK=64, SPLIT_K=1, MODE=0,
                                                              IS_BF16=True, DOT_IN_F32=False, EVEN_N=True, EVEN_K=True,
                                                              TILES_PER_GROUP=2, **FRAGMENT, **LEFT), 4, 3),
    ("left fragment packed 4-bit", gptq_gemm_left_kernel, dict(BITS=4, BM=16, BN=64, BK=128, SPLIT_K=2, MODE=3,
                                                               IS_BF16=True, DOT_IN_F32=False, EVEN_N=True, EVEN_K=True,
                                                               TILES_PER_GROUP=1, **FRAGMENT, **LEFT), 4, 4),
    ("left fragment packed 4-bit float16", gptq_gemm_left_kernel, dict(BITS=4, BM=32, BN=64, BK=64, SPLIT_K=1, MODE=3,
                                                                       IS_BF16=False, DOT_IN_F32=False, EVEN_N=False,
                                                                       EVEN_K=False, TILES_PER_GROUP=2, **FRAGMENT,
                                                                       **LEFT), 4, 3, FLOAT16),
    ("left denormal 2-bit", gptq_gemm_left_kernel, dict(BITS=2, BM=16, BN=64, BK=128, SPLIT_K=4, MODE=2, IS_BF16=True,
                                                        DOT_IN_F32=False, EVEN_N=False, EVEN_K=False, TILES_PER_GROUP=1,
                                                        **COMMON, **LEFT), 4, 4),
    # as the JIT specializes them on the GPU (pointers and layer sizes divisible by 16): the tiles the tuner picks at
    # M = 64..256, where ptxas serialized the wgmma loop until the K loop lost its zero-trip path
    ("left tuned fragment denormal 4-bit", gptq_gemm_left_kernel, dict(BITS=4, BM=64, BN=128, BK=128, SPLIT_K=2, MODE=2,
                                                                       IS_BF16=True, DOT_IN_F32=False, EVEN_N=True,
                                                                       EVEN_K=True, TILES_PER_GROUP=1, HAS_PERM=False,
                                                                       HAS_ZEROS=True, HAS_BIAS=False, FRAGMENT=True,
                                                                       X_IN_BOUNDS=True, **TUNED_FEED),
     8, 3),
    ("left tuned fragment packed 4-bit", gptq_gemm_left_kernel, dict(BITS=4, BM=64, BN=128, BK=128, SPLIT_K=4, MODE=3,
                                                                     IS_BF16=True, DOT_IN_F32=False, EVEN_N=True,
                                                                     EVEN_K=True, TILES_PER_GROUP=1, HAS_PERM=False,
                                                                     HAS_ZEROS=True, HAS_BIAS=False, FRAGMENT=True,
                                                                     X_IN_BOUNDS=True,
                                                                     **dict(TUNED_FEED, STAGED_WORDS=True,
                                                                            SCALE_AHEAD=True)),
     8, 3),
    ("left tuned denormal 4-bit", gptq_gemm_left_kernel, dict(BITS=4, BM=256, BN=128, BK=64, SPLIT_K=1, MODE=2,
                                                              IS_BF16=True, DOT_IN_F32=False, EVEN_N=True, EVEN_K=True,
                                                              TILES_PER_GROUP=2, HAS_PERM=False, HAS_ZEROS=True,
                                                              HAS_BIAS=False, FRAGMENT=False, X_IN_BOUNDS=True,
                                                              **TUNED_FEED),
     8, 4),
    # stream-K: the K loop inside the loop over a program's tiles must not be serialized either
    ("left tuned stream-K denormal 4-bit", gptq_gemm_left_kernel, dict(BITS=4, BM=128, BN=128, BK=128, SPLIT_K=1,
                                                                       MODE=2, IS_BF16=True, DOT_IN_F32=False,
                                                                       EVEN_N=True, EVEN_K=True, TILES_PER_GROUP=1,
                                                                       HAS_PERM=False, HAS_ZEROS=True, HAS_BIAS=False,
                                                                       FRAGMENT=True, X_IN_BOUNDS=True,
                                                                       **dict(TUNED_FEED, STREAM_K=True)),
     8, 3),
    # the dequant backend's kernel on the checkpoint's layout, as the JIT specializes it for 7B's layers
    ("tuned checkpoint dequantize 4-bit", gptq_checkpoint_dequant_kernel, dict(BITS=4, BK=64, BN=256, GROUP_PER_TILE=True,
                                                                               ROUND_BY_HAND=False), 8, 1),
    ("tuned checkpoint dequantize 3-bit act order", gptq_checkpoint_dequant_kernel, dict(BITS=3, BK=64, BN=256,
                                                                                         GROUP_PER_TILE=False,
                                                                                         ROUND_BY_HAND=False), 8, 1),
    ("left denormal 8-bit", gptq_gemm_left_kernel, dict(BITS=8, BM=32, BN=128, BK=64, SPLIT_K=1, MODE=2, IS_BF16=True,
                                                        DOT_IN_F32=False, EVEN_N=True, EVEN_K=True, TILES_PER_GROUP=1 << 24,
                                                        **COMMON, **LEFT), 8, 3),
]


def signature(kernel, constexprs: dict, pointer_types: dict) -> dict:
    missing = [p.name for p in kernel.params if p.is_constexpr and p.name not in constexprs]
    if missing:  # it would compile as a runtime argument, branches and all, and not be the kernel the GPU runs
        raise ValueError(f"{kernel.fn.__name__}: no value for constexpr {missing}")
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointer_types:
            sig[name] = pointer_types[name]
        else:
            sig[name] = "fp32" if name == "zero_const" else "i32"
    return sig


def divisible_by_16(kernel) -> dict:
    """The JIT's specialization for a layer whose sizes are multiples of 16: every pointer, the layer sizes and the
    row strides are known to be divisible by 16."""
    names = set(POINTER_TYPES) | {"N", "K_X", "num_rows", "stride_xm", "stride_om"}
    return {(index,): [["tt.divisibility", 16]] for index, name in enumerate(kernel.arg_names) if name in names}


def wgmma_serialized(ptx: str) -> bool:
    """Whether ptxas, run as Triton runs it for sm_90a, serializes the kernel's wgmma instructions (advisory C7515:
    each MMA waited for before the next starts, so nothing overlaps the unpacking of the next tile)."""
    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        done = subprocess.run([ptxas, "-arch=sm_90a", "-v", source, "-o", os.path.join(folder, "kernel.cubin")],
                              capture_output=True, text=True, check=True)
    return "C7515" in done.stderr or "wgmma.mma_async instructions are serialized" in done.stderr


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    for name, kernel, constexprs, warps, stages, *pointers in CASES:
        record = {"kernel": name}
        try:
            pointer_types = dict(POINTER_TYPES, **(pointers[0] if pointers else {}))
            source = ASTSource(kernel, signature(kernel, constexprs, pointer_types), constexprs=constexprs,
                               attrs=divisible_by_16(kernel) if "tuned" in name else None)
            compiled = triton.compile(source, target=target, options={"num_warps": warps, "num_stages": stages})
            ptx = compiled.asm["ptx"]
            record.update(ok=bool(compiled.asm["cubin"]), wgmma=ptx.count("wgmma.mma_async"),
                          mma_sync=ptx.count("mma.sync"), ldmatrix_trans=ptx.count("ldmatrix.sync.aligned.m8n8.x4.trans"),
                          local_memory=".local" in ptx, wgmma_serialized=wgmma_serialized(ptx),
                          flushes_subnormals=".ftz" in ptx, vector_stores=ptx.count("st.global.v4"),
                          paired_fma=ptx.count("fma.rn.bf16x2") + ptx.count("fma.rn.f16x2"))
        except Exception as exc:  # report and go on: the test names every kernel that failed
            record.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[-400:]}")
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
