// The NF4 format (quant/nf4.hpp) against bitsandbytes' rules, each expected
// value derived here: the code values and thresholds from bitsandbytes'
// published constants, the 8-bit dynamic code by create_dynamic_map's
// algorithm, quantized indices by brute-force nearest search, the packed
// layout on a hand-made example, dequantized values from the unpacked nibbles.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstdio>
#include <string>
#include <limits>
#include <random>
#include <vector>

#include "lora/quant/nf4.hpp"

namespace {

namespace nf4 = lora::nf4;

std::vector<float> gaussian(std::size_t n, float sigma, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, sigma);
  std::vector<float> out(n);
  for (float& x : out) x = dist(gen);
  return out;
}

// Index of the code value nearest to x, by distance in double (ties: lower).
int nearest(const float* code, int size, float x) {
  int best = 0;
  for (int i = 1; i < size; ++i) {
    if (std::fabs(static_cast<double>(x) - code[i]) < std::fabs(static_cast<double>(x) - code[best])) best = i;
  }
  return best;
}

TEST(Nf4Format, CodeIsBitsandbytesNf4) {
  // bitsandbytes' get_4bit_type("nf4") / dDequantizeNF4, as the issue lists them.
  const double expected[16] = {-1.0,
                               -0.6961928009986877,
                               -0.5250730514526367,
                               -0.39491748809814453,
                               -0.28444138169288635,
                               -0.18477343022823334,
                               -0.09105003625154495,
                               0.0,
                               0.07958029955625534,
                               0.16093020141124725,
                               0.24611230194568634,
                               0.33791524171829224,
                               0.44070982933044434,
                               0.5626170039176941,
                               0.7229568362236023,
                               1.0};
  for (int i = 0; i < 16; ++i) EXPECT_EQ(nf4::code_value(i), static_cast<float>(expected[i])) << i;
  // dQuantizeNF4's decision-tree thresholds (bitsandbytes csrc/kernels.cu), low to high.
  const double thresholds[15] = {-0.8480964004993439, -0.6106329262256622, -0.4599952697753906,
                                 -0.33967943489551544, -0.23460740596055984, -0.13791173323988914,
                                 -0.045525018125772476, 0.03979014977812767, 0.1202552504837513,
                                 0.2035212516784668,  0.2920137718319893,  0.3893125355243683,
                                 0.5016634166240692,  0.6427869200706482,  0.8614784181118011};
  for (int i = 0; i < 15; ++i) EXPECT_EQ(nf4::code_threshold(i), static_cast<float>(thresholds[i])) << i;
}

// bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7,
// total_bits=8), step by step: for e = 0..6, the 2^e midpoints of neighbours
// in linspace(0.1, 1, 2^e + 1), times 10^(e - 6), with both signs; then 0
// and 1; sorted. Here in double, each value rounded to float once.
std::vector<float> create_dynamic_map() {
  std::vector<float> data;
  for (int e = 0; e < 7; ++e) {
    const int k = (1 << e) + 1;
    const double scale = std::pow(10.0, e - 6);
    for (int i = 0; i + 1 < k; ++i) {
      const double lo = 0.1 + 0.9 * i / (k - 1), hi = 0.1 + 0.9 * (i + 1) / (k - 1);
      data.push_back(static_cast<float>(scale * (lo + hi) / 2));
      data.push_back(static_cast<float>(-scale * (lo + hi) / 2));
    }
  }
  data.push_back(0.0f);
  data.push_back(1.0f);
  std::sort(data.begin(), data.end());
  return data;
}

TEST(Nf4Format, DynamicCodeIsCreateDynamicMap) {
  // bitsandbytes computes the map with torch in fp32 (linspace, then the
  // midpoints, then the scale: three roundings, and torch's CPU linspace
  // rounds by its vector width), so its values sit within a few ulp of the
  // exact ones; the table is what torch computes, and files carry the map
  // they were made with (io/nf4.hpp reads it), so loading never depends on it.
  const std::vector<float> expected = create_dynamic_map();
  ASSERT_EQ(expected.size(), 256u);
  int differ = 0;
  for (std::size_t i = 0; i < 256; ++i) {
    const float ours = nf4::kDynamicCode[i];
    if (ours != expected[i]) ++differ;
    EXPECT_LE(std::fabs(ours - expected[i]), 4 * std::numeric_limits<float>::epsilon() * std::fabs(expected[i]))
        << i << ": " << ours << " vs " << expected[i];
    if (i > 0) {
      EXPECT_LT(nf4::kDynamicCode[i - 1], ours) << "sorted, no repeats: " << i;
    }
    if (i < 255) {
      EXPECT_EQ(ours, -nf4::kDynamicCode[254 - i]) << "symmetric around index 127: " << i;
    }
  }
  EXPECT_EQ(nf4::kDynamicCode[127], 0.0f);
  EXPECT_EQ(nf4::kDynamicCode[255], 1.0f);
  std::printf("dynamic code: %d of 256 values differ from the exactly rounded ones (fp32 rounding in torch)\n", differ);
}

