// CUDA GEMV for 4-bit GPTQ layers in the compute layout (kernels/repack.py): y[M, N] = x[M, K] @ dequant(W)^T (+ bias)
// for M = 1..4, the decode case. Triton's GEMV reaches 28-67% of the read-only speed of its bytes on Llama-2 shapes
// (bench/RESULTS.md); this kernel keeps more bytes in flight: each thread loads four columns' words with one 16-byte
// load, two 32-row blocks ahead, and x is staged once per block in shared memory.
//
// Layout (repack.GptqComputeWeight): qweight int32 [k_rows / 8, N], word w of column n packs compute rows 8w..8w+7
// (in fragment order: inside each 32-row block, code j of word c is row 8 (j % 4) + 2c + j / 4); compute row r reads
// input column perm[r] (-1: padding, input 0) and belongs to group r / group_rows; a 32-row block never straddles
// two groups. Codes are read as float32 subnormals (one AND per code, as gptq_triton_common.code_as_denormal does)
// and x is staged pre-multiplied by the power of two that makes each product q * x * 2^-87 exact.
// Never build this with --use_fast_math: flushing subnormals to zero would zero every code.
//
// Grid: (ceil(N / 128), splits). Block: 32 lanes along N (4 columns each) x warps_k warps along K. A block reduces
// its warps in shared memory; with splits > 1 it adds its partial sums into the float32 workspace [M, N], and the
// last block of a column tile to arrive (atomic counter) writes the output and leaves workspace and counter zero.

#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

constexpr int kLanes = 32;
constexpr int kColumnsPerLane = 4;
constexpr int kTileN = kLanes * kColumnsPerLane;  // 128 output columns per block
constexpr int kBlockRows = 32;                     // compute rows of one block: 4 words of 8 codes
constexpr int kBlockWords = 4;
constexpr int kMaxRows = 4;
constexpr float kDenormalScale = 154742504910672534362390528.0f;  // 2^87

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The compute row held at position p of the packed codes (repack.fragment_rows).
__device__ __forceinline__ int compute_row(int p, bool fragment) {
  return fragment ? ((p & ~31) | ((p & 3) << 3) | (((p >> 3) & 3) << 1) | ((p >> 2) & 1)) : p;
}

// 2^(62 - offset), the factor that turns code j's subnormal into q * 2^-87. Codes 5..7 would reach the exponent
// bits, so they are read from the word shifted right by 12 and their offset is 12 less.
__device__ __forceinline__ float x_factor(int j) {
  const int offset = j < 5 ? 4 * j : 4 * j - 12;
  return __int_as_float((127 + 62 - offset) << 23);
}

// Sum over the 8 codes of one word of code_j (as subnormal) * xs[j] (x pre-scaled by x_factor(j)).
__device__ __forceinline__ float word_dot(uint32_t word, const float4& lo, const float4& hi, float acc) {
  const uint32_t high = word >> 12;
  acc = fmaf(__uint_as_float(word & 0x0000000Fu), lo.x, acc);
  acc = fmaf(__uint_as_float(word & 0x000000F0u), lo.y, acc);
  acc = fmaf(__uint_as_float(word & 0x00000F00u), lo.z, acc);
  acc = fmaf(__uint_as_float(word & 0x0000F000u), lo.w, acc);
  acc = fmaf(__uint_as_float(word & 0x000F0000u), hi.x, acc);
  acc = fmaf(__uint_as_float(high & 0x00000F00u), hi.y, acc);
  acc = fmaf(__uint_as_float(high & 0x0000F000u), hi.z, acc);
  acc = fmaf(__uint_as_float(high & 0x000F0000u), hi.w, acc);
  return acc;
}

template <typename S>
__device__ __forceinline__ void load_scales(const S* scales, long index, float out[4]) {
  const uint2 raw = *reinterpret_cast<const uint2*>(scales + index);  // 4 values of 2 bytes
  const S* v = reinterpret_cast<const S*>(&raw);
#pragma unroll
  for (int c = 0; c < 4; ++c) out[c] = to_float(v[c]);
}

