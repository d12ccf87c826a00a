// NF4 (quant/nf4.hpp) on the GPU: the 4-bit quantizer and the row
// dequantizer of lora::cuda::Backend. Both give the host functions'
// numbers bit for bit: the same float operations in the same order, each
// rounded on its own (__fmul_rn / __fdiv_rn, and nf4::detail::mul_add_unfused
// for a double-quantized absmax), so no fused multiply-add or fast-math
// reciprocal can creep in.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "lora/core/matrix_view.hpp"
#include "lora/cuda/check.cuh"
#include "lora/cuda/device_buffer.cuh"
#include "lora/cuda/kernels/launch.cuh"
#include "lora/cuda/numeric.cuh"
#include "lora/quant/nf4.hpp"

namespace lora::cuda::kernels {

inline constexpr int kWarpSize = 32;

// One warp per quantization block b (values [b * blocksize, min(n, (b + 1) *
// blocksize)) of W flattened row-major):
//   absmax[b] = max |float(w_i)|                      (a warp max: order-free)
//   q_i = nf4::quantize_value(float(w_i) * (1 / absmax[b]))
//   packed[i / 2] = q_i << 4 | q_{i+1}                 (i even)
// blocksize is even and every block starts at an even i, so each byte belongs
// to one block and is written whole by one lane. With n odd the last byte's
// low nibble holds a zero value, as nf4::quantize_blocks pads it.
template <class T>
__global__ void nf4_quantize_blocks_kernel(MatrixView<const T, DeviceSpace> W, std::int64_t blocksize,
                                           std::uint8_t* packed, float* absmax) {
  const std::int64_t n = W.rows * W.cols, blocks = (n + blocksize - 1) / blocksize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const std::int64_t warps_per_block = blockDim.x / kWarpSize;
  const std::int64_t warp_step = static_cast<std::int64_t>(gridDim.x) * warps_per_block;
  const auto at = [&](std::int64_t i) { return value_cast<float>(W.data[(i / W.cols) * W.stride + i % W.cols]); };
  // b is the same for every lane of a warp, so the whole warp runs each loop
  // (the shuffles need all 32 lanes).
  for (std::int64_t b = static_cast<std::int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / kWarpSize;
       b < blocks; b += warp_step) {
    const std::int64_t first = b * blocksize, last = first + blocksize < n ? first + blocksize : n;
    float m = 0.0f;
    for (std::int64_t i = first + lane; i < last; i += kWarpSize) m = fmaxf(m, fabsf(at(i)));
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
    if (lane == 0) absmax[b] = m;
    const float reciprocal = __fdiv_rn(1.0f, m);  // +inf for a block of zeros: every index is then 0
    for (std::int64_t i = first + 2 * lane; i < last; i += 2 * kWarpSize) {
      const std::uint8_t high = nf4::quantize_value(__fmul_rn(at(i), reciprocal));
      const std::uint8_t low = nf4::quantize_value(__fmul_rn(i + 1 < last ? at(i + 1) : 0.0f, reciprocal));
      packed[i / 2] = static_cast<std::uint8_t>(high << 4 | low);
    }
  }
}

template <class T>
void nf4_quantize_blocks(cudaStream_t stream, MatrixView<const T, DeviceSpace> W, std::int64_t blocksize,
                         std::uint8_t* packed, float* absmax) {
  const std::int64_t n = W.rows * W.cols;
  if (n == 0) return;
  const std::int64_t blocks = (n + blocksize - 1) / blocksize;
  constexpr std::int64_t kWarpsPerBlock = kThreadsPerBlock / kWarpSize;
  const std::int64_t grid = std::min<std::int64_t>((blocks + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxGridDim);
  nf4_quantize_blocks_kernel<T><<<static_cast<unsigned>(grid), kThreadsPerBlock, 0, stream>>>(W, blocksize, packed,
                                                                                             absmax);
  LORA_CUDA_CHECK_LAUNCH();
}

// Values of one row each thread dequantizes: one division by blocksize per
// run of them instead of one per value.
inline constexpr std::int64_t kNf4ValuesPerThread = 8;

// out[r, j] = T(nf4::code_value(q_i) * w.block_absmax(i / blocksize)),
// i = (first_row + r) * w.cols + j                     out: count x w.cols
// Each thread takes kNf4ValuesPerThread consecutive values of a row; the 16
// code values sit in shared memory (threads look up different ones).
template <class T>
__global__ void nf4_dequantize_rows_kernel(nf4::View<DeviceSpace> w, std::int64_t first_row,
                                           MatrixView<T, DeviceSpace> out) {
  __shared__ float code[16];
  const int t = static_cast<int>(threadIdx.y * blockDim.x + threadIdx.x);
  if (t < 16) code[t] = nf4::code_value(t);
  __syncthreads();
  const std::int64_t chunks = (out.cols + kNf4ValuesPerThread - 1) / kNf4ValuesPerThread;
  const std::int64_t row_step = static_cast<std::int64_t>(gridDim.y) * blockDim.y;
  const std::int64_t chunk_step = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t r = static_cast<std::int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < out.rows; r += row_step) {
    for (std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < chunks;
         c += chunk_step) {
      const std::int64_t j0 = c * kNf4ValuesPerThread;
      const std::int64_t j1 = j0 + kNf4ValuesPerThread < out.cols ? j0 + kNf4ValuesPerThread : out.cols;
      std::int64_t i = (first_row + r) * w.cols + j0;
      std::int64_t block = i / w.blocksize, block_end = (block + 1) * w.blocksize;
      float absmax = w.block_absmax(block);
      for (std::int64_t j = j0; j < j1; ++j, ++i) {
        while (i >= block_end) {  // more than once only for blocks shorter than a run
          ++block;
          block_end += w.blocksize;
          absmax = w.block_absmax(block);
        }
        out(r, j) = value_cast<T>(__fmul_rn(code[w.index(i)], absmax));
      }
    }
  }
}

template <class T>
void nf4_dequantize_rows(cudaStream_t stream, const nf4::View<DeviceSpace>& w, std::int64_t first_row,
                         MatrixView<T, DeviceSpace> out) {
  if (out.rows <= 0 || out.cols <= 0) return;
  const std::int64_t chunks = (out.cols + kNf4ValuesPerThread - 1) / kNf4ValuesPerThread;
  unsigned block_x = 32;
  while (block_x < kThreadsPerBlock && block_x < chunks) block_x *= 2;
  const unsigned block_y = kThreadsPerBlock / block_x;
  const std::int64_t grid_x = std::min<std::int64_t>((chunks + block_x - 1) / block_x, kMaxGridDim);
  const std::int64_t grid_y = std::min<std::int64_t>((out.rows + block_y - 1) / block_y, kMaxGridDim);
  nf4_dequantize_rows_kernel<T><<<dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y)),
                                  dim3(block_x, block_y), 0, stream>>>(w, first_row, out);
  LORA_CUDA_CHECK_LAUNCH();
}

}  // namespace lora::cuda::kernels
