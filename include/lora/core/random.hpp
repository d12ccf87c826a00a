// The one random number generator of the library: Philox4x32-10, a
// counter-based generator (value = f(key, counter)). Every random number used
// for init or dropout is a pure function of (seed, stream, offset, index), so
// results do not depend on threading and the CUDA backend reproduces the CPU's
// dropout masks bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

#include "lora/core/matrix_view.hpp"  // LORA_HOST_DEVICE

namespace lora {

struct Philox4x32 {
  std::uint32_t v[4];
};

// Philox4x32 with 10 rounds (Salmon et al., "Parallel random numbers: as easy
// as 1, 2, 3", SC'11): counter c (128 bits) and key k (64 bits) -> 128 bits.
LORA_HOST_DEVICE inline Philox4x32 philox4x32_10(Philox4x32 c, std::uint32_t k0, std::uint32_t k1) {
  constexpr std::uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr std::uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    const std::uint64_t p0 = static_cast<std::uint64_t>(kMul0) * c.v[0];
    const std::uint64_t p1 = static_cast<std::uint64_t>(kMul1) * c.v[2];
    const std::uint32_t hi0 = static_cast<std::uint32_t>(p0 >> 32), lo0 = static_cast<std::uint32_t>(p0);
    const std::uint32_t hi1 = static_cast<std::uint32_t>(p1 >> 32), lo1 = static_cast<std::uint32_t>(p1);
    c = Philox4x32{{hi1 ^ c.v[1] ^ k0, lo1, hi0 ^ c.v[3] ^ k1, lo0}};
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return c;
}

// The four words of block `block` of the sequence (seed, stream, offset):
// counter = (block low, block high | stream bit 32 << 31, stream low, offset),
// key = seed. A stream has 33 bits: the low 32 fill the third counter word and
// bit 32 takes the top bit of the second, which the block never reaches (a
// block is index >> 2 < 2^62). Streams must be < 2^33.
LORA_HOST_DEVICE inline Philox4x32 random_block(std::uint64_t seed, std::uint64_t stream, std::uint32_t offset,
                                                std::uint64_t block) {
  const auto block_hi = static_cast<std::uint32_t>(block >> 32) | static_cast<std::uint32_t>((stream >> 32) << 31);
  return philox4x32_10(
      Philox4x32{{static_cast<std::uint32_t>(block), block_hi, static_cast<std::uint32_t>(stream), offset}},
      static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32));
}

// The 32 random bits number `index` of the sequence (seed, stream, offset).
// One Philox call yields four words, so elements 4k..4k+3 share block k.
LORA_HOST_DEVICE inline std::uint32_t random_bits(std::uint64_t seed, std::uint64_t stream, std::uint32_t offset,
                                                  std::uint64_t index) {
  return random_block(seed, stream, offset, index >> 2).v[index & 3];
}

// Uniform in [0, 1) with 24 random bits: exactly representable in float, so
// every backend compares the same number against the dropout probability.
LORA_HOST_DEVICE inline float uniform01(std::uint32_t bits) { return static_cast<float>(bits >> 8) * 0x1p-24f; }

// Streams: each layer owns two, one for init and one for dropout, so layers
// built with the same seed but different stream ids draw independent numbers.
// Layer stream s draws from streams 2s and 2s + 1, formed in 64 bits: distinct
// for all 2^32 layer streams (s and s + 2^31 do not share numbers).
LORA_HOST_DEVICE inline std::uint64_t init_stream(std::uint32_t layer_stream) {
  return 2 * static_cast<std::uint64_t>(layer_stream);
}
LORA_HOST_DEVICE inline std::uint64_t dropout_stream(std::uint32_t layer_stream) {
  return 2 * static_cast<std::uint64_t>(layer_stream) + 1;
}

// Dropout keep decision for element `index` of forward call `call`:
// keep iff u >= p, u ~ U[0, 1). Shared by every backend.
LORA_HOST_DEVICE inline bool dropout_keep(std::uint64_t seed, std::uint32_t layer_stream, std::uint32_t call,
                                          std::uint64_t index, float p) {
  return uniform01(random_bits(seed, dropout_stream(layer_stream), call, index)) >= p;
}

// A dropout mask kept as bits: row i of a rows x cols mask is
// dropout_mask_words(cols) 32-bit words, bit j % 32 of word j / 32 holding
// dropout_keep(..., i * cols + j, p) (Backend::dropout_mask). 1 bit per element.
LORA_HOST_DEVICE inline std::int64_t dropout_mask_words(std::int64_t cols) { return (cols + 31) / 32; }

// keep iff uniform01(bits) >= p  <=>  (bits >> 8) >= dropout_keep_threshold(p):
// u 2^-24 and p 2^24 are exact in double, so the integer test is the float
// test (the mask kernels compare integers).
inline std::uint32_t dropout_keep_threshold(float p) {
  if (!(p > 0.0f)) return 0;
  if (p >= 1.0f) return 1u << 24;
  return static_cast<std::uint32_t>(std::ceil(static_cast<double>(p) * 0x1p24));
}
// The mask kernels' keep test of one random word against dropout_keep_threshold(p).
LORA_HOST_DEVICE inline bool dropout_keeps(std::uint32_t bits, std::uint32_t threshold) {
  return (bits >> 8) >= threshold;
}

// Standard normal by Box-Muller from words 2k and 2k+1 (host only; used for init).
inline double standard_normal(std::uint64_t seed, std::uint64_t stream, std::uint32_t offset, std::uint64_t k) {
  // (bits + 0.5) / 2^32 lies in (0, 1): log never sees 0.
  const double u1 = (static_cast<double>(random_bits(seed, stream, offset, 2 * k)) + 0.5) * 0x1p-32;
  const double u2 = (static_cast<double>(random_bits(seed, stream, offset, 2 * k + 1)) + 0.5) * 0x1p-32;
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(kTwoPi * u2);
}

}  // namespace lora