template <typename T, typename S, int M>
__global__ void __launch_bounds__(256, M == 1 ? 4 : 2) gptq_gemv4_kernel(
    const T* __restrict__ x, const int* __restrict__ qweight, const S* __restrict__ scales,
    const uint8_t* __restrict__ zeros, const int* __restrict__ perm, const T* __restrict__ bias, T* __restrict__ out,
    float* __restrict__ workspace, int* __restrict__ counters, int N, int k_rows, int group_rows, float zero_const,
    int blocks_per_split, long stride_xm, long stride_om, bool fragment) {
  extern __shared__ float shared[];
  const int warps_k = blockDim.y;
  const int lane = threadIdx.x;
  const int ky = threadIdx.y;
  const int tid = ky * kLanes + lane;
  const int threads = warps_k * kLanes;
  const int total_blocks = (k_rows + kBlockRows - 1) / kBlockRows;
  const int first_block = blockIdx.y * blocks_per_split;
  const int split_blocks = min(blocks_per_split, total_blocks - first_block);
  const int split_rows = split_blocks * kBlockRows;
  const int num_words = k_rows / 8;
  float* xs = shared;                                   // [M][blocks_per_split * 32], pre-scaled, packed order
  float* xsum = shared + M * blocks_per_split * kBlockRows;  // [M][blocks_per_split]

  // Stage x: one warp covers one 32-row block (a permutation of its rows), so a warp sum is the block's x sum.
  for (int p = tid; p < ((split_rows + threads - 1) / threads) * threads; p += threads) {
    const bool inside = p < split_rows;
    const int position = first_block * kBlockRows + p;
    const int row = compute_row(position, fragment);
    int column = row;
    if (perm != nullptr && inside && row < k_rows) column = perm[row];
    const bool valid = inside && row < k_rows && column >= 0;
    const float factor = x_factor(p & 7);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float v = valid ? to_float(x[m * stride_xm + column]) : 0.0f;
      if (inside) xs[m * blocks_per_split * kBlockRows + p] = v * factor;
      float s = v;
#pragma unroll
      for (int delta = 16; delta > 0; delta >>= 1) s += __shfl_xor_sync(0xffffffffu, s, delta);
      if (inside && lane == 0) xsum[m * blocks_per_split + p / kBlockRows] = s;
    }
  }
  __syncthreads();

  const int col0 = blockIdx.x * kTileN + lane * kColumnsPerLane;
  const bool col_ok = col0 < N;
  float acc[M][kColumnsPerLane];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int c = 0; c < kColumnsPerLane; ++c) acc[m][c] = 0.0f;

  // One row of x: two blocks per iteration, the second block's 4 loads issued before the first block's math. More
  // rows keep one block per iteration: their accumulators and x reads already fill the registers.
  constexpr int kAhead = M == 1 ? 2 : 1;