TEST(Nf4Format, QuantizeValueIsNearestCodeWithTiesDown) {
  float code[16];
  for (int i = 0; i < 16; ++i) code[i] = nf4::code_value(i);
  std::mt19937 gen(7);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (int t = 0; t < 20000; ++t) {
    const float x = dist(gen);
    EXPECT_EQ(nf4::quantize_value(x), nearest(code, 16, x)) << x;
  }
  for (int i = 0; i < 16; ++i) EXPECT_EQ(nf4::quantize_value(code[i]), i);
  for (int i = 0; i < 15; ++i) {
    const float mid = nf4::code_threshold(i);
    EXPECT_EQ(nf4::quantize_value(mid), i) << "on a midpoint: the lower value";
    EXPECT_EQ(nf4::quantize_value(std::nextafter(mid, 2.0f)), i + 1);
  }
  EXPECT_EQ(nf4::quantize_value(std::numeric_limits<float>::quiet_NaN()), 0);
}

TEST(Nf4Format, QuantizeDynamicIsNearestCode) {
  std::mt19937 gen(11);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (int t = 0; t < 20000; ++t) {
    // Spread over the code's decades: magnitudes from 1e-7 to 1.
    const float x = dist(gen) * static_cast<float>(std::pow(10.0, -7.0 * (t % 8) / 7.0));
    const int got = nf4::quantize_dynamic(nf4::kDynamicCode, x), want = nearest(nf4::kDynamicCode, 256, x);
    // dQuantize compares with float midpoints: off the nearest only when x is
    // within rounding of the midpoint of the two.
    if (got != want) {
      const float mid = (nf4::kDynamicCode[got] + nf4::kDynamicCode[want]) * 0.5f;
      EXPECT_LE(std::fabs(x - mid), 4 * std::numeric_limits<float>::epsilon() * std::fabs(mid)) << x;
    }
  }
  for (int i = 0; i < 256; ++i) {
    if (i > 0 && nf4::kDynamicCode[i] == nf4::kDynamicCode[i - 1]) continue;
    EXPECT_EQ(nf4::kDynamicCode[nf4::quantize_dynamic(nf4::kDynamicCode, nf4::kDynamicCode[i])], nf4::kDynamicCode[i]);
  }
}

TEST(Nf4Format, PackedLayoutOnTwoHandMadeBlocks) {
  // Two blocks of 4, in a 2 x 4 weight (one row per block):
  //   block 0: absmax 2, w / 2 = {1, -0.5, 0, 0.125}
  //     1 -> 15; -0.5 -> -0.5251 (2, nearer than -0.3949); 0 -> 7; 0.125 -> 0.1609 (9, nearer than 0.0796)
  //   block 1: absmax 4, w / 4 = {-1, 0.25, -0.0625, 0.7}
  //     -1 -> 0; 0.25 -> 0.2461 (10); -0.0625 -> -0.0911 (6, nearer than 0); 0.7 -> 0.7230 (14)
  // First value of each pair in the high nibble: 0xF2 0x79 0x0A 0x6E.
  const float w[8] = {2.0f, -1.0f, 0.0f, 0.25f, -4.0f, 1.0f, -0.25f, 2.8f};
  nf4::Options options;
  options.blocksize = 4;
  options.double_quant = false;
  const nf4::Weight q = nf4::quantize(w, 2, 4, 4, options);
  ASSERT_NO_THROW(nf4::check(q, "hand-made"));
  EXPECT_EQ(q.packed, (std::vector<std::uint8_t>{0xF2, 0x79, 0x0A, 0x6E}));
  EXPECT_EQ(q.absmax, (std::vector<float>{2.0f, 4.0f}));
  const std::vector<float> back = nf4::dequantize(q);
  const int indices[8] = {15, 2, 7, 9, 0, 10, 6, 14};
  for (int i = 0; i < 8; ++i) EXPECT_EQ(back[i], nf4::code_value(indices[i]) * (i < 4 ? 2.0f : 4.0f)) << i;

  // An odd count pads its last byte with a zero value (index 7) in the low nibble.
  const float odd[3] = {1.0f, -1.0f, 0.5f};
  options.blocksize = 2;
  const nf4::Weight q3 = nf4::quantize(odd, 1, 3, 3, options);
  EXPECT_EQ(q3.packed, (std::vector<std::uint8_t>{0xF0, 0xF7}));
  EXPECT_EQ(q3.absmax, (std::vector<float>{1.0f, 0.5f}));
}

