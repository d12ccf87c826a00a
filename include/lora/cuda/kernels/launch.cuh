// How the backend's elementwise kernels are launched: one generic kernel runs
// a functor op(i, j) on every element of a rows x cols matrix, with threads
// along the columns (coalesced in row-major memory) and grid-stride loops, so
// any shape, strided or not, is covered by a bounded grid.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "lora/cuda/check.cuh"

namespace lora::cuda::kernels {

inline constexpr unsigned kThreadsPerBlock = 256;
inline constexpr std::int64_t kMaxGridDim = 65535;  // grid.y's limit; grid.x uses it too

template <class Op>
__global__ void for_each_2d_kernel(std::int64_t rows, std::int64_t cols, Op op) {
  const std::int64_t row_step = static_cast<std::int64_t>(gridDim.y) * blockDim.y;
  const std::int64_t col_step = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; i < rows; i += row_step) {
    for (std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < cols; j += col_step) {
      op(i, j);
    }
  }
}

// Runs op(i, j) for 0 <= i < rows, 0 <= j < cols on `stream`. Blocks are
// 256 threads: as wide as the rows need (32..256), the rest stacked on rows.
template <class Op>
void for_each_2d(cudaStream_t stream, std::int64_t rows, std::int64_t cols, const Op& op) {
  if (rows <= 0 || cols <= 0) return;
  unsigned block_x = 32;
  while (block_x < kThreadsPerBlock && block_x < cols) block_x *= 2;
  const unsigned block_y = kThreadsPerBlock / block_x;
  const std::int64_t grid_x = std::min<std::int64_t>((cols + block_x - 1) / block_x, kMaxGridDim);
  const std::int64_t grid_y = std::min<std::int64_t>((rows + block_y - 1) / block_y, kMaxGridDim);
  for_each_2d_kernel<<<dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y)), dim3(block_x, block_y), 0,
                       stream>>>(rows, cols, op);
  LORA_CUDA_CHECK_LAUNCH();
}

}  // namespace lora::cuda::kernels
