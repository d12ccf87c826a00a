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

// Enqueues the two passes on `stream`; the result lands in *out (device
// memory). partials holds kReduceMaxBlocks doubles; calls in one stream may
// share it (each waits for the one before).
template <class T>
void sum_squares(cudaStream_t stream, DeviceView<const T> x, double* partials, double* out) {
  if (x.rows == 0 || x.cols == 0) {
    LORA_CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(double), stream));
    return;
  }
  const int blocks = static_cast<int>(std::clamp<std::int64_t>(x.rows, 1, kReduceMaxBlocks));
  sum_squares_partial_kernel<T><<<blocks, kReduceThreads, 0, stream>>>(x, partials);
  LORA_CUDA_CHECK_LAUNCH();
  sum_partials_kernel<><<<1, kReduceThreads, 0, stream>>>(partials, blocks, out);
  LORA_CUDA_CHECK_LAUNCH();
}

// out[0, j] = alpha sum_i a[i, j] b[i, j] + beta out[0, j], in double.
// Block: 32 columns x 8 lanes of rows; lane t takes rows t, t + 8, ..., then
// the 8 partial sums of a column are added in lane order (deterministic).
inline constexpr int kDotsColumns = 32, kDotsLanes = 8;
template <class T, class Tout>
__global__ void column_dots_kernel(double alpha, DeviceView<const T> a, DeviceView<const T> b, double beta,
                                   DeviceView<Tout> out) {
  __shared__ double partial[kDotsLanes][kDotsColumns];
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * kDotsColumns + threadIdx.x;
  double sum = 0.0;
  if (j < a.cols) {
    for (std::int64_t i = threadIdx.y; i < a.rows; i += kDotsLanes)
      sum += value_cast<double>(a(i, j)) * value_cast<double>(b(i, j));
  }
  partial[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y != 0 || j >= a.cols) return;
  for (int t = 1; t < kDotsLanes; ++t) sum += partial[t][threadIdx.x];
  const double kept = beta == 0.0 ? 0.0 : beta * value_cast<double>(out(0, j));
  out(0, j) = value_cast<Tout>(alpha * sum + kept);
}

// out[0, i] = alpha sum_j a[i, j] b[i, j] + beta out[0, i], in double: one
// warp per row (8 rows per block), a fixed shuffle tree.
template <class T, class Tout>
__global__ void row_dots_kernel(double alpha, DeviceView<const T> a, DeviceView<const T> b, double beta,
                                DeviceView<Tout> out) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kDotsLanes + threadIdx.y;
  if (i >= a.rows) return;  // the whole warp leaves together
  double sum = 0.0;
  for (std::int64_t j = threadIdx.x; j < a.cols; j += 32)
    sum += value_cast<double>(a(i, j)) * value_cast<double>(b(i, j));
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
  if (threadIdx.x != 0) return;
  const double kept = beta == 0.0 ? 0.0 : beta * value_cast<double>(out(0, i));
  out(0, i) = value_cast<Tout>(alpha * sum + kept);
}

template <class T, class Tout>
void column_dots(cudaStream_t stream, double alpha, DeviceView<const T> a, DeviceView<const T> b, double beta,
                 DeviceView<Tout> out) {
  if (a.cols == 0) return;
  const std::int64_t blocks = (a.cols + kDotsColumns - 1) / kDotsColumns;
  LORA_CHECK(blocks <= std::int64_t{2147483647}, "column_dots: " << a.cols << " columns is too many");
  column_dots_kernel<T, Tout><<<static_cast<unsigned>(blocks), dim3(kDotsColumns, kDotsLanes), 0, stream>>>(
      alpha, a, b, beta, out);
  LORA_CUDA_CHECK_LAUNCH();
}

template <class T, class Tout>
void row_dots(cudaStream_t stream, double alpha, DeviceView<const T> a, DeviceView<const T> b, double beta,
              DeviceView<Tout> out) {
  if (a.rows == 0) return;
  const std::int64_t blocks = (a.rows + kDotsLanes - 1) / kDotsLanes;
  LORA_CHECK(blocks <= std::int64_t{2147483647}, "row_dots: " << a.rows << " rows is too many");
  row_dots_kernel<T, Tout><<<static_cast<unsigned>(blocks), dim3(32, kDotsLanes), 0, stream>>>(alpha, a, b, beta, out);
  LORA_CUDA_CHECK_LAUNCH();
}

}  // namespace lora::cuda::kernels
