// The counter-based RNG: Philox4x32-10 against the published known-answer
// vectors (Random123's kat_vectors), and the properties init and dropout rely on.
#include <gtest/gtest.h>

#include <cmath>
#include <set>

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