#pragma unroll 1
  for (int b0 = ky; b0 < split_blocks; b0 += kAhead * warps_k) {
    int4 words[kAhead][kBlockWords];
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const int b = b0 + u * warps_k;
      const int word0 = (first_block + b) * kBlockWords;
#pragma unroll
      for (int w = 0; w < kBlockWords; ++w) {
        const bool ok = col_ok && b < split_blocks && word0 + w < num_words;
        words[u][w] = ok ? __ldg(reinterpret_cast<const int4*>(qweight + (long)(word0 + w) * N + col0))
                         : make_int4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const int b = b0 + u * warps_k;
      if (b >= split_blocks || !col_ok) break;
      const int group = (first_block + b) * kBlockRows / group_rows;
      float scale[4], zero[4];
      load_scales(scales, (long)group * N + col0, scale);
      if (zeros != nullptr) {
        const uint32_t z = *reinterpret_cast<const uint32_t*>(zeros + (long)group * N + col0);
#pragma unroll
        for (int c = 0; c < 4; ++c) zero[c] = float((z >> (8 * c)) & 0xFFu);
      } else {
#pragma unroll
        for (int c = 0; c < 4; ++c) zero[c] = zero_const;
      }
      // word by word, every row of x: a word's codes are masked once per row they meet (cheap) rather than kept
      // for all rows (which would hold 128 registers of codes)
      float dot[M][4];
#pragma unroll
      for (int m = 0; m < M; ++m)
#pragma unroll
        for (int c = 0; c < 4; ++c) dot[m][c] = 0.0f;
#pragma unroll
      for (int w = 0; w < kBlockWords; ++w) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const float* xw = xs + m * blocks_per_split * kBlockRows + b * kBlockRows + 8 * w;
          const float4 lo = *reinterpret_cast<const float4*>(xw);
          const float4 hi = *reinterpret_cast<const float4*>(xw + 4);
          dot[m][0] = word_dot(uint32_t(words[u][w].x), lo, hi, dot[m][0]);
          dot[m][1] = word_dot(uint32_t(words[u][w].y), lo, hi, dot[m][1]);
          dot[m][2] = word_dot(uint32_t(words[u][w].z), lo, hi, dot[m][2]);
          dot[m][3] = word_dot(uint32_t(words[u][w].w), lo, hi, dot[m][3]);
        }
      }
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float s = xsum[m * blocks_per_split + b];
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[m][c] += scale[c] * (kDenormalScale * dot[m][c] - zero[c] * s);
      }
    }
  }

  // Reduce the warps along K: reuse the staging area once every thread is past its reads.
  __syncthreads();
  float* red = shared;  // [warps_k][M][128]
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int c = 0; c < 4; ++c) red[(ky * M + m) * kTileN + lane * 4 + c] = acc[m][c];
  __syncthreads();

  const int splits = gridDim.y;
  __shared__ bool last_arrival;
  for (int i = tid; i < M * kTileN; i += threads) {
    const int m = i / kTileN, n = blockIdx.x * kTileN + i % kTileN;
    float total = 0.0f;
    for (int k = 0; k < warps_k; ++k) total += red[(k * M + m) * kTileN + i % kTileN];
    if (n >= N) continue;
    if (splits == 1) {
      if (bias != nullptr) total += to_float(bias[n]);
      out[m * stride_om + n] = from_float<T>(total);
    } else {
      atomicAdd(workspace + (long)m * N + n, total);
    }
  }
  if (splits == 1) return;
  __threadfence();  // this block's sums are visible before its arrival is counted
  __syncthreads();
  if (tid == 0) last_arrival = atomicAdd(counters + blockIdx.x, 1) == splits - 1;
  __syncthreads();
  if (!last_arrival) return;
  __threadfence();
  for (int i = tid; i < M * kTileN; i += threads) {
    const int m = i / kTileN, n = blockIdx.x * kTileN + i % kTileN;
    if (n >= N) continue;
    float total = atomicExch(workspace + (long)m * N + n, 0.0f);  // reads every block's adds, leaves zero
    if (bias != nullptr) total += to_float(bias[n]);
    out[m * stride_om + n] = from_float<T>(total);
  }
  if (tid == 0) counters[blockIdx.x] = 0;
}

template <typename T, typename S, int M>
void launch(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales, const uint8_t* zeros,
            const int* perm, const T* bias, torch::Tensor& out, torch::Tensor& workspace, torch::Tensor& counters,
            int k_rows, int group_rows, float zero_const, int blocks_per_split, int splits, int warps_k, bool fragment) {
  const int N = qweight.size(1);
  const dim3 grid((N + kTileN - 1) / kTileN, splits);
  const dim3 block(kLanes, warps_k);
  const size_t staging = sizeof(float) * M * blocks_per_split * (kBlockRows + 1);
  const size_t reduction = sizeof(float) * warps_k * M * kTileN;
  const size_t shared = staging > reduction ? staging : reduction;
  auto kernel = gptq_gemv4_kernel<T, S, M>;
  if (shared > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared)));
  }
  kernel<<<grid, block, shared, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(x.data_ptr()), qweight.data_ptr<int>(), reinterpret_cast<const S*>(scales.data_ptr()),
      zeros, perm, bias, reinterpret_cast<T*>(out.data_ptr()), workspace.data_ptr<float>(), counters.data_ptr<int>(),
      N, k_rows, group_rows, zero_const, blocks_per_split, x.stride(0), out.stride(0), fragment);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename S>
void launch_rows(int m, const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
                 const uint8_t* zeros, const int* perm, const T* bias, torch::Tensor& out, torch::Tensor& workspace,
                 torch::Tensor& counters, int k_rows, int group_rows, float zero_const, int blocks_per_split,
                 int splits, int warps_k, bool fragment) {
#define QTOOL_GEMV_ROWS(ROWS)                                                                                    \
  case ROWS:                                                                                                     \
    launch<T, S, ROWS>(x, qweight, scales, zeros, perm, bias, out, workspace, counters, k_rows, group_rows,      \
                       zero_const, blocks_per_split, splits, warps_k, fragment);                                 \
    break;
  switch (m) {
    QTOOL_GEMV_ROWS(1)
    QTOOL_GEMV_ROWS(2)
    QTOOL_GEMV_ROWS(3)
    QTOOL_GEMV_ROWS(4)
    default:
      TORCH_CHECK(false, "gptq_gemv4: M must be 1..", kMaxRows);
  }
#undef QTOOL_GEMV_ROWS
}

}  // namespace