TEST(Nf4Format, ZeroBlockStoresIndexZero) {
  // 1 / 0 is inf, 0 * inf is NaN, and NaN is above no threshold: index 0,
  // which dequantizes to -1 * 0.
  const std::vector<float> w(8, 0.0f);
  nf4::Options options;
  options.blocksize = 4;
  options.double_quant = false;
  const nf4::Weight q = nf4::quantize(w.data(), 1, 8, 8, options);
  EXPECT_EQ(q.packed, std::vector<std::uint8_t>(4, 0x00));
  for (float v : nf4::dequantize(q)) EXPECT_EQ(v, 0.0f);
}

// Per block: every value within half the widest gap of the code (1 - 0.7230)
// times absmax of the original; the dequantized value is the code of the
// unpacked nibble times the block's absmax.
void expect_within_nf4_bounds(const std::vector<float>& w, const nf4::Weight& q, std::int64_t cols) {
  const std::vector<float> back = nf4::dequantize(q);
  double max_gap = 0;
  for (int i = 0; i < 15; ++i) max_gap = std::max(max_gap, double(nf4::code_value(i + 1)) - nf4::code_value(i));
  const nf4::View<> v = q.view();
  for (std::int64_t i = 0; i < q.numel(); ++i) {
    const std::uint8_t byte = q.packed[static_cast<std::size_t>(i / 2)];
    const int index = i % 2 == 0 ? byte >> 4 : byte & 0xF;
    const float absmax = v.block_absmax(i / q.blocksize);
    ASSERT_EQ(back[static_cast<std::size_t>(i)], nf4::code_value(index) * absmax) << i;
    float true_absmax = 0;
    const std::int64_t first = i / q.blocksize * q.blocksize;
    for (std::int64_t j = first; j < std::min(q.numel(), first + q.blocksize); ++j)
      true_absmax = std::max(true_absmax, std::fabs(w[static_cast<std::size_t>(j)]));
    // The absmax itself is exact without double quantization and within the
    // 8-bit code's error with it (below 1 % of the block's absmax here).
    const double slack = q.nested() ? 0.01 * true_absmax : 0.0;
    ASSERT_LE(std::fabs(back[static_cast<std::size_t>(i)] - w[static_cast<std::size_t>(i)]),
              max_gap / 2 * true_absmax * 1.000001 + slack)
        << "element " << i << " (row " << i / cols << ")";
  }
}

double rms_relative_error(const std::vector<float>& w, const nf4::Weight& q) {
  const std::vector<float> back = nf4::dequantize(q);
  double err = 0, norm = 0;
  for (std::size_t i = 0; i < w.size(); ++i) {
    err += (static_cast<double>(back[i]) - w[i]) * (static_cast<double>(back[i]) - w[i]);
    norm += static_cast<double>(w[i]) * w[i];
  }
  return std::sqrt(err / norm);
}

