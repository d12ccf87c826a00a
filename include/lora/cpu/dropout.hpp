// The CPU's dropout kernels: keep bits drawn with Philox four elements per
// call and sixteen calls side by side (so the compiler turns the rounds into
// vector code), and the bits applied to a matrix. Where the CPU has AVX-512
// (checked once at run time, GCC and Clang on x86-64) the same code runs
// compiled for it: the 32 x 32 -> 64-bit products of Philox and the packing
// of bits are where SSE2 is slow. Every path gives the bits of
// lora::dropout_keep (core/random.hpp).
#pragma once

#include <cstddef>
#include <cstdint>

#include "lora/core/random.hpp"

#if defined(__GNUC__) && defined(__x86_64__)
#define LORA_CPU_DISPATCH_AVX512 1
#define LORA_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define LORA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define LORA_CPU_DISPATCH_AVX512 0
#define LORA_ALWAYS_INLINE inline
#endif

namespace lora::cpu::detail {

// Philox blocks computed side by side, in structure-of-arrays form.
inline constexpr int kPhiloxLanes = 16;

// out[4 l + w] = word w of block first_block + l of (seed, rng_stream, call), l < kPhiloxLanes:
// random_block's counter and key, the rounds of philox4x32_10.
LORA_ALWAYS_INLINE void philox_lanes(std::uint64_t seed, std::uint64_t rng_stream, std::uint32_t call,
                                     std::uint64_t first_block, std::uint32_t* out) {
  std::uint32_t c0[kPhiloxLanes], c1[kPhiloxLanes], c2[kPhiloxLanes], c3[kPhiloxLanes];
  const auto stream_bit = static_cast<std::uint32_t>((rng_stream >> 32) << 31);
  for (int l = 0; l < kPhiloxLanes; ++l) {
    const std::uint64_t block = first_block + static_cast<std::uint64_t>(l);
    c0[l] = static_cast<std::uint32_t>(block);
    c1[l] = static_cast<std::uint32_t>(block >> 32) | stream_bit;
    c2[l] = static_cast<std::uint32_t>(rng_stream);
    c3[l] = call;
  }
  std::uint32_t k0 = static_cast<std::uint32_t>(seed), k1 = static_cast<std::uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int l = 0; l < kPhiloxLanes; ++l) {
      const std::uint64_t p0 = std::uint64_t{0xD2511F53u} * c0[l];
      const std::uint64_t p1 = std::uint64_t{0xCD9E8D57u} * c2[l];
      const std::uint32_t n0 = static_cast<std::uint32_t>(p1 >> 32) ^ c1[l] ^ k0;
      const std::uint32_t n2 = static_cast<std::uint32_t>(p0 >> 32) ^ c3[l] ^ k1;
      c1[l] = static_cast<std::uint32_t>(p1);
      c3[l] = static_cast<std::uint32_t>(p0);
      c0[l] = n0;
      c2[l] = n2;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  for (int l = 0; l < kPhiloxLanes; ++l) {
    out[4 * l] = c0[l];
    out[4 * l + 1] = c1[l];
    out[4 * l + 2] = c2[l];
    out[4 * l + 3] = c3[l];
  }
}

// The scratch keep_bits needs for `count` elements: whole groups of
// kPhiloxLanes blocks covering them from any phase.
inline std::size_t keep_bits_scratch(std::int64_t count) {
  const auto blocks = static_cast<std::size_t>(count / 4 + 2);
  return 4 * ((blocks + kPhiloxLanes - 1) / kPhiloxLanes) * kPhiloxLanes;
}

// words[w] bit q = keep of element first + 32 w + q of the dropout sequence
// (seed, rng_stream, call), for the count elements from `first`; the bits past
// count in the last word are 0. randoms: keep_bits_scratch(count) words.
LORA_ALWAYS_INLINE void keep_bits_impl(std::uint64_t seed, std::uint64_t rng_stream, std::uint32_t call,
                                       std::uint64_t first, std::int64_t count, std::uint32_t threshold,
                                       std::uint32_t* randoms, std::uint32_t* words) {
  const std::uint64_t first_block = first >> 2;
  const std::uint64_t end_block = (first + static_cast<std::uint64_t>(count) + 3) >> 2;
  for (std::uint64_t b = first_block; b < end_block; b += kPhiloxLanes)
    philox_lanes(seed, rng_stream, call, b, randoms + 4 * (b - first_block));
  const std::uint32_t* r = randoms + (first & 3);
  const std::int64_t full = count / 32;
  for (std::int64_t w = 0; w < full; ++w) {
    std::uint32_t bits = 0;
    for (int q = 0; q < 32; ++q) bits |= static_cast<std::uint32_t>(dropout_keeps(r[32 * w + q], threshold)) << q;
    words[w] = bits;
  }
  if (count % 32 != 0) {
    std::uint32_t bits = 0;
    for (std::int64_t q = 0; q < count % 32; ++q)
      bits |= static_cast<std::uint32_t>(dropout_keeps(r[32 * full + q], threshold)) << q;
    words[full] = bits;
  }
}

// out[j] = keep_j ? x[j] keep_scale : 0, keep_j = bit j % 32 of word j / 32.
// (No accumulating form: a product feeding an add may be fused into an FMA
// in one build and not in another, and the bits would then depend on the CPU.)
template <class T>
LORA_ALWAYS_INLINE void apply_bits_impl(const T* x, const std::uint32_t* words, std::int64_t count, T keep_scale,
                                        T* out) {
  const std::int64_t full = count / 32;
  for (std::int64_t w = 0; w < full; ++w) {
    const std::uint32_t bits = words[w];
    const T* xw = x + 32 * w;
    T* ow = out + 32 * w;
    for (int q = 0; q < 32; ++q) ow[q] = ((bits >> q) & 1u) != 0 ? xw[q] * keep_scale : T(0);
  }
  for (std::int64_t j = 32 * full; j < count; ++j)
    out[j] = ((words[j / 32] >> (j % 32)) & 1u) != 0 ? x[j] * keep_scale : T(0);
}

#if LORA_CPU_DISPATCH_AVX512
LORA_TARGET_AVX512 inline void keep_bits_avx512(std::uint64_t seed, std::uint64_t rng_stream, std::uint32_t call,
                                                std::uint64_t first, std::int64_t count, std::uint32_t threshold,
                                                std::uint32_t* randoms, std::uint32_t* words) {
  keep_bits_impl(seed, rng_stream, call, first, count, threshold, randoms, words);
}
template <class T>
LORA_TARGET_AVX512 void apply_bits_avx512(const T* x, const std::uint32_t* words, std::int64_t count, T keep_scale,
                                          T* out) {
  apply_bits_impl(x, words, count, keep_scale, out);
}
inline bool has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
}
#endif

// The entry points: the AVX-512 build of the kernel where the CPU has it.
inline void keep_bits(std::uint64_t seed, std::uint64_t rng_stream, std::uint32_t call, std::uint64_t first,
                      std::int64_t count, std::uint32_t threshold, std::uint32_t* randoms, std::uint32_t* words) {
#if LORA_CPU_DISPATCH_AVX512
  if (has_avx512()) return keep_bits_avx512(seed, rng_stream, call, first, count, threshold, randoms, words);
#endif
  keep_bits_impl(seed, rng_stream, call, first, count, threshold, randoms, words);
}
template <class T>
void apply_bits(const T* x, const std::uint32_t* words, std::int64_t count, T keep_scale, T* out) {
#if LORA_CPU_DISPATCH_AVX512
  if (has_avx512()) return apply_bits_avx512(x, words, count, keep_scale, out);
#endif
  apply_bits_impl(x, words, count, keep_scale, out);
}

}  // namespace lora::cpu::detail
