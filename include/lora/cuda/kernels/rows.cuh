// Row gather and scatter-add, for layers that route rows of a batch to
// different adapters. Row indices are validated on the host before launch.
#pragma once

#include <cstdint>

#include "lora/cuda/kernels/elementwise.cuh"

namespace lora::cuda::kernels {

// dst[i, j] = src[rows[0, i], j]                dst: n x c, src: m x c, rows: 1 x n
template <class T>
struct GatherRows {
  DeviceView<const T> src;
  DeviceView<const std::int64_t> rows;
  DeviceView<T> dst;
  __device__ void operator()(std::int64_t i, std::int64_t j) const { dst(i, j) = src(rows(0, i), j); }
};

// dst[rows[0, i], j] += src[i, j]               src: n x c, dst: m x c, rows distinct
template <class T>
struct ScatterAddRows {
  DeviceView<const T> src;
  DeviceView<const std::int64_t> rows;
  DeviceView<T> dst;
  __device__ void operator()(std::int64_t i, std::int64_t j) const {
    const std::int64_t r = rows(0, i);
    dst(r, j) = value_cast<T>(value_cast<compute_t<T>>(dst(r, j)) + value_cast<compute_t<T>>(src(i, j)));
  }
};

}  // namespace lora::cuda::kernels