TEST(Nf4Format, GaussianErrorIsWhatNf4Allows) {
  const std::int64_t rows = 256, cols = 1000;  // 4000 blocks: 16 nested blocks, the last one partial
  const std::vector<float> w = gaussian(static_cast<std::size_t>(rows * cols), 0.02f, 3);
  nf4::Options plain;
  plain.double_quant = false;
  const nf4::Weight q = nf4::quantize(w.data(), rows, cols, cols, plain);
  const nf4::Weight dq = nf4::quantize(w.data(), rows, cols, cols);
  ASSERT_NO_THROW(nf4::check(q, "plain"));
  ASSERT_NO_THROW(nf4::check(dq, "double"));
  EXPECT_EQ(q.packed, dq.packed) << "double quantization changes only how absmax is stored";
  expect_within_nf4_bounds(w, q, cols);
  expect_within_nf4_bounds(w, dq, cols);
  // NF4 on N(0, sigma) in blocks of 64: about 9-10 % RMS relative error (the
  // QLoRA paper's code is information-theoretically optimal for it);
  // double quantization adds little.
  const double e = rms_relative_error(w, q), e2 = rms_relative_error(w, dq);
  std::printf("NF4 RMS relative error on a Gaussian %lld x %lld: %.4f (fp32 absmax), %.4f (double-quantized)\n",
              static_cast<long long>(rows), static_cast<long long>(cols), e, e2);
  EXPECT_GT(e, 0.05);
  EXPECT_LT(e, 0.11);
  EXPECT_LT(e2, e * 1.02);
  // Storage: 4 bits + 8 bits per 64 + 32 bits per 16384 (+ the 1 KiB code).
  EXPECT_EQ(dq.bytes(), static_cast<std::size_t>(rows * cols / 2 + 4000 + 16 * 4 + 256 * 4));
  EXPECT_EQ(q.bytes(), static_cast<std::size_t>(rows * cols / 2 + 4000 * 4));
}

TEST(Nf4Format, StridedInputAndDoubleInputMatchContiguousFloat) {
  const std::int64_t rows = 9, cols = 70, stride = 75;
  const std::vector<float> w = gaussian(static_cast<std::size_t>(rows * stride), 1.0f, 5);
  std::vector<float> packed_rows(static_cast<std::size_t>(rows * cols));
  std::vector<double> as_double(w.begin(), w.end());
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c) packed_rows[static_cast<std::size_t>(r * cols + c)] = w[static_cast<std::size_t>(r * stride + c)];
  const nf4::Weight a = nf4::quantize(packed_rows.data(), rows, cols, cols);
  const nf4::Weight b = nf4::quantize(w.data(), rows, cols, stride);
  const nf4::Weight c = nf4::quantize(as_double.data(), rows, cols, stride);
  EXPECT_EQ(a.packed, b.packed);
  EXPECT_EQ(a.absmax_q, b.absmax_q);
  EXPECT_EQ(a.packed, c.packed);
  EXPECT_EQ(a.nested_absmax, c.nested_absmax);
  // dequantize_rows of a middle range into a strided double buffer.
  const std::vector<float> all = nf4::dequantize(a);
  std::vector<double> part(3 * 80, -7.0);
  nf4::dequantize_rows(a.view(), 4, 3, part.data(), 80);
  for (std::int64_t r = 0; r < 3; ++r) {
    for (std::int64_t col = 0; col < cols; ++col)
      EXPECT_EQ(part[static_cast<std::size_t>(r * 80 + col)], all[static_cast<std::size_t>((4 + r) * cols + col)]);
    EXPECT_EQ(part[static_cast<std::size_t>(r * 80 + cols)], -7.0) << "beyond cols untouched";
  }
}

TEST(Nf4Format, ChecksNameWhatIsWrong) {
  const std::vector<float> w = gaussian(640, 1.0f, 9);
  nf4::Weight q = nf4::quantize(w.data(), 10, 64, 64);
  q.packed.pop_back();
  try {
    nf4::check(q, "layer.weight");
    FAIL() << "a short packed buffer passed";
  } catch (const lora::Error& e) {
    EXPECT_NE(std::string(e.what()).find("layer.weight"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("320 bytes, found 319"), std::string::npos) << e.what();
  }
  nf4::Weight q2 = nf4::quantize(w.data(), 10, 64, 64);
  q2.nested_absmax.push_back(1.0f);
  EXPECT_THROW(nf4::check(q2, "x"), lora::Error);
  nf4::Options bad;
  bad.blocksize = 3;
  EXPECT_THROW(nf4::quantize(w.data(), 10, 64, 64, bad), lora::Error);
  bad.blocksize = 64;
  bad.dtype = "float64";
  EXPECT_THROW(nf4::quantize(w.data(), 10, 64, 64, bad), lora::Error);
  EXPECT_THROW(nf4::quantize(w.data(), 10, 64, 32), lora::Error);
}

}  // namespace
