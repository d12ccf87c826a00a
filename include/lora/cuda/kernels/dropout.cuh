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
// Run as op(0, b) for every Philox block b: the thread draws the block once
// and writes its four elements 4 b .. 4 b + 3 (a block may span two rows).
// out may alias x: each element is read and written by the same thread.
template <class T>
struct Dropout {
  DeviceView<const T> x;
  DeviceView<T> out;
  compute_t<T> keep_scale;
  std::uint32_t threshold;  // dropout_keep_threshold(p)
  std::uint64_t seed;
  std::uint64_t rng_stream;  // dropout_stream(layer stream)
  std::uint32_t call;
  static std::int64_t blocks(std::int64_t rows, std::int64_t cols) { return (rows * cols + 3) / 4; }
  __device__ void operator()(std::int64_t, std::int64_t block) const {
    const Philox4x32 r = random_block(seed, rng_stream, call, static_cast<std::uint64_t>(block));
    const std::int64_t total = x.rows * x.cols;
    for (int q = 0; q < 4 && 4 * block + q < total; ++q) {
      const std::int64_t index = 4 * block + q, i = index / x.cols, j = index % x.cols;
      const bool keep = dropout_keeps(r.v[q], threshold);
      out(i, j) = keep ? value_cast<T>(value_cast<compute_t<T>>(x(i, j)) * keep_scale) : value_cast<T>(compute_t<T>(0));
    }
  }
};

// bits(i, w): the keep bits of elements 32 w .. 32 w + 31 of row i, bit q
// for element 32 w + q (dropout_mask's layout; bits past cols are 0). One
// thread per word: one Philox call per four elements (eight or nine per word).
struct DropoutMask {
  DeviceView<std::uint32_t> bits;
  std::int64_t cols;
  std::uint32_t threshold;  // dropout_keep_threshold(p)
  std::uint64_t seed;
  std::uint64_t rng_stream;  // dropout_stream(layer stream)
  std::uint32_t call;
  __device__ void operator()(std::int64_t i, std::int64_t w) const {
    const std::int64_t j0 = 32 * w;
    const int count = cols - j0 < 32 ? static_cast<int>(cols - j0) : 32;
    const auto first = static_cast<std::uint64_t>(i * cols + j0);
    std::uint64_t block = first >> 2;
    Philox4x32 r = random_block(seed, rng_stream, call, block);
    std::uint32_t word = 0;
    for (int q = 0; q < count; ++q) {
      const std::uint64_t index = first + static_cast<std::uint64_t>(q);
      if ((index >> 2) != block) {
        block = index >> 2;
        r = random_block(seed, rng_stream, call, block);
      }
      word |= static_cast<std::uint32_t>(dropout_keeps(r.v[index & 3], threshold)) << q;
    }
    bits(i, w) = word;
  }
};

// out[i, j] = keep ? x[i, j] keep_scale : 0, keep = bit j % 32 of bits(i, j / 32):
// Dropout's result for the same mask, bit for bit. out may alias x.
template <class T>
struct ApplyDropoutMask {
  DeviceView<const T> x;
  DeviceView<const std::uint32_t> bits;
  compute_t<T> keep_scale;
  DeviceView<T> out;
  __device__ void operator()(std::int64_t i, std::int64_t j) const {
    const bool keep = ((bits(i, j / 32) >> (j % 32)) & 1u) != 0;
    out(i, j) = keep ? value_cast<T>(value_cast<compute_t<T>>(x(i, j)) * keep_scale) : value_cast<T>(compute_t<T>(0));
  }
};

}  // namespace lora::cuda::kernels