void gptq_gemv4(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, c10::optional<torch::Tensor> zeros,
                c10::optional<torch::Tensor> perm, c10::optional<torch::Tensor> bias, torch::Tensor out,
                torch::Tensor workspace, torch::Tensor counters, int64_t k_rows, int64_t group_rows, double zero_const,
                int64_t blocks_per_split, int64_t warps_k, bool fragment) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1, "gptq_gemv4: x must be a CUDA [M, K] tensor, unit column stride");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, "gptq_gemv4: M must be 1..", kMaxRows);
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.is_contiguous(), "gptq_gemv4: qweight must be contiguous int32");
  TORCH_CHECK(qweight.size(1) % 4 == 0, "gptq_gemv4: N must be a multiple of 4");
  TORCH_CHECK(qweight.size(0) * 8 == k_rows, "gptq_gemv4: qweight rows do not match k_rows at 4 bits");
  TORCH_CHECK(group_rows % kBlockRows == 0, "gptq_gemv4: group_rows must be a multiple of 32");
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.stride(1) == 1, "gptq_gemv4: out must have x's dtype");
  TORCH_CHECK(scales.is_contiguous(), "gptq_gemv4: scales must be contiguous");
  TORCH_CHECK(warps_k >= 1 && warps_k <= 8, "gptq_gemv4: warps_k must be 1..8");
  const c10::cuda::CUDAGuard guard(x.device());
  const int total_blocks = int((k_rows + kBlockRows - 1) / kBlockRows);
  const int splits = (total_blocks + int(blocks_per_split) - 1) / int(blocks_per_split);
  if (splits > 1) {
    TORCH_CHECK(workspace.numel() >= x.size(0) * qweight.size(1), "gptq_gemv4: split-K workspace too small");
    TORCH_CHECK(counters.numel() >= (qweight.size(1) + kTileN - 1) / kTileN, "gptq_gemv4: too few counters");
  }
  const uint8_t* zeros_ptr = nullptr;
  if (zeros.has_value()) {
    TORCH_CHECK(zeros->scalar_type() == at::kByte && zeros->is_contiguous(), "gptq_gemv4: zeros must be contiguous uint8");
    zeros_ptr = zeros->data_ptr<uint8_t>();
  }
  const int* perm_ptr = nullptr;
  if (perm.has_value()) {
    TORCH_CHECK(perm->scalar_type() == at::kInt, "gptq_gemv4: perm must be int32");
    perm_ptr = perm->data_ptr<int>();
  }
  const int m = int(x.size(0));
  const float zero = float(zero_const);
#define QTOOL_GEMV_TYPES(T, S, TORCH_T)                                                                          \
  {                                                                                                              \
    const T* bias_ptr = nullptr;                                                                                 \
    if (bias.has_value()) {                                                                                      \
      TORCH_CHECK(bias->scalar_type() == TORCH_T, "gptq_gemv4: bias must have x's dtype");                      \
      bias_ptr = reinterpret_cast<const T*>(bias->data_ptr());                                                   \
    }                                                                                                            \
    launch_rows<T, S>(m, x, qweight, scales, zeros_ptr, perm_ptr, bias_ptr, out, workspace, counters,           \
                      int(k_rows), int(group_rows), zero, int(blocks_per_split), splits, int(warps_k), fragment); \
  }
  const bool half_x = x.scalar_type() == at::kHalf;
  TORCH_CHECK(half_x || x.scalar_type() == at::kBFloat16, "gptq_gemv4: x must be float16 or bfloat16");
  const bool half_s = scales.scalar_type() == at::kHalf;
  TORCH_CHECK(half_s || scales.scalar_type() == at::kBFloat16, "gptq_gemv4: scales must be float16 or bfloat16");
  if (half_x && half_s) QTOOL_GEMV_TYPES(__half, __half, at::kHalf)
  else if (half_x) QTOOL_GEMV_TYPES(__half, __nv_bfloat16, at::kHalf)
  else if (half_s) QTOOL_GEMV_TYPES(__nv_bfloat16, __half, at::kBFloat16)
  else QTOOL_GEMV_TYPES(__nv_bfloat16, __nv_bfloat16, at::kBFloat16)
#undef QTOOL_GEMV_TYPES
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("gptq_gemv4", &gptq_gemv4, "4-bit GPTQ GEMV (M = 1..4) on the compute layout");
}
