// The counter-based RNG: Philox4x32-10 against the published known-answer
// vectors (Random123's kat_vectors), the counter layout of random_block, and
// the properties init and dropout rely on.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <set>
#include <utility>

#include "lora/core/random.hpp"

namespace {

TEST(Philox, MatchesKnownAnswerVectors) {
  struct Case {
    lora::Philox4x32 counter;
    std::uint32_t k0, k1;
    lora::Philox4x32 expected;
  };
  const Case cases[] = {
      {{{0, 0, 0, 0}}, 0, 0, {{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}}},
      {{{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}},
       0xffffffffu,
       0xffffffffu,
       {{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}}},
      {{{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}},
       0xa4093822u,
       0x299f31d0u,
       {{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}}},
  };
  for (const Case& c : cases) {
    const lora::Philox4x32 out = lora::philox4x32_10(c.counter, c.k0, c.k1);
    for (int w = 0; w < 4; ++w) EXPECT_EQ(out.v[w], c.expected.v[w]) << "word " << w;
  }
}

TEST(Philox, StreamsOffsetsAndSeedsGiveDifferentNumbers) {
  std::set<std::uint32_t> seen;
  for (std::uint32_t stream = 0; stream < 4; ++stream)
    for (std::uint32_t offset = 0; offset < 4; ++offset)
      for (std::uint64_t seed : {0ull, 1ull, 1ull << 40})
        for (std::uint64_t i = 0; i < 8; ++i) seen.insert(lora::random_bits(seed, stream, offset, i));
  EXPECT_EQ(seen.size(), 4u * 4u * 3u * 8u);  // 384 draws of 32 bits: a collision would mean shared counters
}

// random_block's documented counter, built here from philox4x32_10 (checked
// against the known-answer vectors above): counter = (block low, block high |
// (stream >> 32) << 31, stream low, offset), key = (seed low, seed high).
TEST(Philox, RandomBlockUsesTheDocumentedCounterLayout) {
  const auto lo = [](std::uint64_t v) { return static_cast<std::uint32_t>(v); };
  const auto hi = [](std::uint64_t v) { return static_cast<std::uint32_t>(v >> 32); };
  for (const std::uint64_t seed : {0ull, 0x0123'4567'89ab'cdefull})
    for (const std::uint64_t stream : {0ull, 7ull, 0xffff'ffffull, 0x1'0000'0000ull, 0x1'ffff'fffeull, 0x1'ffff'ffffull})
      for (const std::uint64_t block : {0ull, 1ull, 0x1'2345'6789ull, (1ull << 62) - 1}) {
        const lora::Philox4x32 want = lora::philox4x32_10(
            lora::Philox4x32{{lo(block), hi(block) | (hi(stream) << 31), lo(stream), 9u}}, lo(seed), hi(seed));
        const lora::Philox4x32 got = lora::random_block(seed, stream, 9u, block);
        for (int w = 0; w < 4; ++w)
          EXPECT_EQ(got.v[w], want.v[w]) << "seed " << seed << " stream " << stream << " block " << block;
      }
}

// A layer's init and dropout streams are 2 s and 2 s + 1 in 64 bits. In 32
// bits they wrapped: layer streams s and s + 2^31 (say, two 32-bit hashes of
// layer names) drew the same A and the same dropout masks, and 2^31 - 1 met
// 2^32 - 1. Every pair below must share no init word and no dropout mask.
TEST(Philox, LayerStreamsThatDifferInTheTopBitShareNoNumbers) {
  const std::uint64_t seed = 42;
  const std::pair<std::uint32_t, std::uint32_t> pairs[] = {
      {0u, 0x8000'0000u}, {5u, 0x8000'0005u}, {0x7fff'ffffu, 0xffff'ffffu}, {0u, 0xffff'ffffu}};
  for (const auto& [s, t] : pairs) {
    SCOPED_TRACE("layer streams " + std::to_string(s) + " and " + std::to_string(t));
    EXPECT_NE(lora::init_stream(s), lora::init_stream(t));
    EXPECT_NE(lora::dropout_stream(s), lora::dropout_stream(t));
    int same_init = 0, same_mask = 0;
    const int n = 256;
    for (int i = 0; i < n; ++i) {
      const auto index = static_cast<std::uint64_t>(i);
      same_init += lora::random_bits(seed, lora::init_stream(s), 0, index) ==
                   lora::random_bits(seed, lora::init_stream(t), 0, index);
      same_mask += lora::dropout_keep(seed, s, 3, index, 0.5f) == lora::dropout_keep(seed, t, 3, index, 0.5f);
    }
    EXPECT_EQ(same_init, 0);
    // Independent masks at p = 0.5 agree on n / 2 +- 8 (one sd) elements; identical ones on all n.
    EXPECT_LT(same_mask, n * 3 / 4);
  }
  // Init and dropout of every layer stream are distinct sequences too.
  std::set<std::uint64_t> streams;
  for (const auto& [s, t] : pairs)
    for (const std::uint32_t layer : {s, t}) {
      streams.insert(lora::init_stream(layer));
      streams.insert(lora::dropout_stream(layer));
    }
  EXPECT_EQ(streams.size(), 2u * 6u);  // six distinct layer streams above
}

TEST(Philox, DropoutKeepsAboutOneMinusP) {
  const float p = 0.3f;
  const int n = 200000;
  int kept = 0;
  for (int i = 0; i < n; ++i) kept += lora::dropout_keep(7, 3, 11, static_cast<std::uint64_t>(i), p) ? 1 : 0;
  const double rate = static_cast<double>(kept) / n;
  // Binomial standard deviation sqrt(p (1 - p) / n) ~ 0.001: 6 sigma.
  EXPECT_NEAR(rate, 0.7, 0.006);
}

TEST(Philox, NormalHasUnitMoments) {
  const int n = 200000;
  double sum = 0, sum_sq = 0;
  for (int k = 0; k < n; ++k) {
    const double z = lora::standard_normal(5, 0, 0, static_cast<std::uint64_t>(k));
    sum += z;
    sum_sq += z * z;
  }
  const double mean = sum / n, var = sum_sq / n - mean * mean;
  EXPECT_NEAR(mean, 0.0, 0.015);  // 6 / sqrt(n) ~ 0.013
  EXPECT_NEAR(var, 1.0, 0.02);    // sd of the variance estimate sqrt(2 / n) ~ 0.003
}

}  // namespace
