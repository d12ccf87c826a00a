// Inverted dropout driven by the library's counter-based RNG, so the GPU draws
// exactly the CPU backend's mask for the same (seed, stream, call).
#pragma once

#include <cstdint>

#include "lora/core/random.hpp"
#include "lora/cuda/kernels/elementwise.cuh"

namespace lora::cuda::kernels {

// out[i, j] = keep ? x[i, j] * keep_scale : 0,  keep_scale = 1 / (1 - p)
// keep = dropout_keep(seed, stream, call, i * cols + j, p)    x, out: rows x cols
// The index is the element's position in a contiguous rows x cols matrix
// whatever the strides, and keep_scale is rounded to compute_t<T> on the host
// exactly as the CPU rounds it, so fp32 outputs match the CPU bit for bit.
// out may alias x: each element is read and written by the same thread.
template <class T>
struct Dropout {
  DeviceView<const T> x;
  DeviceView<T> out;
  compute_t<T> keep_scale;
  float p;
  std::uint64_t seed;
  std::uint32_t stream;
  std::uint32_t call;
  __device__ void operator()(std::int64_t i, std::int64_t j) const {
    const auto index = static_cast<std::uint64_t>(i * x.cols + j);
    const bool keep = dropout_keep(seed, stream, call, index, p);
    out(i, j) = keep ? value_cast<T>(value_cast<compute_t<T>>(x(i, j)) * keep_scale) : value_cast<T>(compute_t<T>(0));
  }
};

}  // namespace lora::cuda::kernels
