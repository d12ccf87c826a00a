// sum_ij x_ij^2 in double, in two deterministic passes: per-block partial sums
// (block b takes rows b, b + grid, ...), then one block adds the partials in a
// fixed order. The grid depends only on the shape, so the same input gives the
// same bits on every run.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "lora/cuda/backend.hpp"  // kReduceMaxBlocks
#include "lora/cuda/check.cuh"
#include "lora/cuda/kernels/elementwise.cuh"

namespace lora::cuda::kernels {

inline constexpr int kReduceThreads = 256;
// kReduceMaxBlocks is in cuda/backend.hpp: the Context allocates the scratch.

// The sum of `value` over the block, valid in thread 0. blockDim.x == kReduceThreads.
__device__ inline double block_sum(double value) {
  __shared__ double warp_sums[kReduceThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  value = 0.0;
  if (warp == 0) {
    value = lane < kReduceThreads / 32 ? warp_sums[lane] : 0.0;
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;
}

// partials[b] = sum over rows i = b, b + gridDim.x, ... of sum_j double(x[i, j])^2
template <class T>
__global__ void sum_squares_partial_kernel(DeviceView<const T> x, double* partials) {
  double sum = 0.0;
  for (std::int64_t i = blockIdx.x; i < x.rows; i += gridDim.x) {
    for (std::int64_t j = threadIdx.x; j < x.cols; j += blockDim.x) {
      const double v = value_cast<double>(x(i, j));
      sum += v * v;
    }
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

// *out = sum_b partials[b]                      one block (a template only to live in a header)
template <int kThreads = kReduceThreads>
__global__ void sum_partials_kernel(const double* partials, int count, double* out) {
  double sum = 0.0;
  for (int b = threadIdx.x; b < count; b += blockDim.x) sum += partials[b];
  sum = block_sum(sum);
  if (threadIdx.x == 0) *out = sum;
}

// Enqueues the two passes on `stream`; the result lands in scratch[kReduceMaxBlocks].
// scratch holds kReduceMaxBlocks + 1 doubles.
template <class T>
void sum_squares(cudaStream_t stream, DeviceView<const T> x, double* scratch) {
  const int blocks = static_cast<int>(std::clamp<std::int64_t>(x.rows, 1, kReduceMaxBlocks));
  sum_squares_partial_kernel<T><<<blocks, kReduceThreads, 0, stream>>>(x, scratch);
  LORA_CUDA_CHECK_LAUNCH();
  sum_partials_kernel<><<<1, kReduceThreads, 0, stream>>>(scratch, blocks, scratch + kReduceMaxBlocks);
  LORA_CUDA_CHECK_LAUNCH();
}

}  // namespace lora::cuda::kernels
