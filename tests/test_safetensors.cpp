// safetensors: the 16-bit conversions against a reference found by search (not
// by bit tricks), the bytes we write checked against the format by hand, round
// trips, atomic writes, and a corpus of malformed files - one per check plus a
// truncation at every byte - each rejected with a lora::Error naming the check.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include "io_test_util.hpp"
#include "lora/io/safetensors.hpp"

namespace {

using io_test::kInfF;

using io_test::expect_error;
using io_test::TempDir;
using lora::io::Dtype;
using lora::io::SafetensorsReader;
using lora::io::SafetensorsWriter;


bool host_is_little_endian() {
  const std::uint32_t one = 1;
  std::uint8_t first;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

std::uint32_t bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// ---- reference rounding: nearest by search over the ordered values ---------------------

// Value of a non-negative F16 pattern, with the inf pattern 0x7C00 read as 2^16
// (the next value the format would have), so that rounding to it means overflow.
double half_value(std::uint16_t h) {
  const int e = h >> 10, f = h & 0x3FF;
  return e == 0 ? std::ldexp(f, -24) : std::ldexp(1024 + f, e - 25);
}
// Value of a non-negative BF16 pattern, with inf (0x7F80) read as 2^128.
double bf16_value(std::uint16_t h) {
  if (h == 0x7F80) return std::ldexp(1.0, 128);
  std::uint32_t u = static_cast<std::uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The pattern in [0, top] nearest to |x|, ties to the even pattern; sign copied.
template <class Value>
std::uint16_t reference_round(double x, std::uint16_t top, Value value) {
  const std::uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  const double a = std::fabs(x);
  if (a >= value(top)) return sign | top;
  std::uint32_t lo = 0, hi = top;  // value(lo) <= a < value(hi)
  while (hi - lo > 1) {
    const std::uint32_t mid = (lo + hi) / 2;
    (value(static_cast<std::uint16_t>(mid)) <= a ? lo : hi) = mid;
  }
  const double below = a - value(static_cast<std::uint16_t>(lo)), above = value(static_cast<std::uint16_t>(hi)) - a;
  const std::uint32_t pick = below < above ? lo : above < below ? hi : (lo % 2 == 0 ? lo : hi);
  return static_cast<std::uint16_t>(sign | pick);
}
std::uint16_t reference_half(double x) { return reference_round(x, 0x7C00, half_value); }
std::uint16_t reference_bf16(double x) { return reference_round(x, 0x7F80, bf16_value); }

// Floats spread over every exponent (including subnormals and the half range), without NaN.
std::vector<float> sample_floats(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<float> out;
  while (out.size() < n) {
    std::uint32_t u = static_cast<std::uint32_t>(rng());
    if (out.size() % 2 == 0) {  // half the samples near the F16 range: exponent in [-27, 17]
      const std::uint32_t e = static_cast<std::uint32_t>(127 - 27 + rng() % 45);
      u = (u & 0x807FFFFFu) | (e << 23);
    }
    float f;
    std::memcpy(&f, &u, 4);
    if (!std::isnan(f)) out.push_back(f);
  }
  return out;
}

// ---- conversions -------------------------------------------------------------------------

TEST(Float16, EveryHalfWidensExactly) {
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const float f = lora::io::half_to_float(static_cast<std::uint16_t>(h));
    const int e = (h >> 10) & 0x1F;
    if (e == 0x1F && (h & 0x3FF) != 0) {
      EXPECT_TRUE(std::isnan(f)) << std::hex << h;
      continue;
    }
    double expected = e == 0x1F ? kInfF : half_value(static_cast<std::uint16_t>(h & 0x7FFF));
    if (h & 0x8000) expected = -expected;
    ASSERT_EQ(bits(f), bits(static_cast<float>(expected))) << "pattern 0x" << std::hex << h;
  }
}

TEST(Float16, EveryHalfSurvivesARoundTripAndNaNStaysNaN) {
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const auto pattern = static_cast<std::uint16_t>(h);
    const std::uint16_t back = lora::io::float_to_half(lora::io::half_to_float(pattern));
    if ((h & 0x7C00) == 0x7C00 && (h & 0x3FF) != 0) {
      EXPECT_EQ(back & 0x7E00, 0x7E00) << "NaN 0x" << std::hex << h << " must stay a (quiet) NaN";
    } else {
      ASSERT_EQ(back, pattern) << "pattern 0x" << std::hex << h;
    }
  }
  for (std::uint32_t b = 0; b < 0x10000; ++b) {
    const auto pattern = static_cast<std::uint16_t>(b);
    const std::uint16_t back = lora::io::float_to_bfloat16(lora::io::bfloat16_to_float(pattern));
    if ((b & 0x7F80) == 0x7F80 && (b & 0x7F) != 0) {
      EXPECT_EQ(back & 0x7FC0, 0x7FC0) << "NaN 0x" << std::hex << b;
    } else {
      ASSERT_EQ(back, pattern) << "pattern 0x" << std::hex << b;
    }
  }
}

TEST(Float16, FloatNarrowsToTheNearestEvenHalfAndBfloat16) {
  std::vector<float> xs = sample_floats(400000, 7);
  // Boundaries: largest half, overflow threshold 65520 (a tie that goes to inf), smallest
  // subnormal 2^-24, its half 2^-25 (a tie that goes to 0), the first tie above it, -0.
  for (float f : {65504.0f, 65519.996f, 65520.0f, 65536.0f, 0x1p-24f, 0x1p-25f, 0x1.8p-24f, 0x1.000002p-25f, 0.0f,
                  -0.0f, 1.0f + 0x1p-11f, 1.0f + 0x1.8p-10f, 0x1p-14f, 0x1.ff8p-15f, kInfF, -kInfF,
                  std::numeric_limits<float>::max(), std::numeric_limits<float>::denorm_min(), 0x1.fffffep127f})
    xs.push_back(f);
  for (float f : xs) {
    ASSERT_EQ(lora::io::float_to_half(f), reference_half(f)) << std::hexfloat << f;
    ASSERT_EQ(lora::io::float_to_bfloat16(f), reference_bf16(f)) << std::hexfloat << f;
  }
  EXPECT_EQ(lora::io::float_to_half(65520.0f), 0x7C00);  // tie between 65504 (odd) and "65536" (even): inf
  EXPECT_EQ(lora::io::float_to_half(0x1p-25f), 0x0000);  // tie between 0 (even) and 2^-24 (odd): 0
}

TEST(Float16, DoubleRoundsOnceNotTwice) {
  // 1 + 2^-11 + 2^-40: just above the F16 tie between 1 and 1 + 2^-10. Through a
  // float (nearest) it would become the tie itself and then round to even, 1.0.
  const double x = 1.0 + 0x1p-11 + 0x1p-40;
  EXPECT_EQ(lora::io::float_to_half(static_cast<float>(x)), 0x3C00);  // what double rounding gives
  EXPECT_EQ(lora::io::double_to_half(x), 0x3C01);
  EXPECT_EQ(lora::io::double_to_bfloat16(1.0 + 0x1p-8 + 0x1p-40), 0x3F81);
  std::mt19937_64 rng(11);
  for (int i = 0; i < 200000; ++i) {
    // Doubles near 16-bit ties: a random F16/BF16 midpoint plus a tiny random offset.
    const double m = std::ldexp(1.0 + static_cast<double>(rng() % 2048) / 2048.0 + 0x1p-11, static_cast<int>(rng() % 40) - 24);
    const double d = m + std::ldexp(static_cast<double>(static_cast<std::int64_t>(rng() % 2001) - 1000), -60) * m;
    ASSERT_EQ(lora::io::double_to_half(d), reference_half(d)) << std::hexfloat << d;
    ASSERT_EQ(lora::io::double_to_bfloat16(d), reference_bf16(d)) << std::hexfloat << d;
    ASSERT_EQ(lora::io::double_to_half(-d), reference_half(-d)) << std::hexfloat << -d;
  }
}

TEST(Float16, DoubleToFloatRoundsToNearestAndOverflowsToInf) {
  EXPECT_EQ(lora::io::double_to_float(0x1p128 - 0x1p103), kInfF);  // the tie above FLT_MAX goes to inf
  EXPECT_EQ(lora::io::double_to_float(0x1p128 - 0x1p103 - 0x1p80), std::numeric_limits<float>::max());
  EXPECT_EQ(lora::io::double_to_float(-1e300), -kInfF);
  EXPECT_EQ(lora::io::double_to_float(1.0 + 0x1p-24), 1.0f);               // tie to even
  EXPECT_EQ(lora::io::double_to_float(1.0 + 0x1p-24 + 0x1p-50), 1.0f + 0x1p-23f);
  EXPECT_TRUE(std::isnan(lora::io::double_to_float(std::nan(""))));
}

// ---- what the writer writes, checked without the reader -------------------------------

std::vector<std::uint8_t> file_of(const std::string& header, const std::vector<std::uint8_t>& data) {
  std::vector<std::uint8_t> out(8 + header.size() + data.size());
  for (std::size_t i = 0; i < 8; ++i) out[i] = static_cast<std::uint8_t>(static_cast<std::uint64_t>(header.size()) >> (8 * i));
  for (std::size_t i = 0; i < header.size(); ++i) out[8 + i] = static_cast<std::uint8_t>(header[i]);
  for (std::size_t i = 0; i < data.size(); ++i) out[8 + header.size() + i] = data[i];
  return out;
}

std::vector<std::uint8_t> le_floats(std::initializer_list<float> values) {
  std::vector<std::uint8_t> out;
  for (float f : values)
    for (int i = 0; i < 4; ++i) out.push_back(static_cast<std::uint8_t>(bits(f) >> (8 * i)));
  return out;
}

TEST(SafetensorsWriter, WritesTheReferenceImplementationsBytes) {
  // The layout the Rust reference implementation's own tests fix for these tensors.
  SafetensorsWriter w;
  const float values[6] = {0, 1, 2, 3, 4, 5};
  w.add("attn.0", {1, 2, 3}, values);
  EXPECT_EQ(w.to_bytes(), file_of(R"({"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}})",
                                   le_floats({0, 1, 2, 3, 4, 5})));

  SafetensorsWriter padded;  // 65-byte JSON: padded with 7 spaces to 72
  padded.add("attn0", {1, 1, 2, 3}, values);
  EXPECT_EQ(padded.to_bytes(), file_of(R"({"attn0":{"dtype":"F32","shape":[1,1,2,3],"data_offsets":[0,24]}})"
                                       "       ",
                                       le_floats({0, 1, 2, 3, 4, 5})));

  SafetensorsWriter empty;
  EXPECT_EQ(empty.to_bytes(), file_of("{}      ", {}));
  empty.set_metadata("framework", "pt");
  EXPECT_EQ(empty.to_bytes(), file_of(R"({"__metadata__":{"framework":"pt"}})"
                                      "     ",
                                      {}));
}

TEST(SafetensorsWriter, OrdersTensorsByDtypeThenNameAndPadsTheHeader) {
  ASSERT_TRUE(host_is_little_endian()) << "the expected bytes below are built with memcpy";
  SafetensorsWriter w;
  w.set_metadata("format", "pt");
  const float f32[4] = {1.5f, -2.0f, 0.25f, 3.0f};
  const double f64[1] = {-0.125};
  const float small[3] = {1.0f, -2.0f, 0.5f};  // exact in F16 and BF16
  w.add("b_f16", {3}, small, Dtype::F16);
  w.add("a_f32", {2, 2}, f32);
  w.add("c_f64", {1}, f64);
  w.add("z_bf16", {1, 1}, small, Dtype::BF16);
  w.add("A_f32", {1}, f32);  // uppercase sorts before lowercase, byte-wise
  w.add_raw("i_i64", {Dtype::I64, {2}, {1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0}});
  w.add_raw("u_u8", {Dtype::U8, {3}, {7, 8, 9}});
  const std::vector<std::uint8_t> file = w.to_bytes();

  // Parse by hand: 8-byte little-endian length, then JSON (with nlohmann, not lora::io).
  std::uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<std::uint64_t>(file[i]) << (8 * i);
  ASSERT_LE(8 + n, file.size());
  EXPECT_EQ(n % 8, 0u) << "the data section must start 8-byte aligned";
  const std::string header(file.begin() + 8, file.begin() + 8 + static_cast<std::ptrdiff_t>(n));
  const std::size_t json_end = header.find_last_not_of(' ') + 1;
  EXPECT_LT(header.size() - json_end, 8u) << "at most 7 spaces of padding";
  const auto j = nlohmann::ordered_json::parse(header.substr(0, json_end));
  EXPECT_EQ(header.substr(0, json_end), j.dump()) << "compact JSON, no spaces";

  // __metadata__ first, then I64, F64, F32 (A < a), BF16, F16, U8: dtype alignment descending, then name.
  std::vector<std::string> keys;
  for (const auto& item : j.items()) keys.push_back(item.key());
  EXPECT_EQ(keys, (std::vector<std::string>{"__metadata__", "i_i64", "c_f64", "A_f32", "a_f32", "z_bf16", "b_f16", "u_u8"}));
  EXPECT_EQ(j["__metadata__"], (nlohmann::ordered_json{{"format", "pt"}}));
  EXPECT_EQ(j["a_f32"].dump(), R"({"dtype":"F32","shape":[2,2],"data_offsets":[28,44]})");

  // Offsets tile the data section, and each tensor's bytes are its little-endian values.
  std::vector<std::uint8_t> expected_data;
  auto append = [&](const void* p, std::size_t count) {
    const auto* b = static_cast<const std::uint8_t*>(p);
    expected_data.insert(expected_data.end(), b, b + count);
  };
  const std::uint8_t i64[16] = {1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0};
  append(i64, 16);
  append(f64, 8);
  append(f32, 4);      // A_f32
  append(f32, 16);     // a_f32
  const std::uint8_t bf16_one[2] = {0x80, 0x3F};  // 1.0 = 0x3F80
  append(bf16_one, 2);
  const std::uint8_t f16[6] = {0x00, 0x3C, 0x00, 0xC0, 0x00, 0x38};  // 1.0, -2.0, 0.5
  append(f16, 6);
  const std::uint8_t u8[3] = {7, 8, 9};
  append(u8, 3);
  std::uint64_t offset = 0;
  for (std::size_t k = 1; k < keys.size(); ++k) {
    EXPECT_EQ(j[keys[k]]["data_offsets"][0].get<std::uint64_t>(), offset) << keys[k];
    offset = j[keys[k]]["data_offsets"][1].get<std::uint64_t>();
  }
  EXPECT_EQ(offset, expected_data.size());
  EXPECT_EQ(std::vector<std::uint8_t>(file.begin() + 8 + static_cast<std::ptrdiff_t>(n), file.end()), expected_data);
}

TEST(SafetensorsWriter, RejectsWhatCannotBeWritten) {
  SafetensorsWriter w;
  const float v[2] = {1, 2};
  w.add("x", {2}, v);
  expect_error([&] { w.add("x", {2}, v); }, {"already added"});
  expect_error([&] { w.add("__metadata__", {2}, v); }, {"reserved"});
  expect_error([&] { w.add("y", {2}, v, Dtype::I32); }, {"I32"});
  expect_error([&] { w.add_raw("z", {Dtype::F32, {3}, {0, 0, 0, 0}}); }, {"needs 12 bytes", "found 4"});
  expect_error([&] { w.add("n", {-1}, v); }, {"invalid shape"});
}

TEST(SafetensorsWriter, AnInterruptedWriteLeavesThePreviousFileIntact) {
  TempDir dir;
  const std::string path = dir / "model.safetensors";
  SafetensorsWriter w;
  const float v[3] = {1, 2, 3};
  w.add("w", {3}, v);
  w.write(path);
  const std::vector<std::uint8_t> before = io_test::read_file(path);

  // A writer that dies half way: the exception escapes, the old file is untouched, no temp file remains.
  expect_error(
      [&] {
        lora::io::write_file_atomically(path, [&](lora::io::FileSink& sink) {
          sink.write(before.data(), before.size() / 2);
          LORA_CHECK(false, "simulated crash");
        });
      },
      {"simulated crash"});
  EXPECT_EQ(io_test::read_file(path), before);
  int entries = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir.path())) {
    ++entries;
    EXPECT_EQ(e.path().filename(), "model.safetensors");
  }
  EXPECT_EQ(entries, 1);

  // A completed write replaces it.
  SafetensorsWriter w2;
  w2.add("w", {3}, v, Dtype::F16);
  w2.write(path);
  EXPECT_EQ(io_test::read_file(path), w2.to_bytes());
}

// ---- round trips -----------------------------------------------------------------------

TEST(SafetensorsRoundTrip, F32AndF64AreBitExact) {
  TempDir dir;
  std::vector<float> f = sample_floats(5000, 3);
  std::uint32_t nan_payload = 0x7FA00001u;  // a signalling NaN with a payload: bits must survive
  float nan;
  std::memcpy(&nan, &nan_payload, 4);
  for (float x : {0.0f, -0.0f, kInfF, -kInfF, nan, std::numeric_limits<float>::denorm_min()}) f.push_back(x);
  std::vector<double> d;
  std::mt19937_64 rng(5);
  for (int i = 0; i < 5000; ++i) {
    std::uint64_t u = rng();
    double x;
    std::memcpy(&x, &u, 8);
    d.push_back(x);
  }
  SafetensorsWriter w;
  w.add("f", {static_cast<std::int64_t>(f.size())}, f.data());
  w.add("d", {50, 100}, d.data());
  w.write(dir / "t.safetensors");
  const SafetensorsReader r = SafetensorsReader::open(dir / "t.safetensors");
  const std::vector<float> f_back = r.read<float>("f");
  ASSERT_EQ(f_back.size(), f.size());
  EXPECT_EQ(std::memcmp(f_back.data(), f.data(), f.size() * 4), 0);
  const std::vector<double> d_back = r.read<double>("d");
  EXPECT_EQ(std::memcmp(d_back.data(), d.data(), d.size() * 8), 0);
  EXPECT_EQ(r.info("d").shape, (std::vector<std::int64_t>{50, 100}));

  // Widening F32 -> double is exact; F64 -> float rounds to the nearest float.
  const std::vector<double> f_as_double = r.read<double>("f");
  const std::vector<float> d_as_float = r.read<float>("d");
  for (std::size_t i = 0; i < f.size(); ++i) {
    if (std::isnan(f[i])) continue;
    ASSERT_EQ(f_as_double[i], static_cast<double>(f[i]));
  }
  for (std::size_t i = 0; i < d.size(); ++i) {
    if (std::isnan(d[i])) continue;
    const float got = d_as_float[i];
    // No float lies strictly closer to d than the one read.
    const float up = std::nextafter(got, kInfF), down = std::nextafter(got, -kInfF);
    if (std::isfinite(got)) {
      ASSERT_LE(std::fabs(static_cast<double>(got) - d[i]), std::fabs(static_cast<double>(up) - d[i]));
      ASSERT_LE(std::fabs(static_cast<double>(got) - d[i]), std::fabs(static_cast<double>(down) - d[i]));
    } else {
      ASSERT_GE(std::fabs(d[i]), 0x1p128 - 0x1p103);
    }
  }
}

TEST(SafetensorsRoundTrip, F16AndBF16AreExactUpToRoundingToNearestEven) {
  const std::vector<float> f = sample_floats(20000, 9);
  std::vector<double> d;
  for (float x : f) d.push_back(static_cast<double>(x) * (1.0 + 0x1p-30));  // not floats: tests one rounding
  SafetensorsWriter w;
  w.add("h", {static_cast<std::int64_t>(f.size())}, f.data(), Dtype::F16);
  w.add("b", {static_cast<std::int64_t>(f.size())}, f.data(), Dtype::BF16);
  w.add("hd", {static_cast<std::int64_t>(d.size())}, d.data(), Dtype::F16);
  w.add("bd", {static_cast<std::int64_t>(d.size())}, d.data(), Dtype::BF16);
  const SafetensorsReader r = SafetensorsReader::from_memory(w.to_bytes());
  const std::vector<float> h = r.read<float>("h"), b = r.read<float>("b"), hd = r.read<float>("hd"),
                           bd = r.read<float>("bd");
  for (std::size_t i = 0; i < f.size(); ++i) {
    ASSERT_EQ(bits(h[i]), bits(lora::io::half_to_float(reference_half(f[i])))) << std::hexfloat << f[i];
    ASSERT_EQ(bits(b[i]), bits(lora::io::bfloat16_to_float(reference_bf16(f[i])))) << std::hexfloat << f[i];
    ASSERT_EQ(bits(hd[i]), bits(lora::io::half_to_float(reference_half(d[i])))) << std::hexfloat << d[i];
    ASSERT_EQ(bits(bd[i]), bits(lora::io::bfloat16_to_float(reference_bf16(d[i])))) << std::hexfloat << d[i];
  }
  // A second round trip changes nothing: F16/BF16 values are exact in float.
  SafetensorsWriter again;
  again.add("h", {static_cast<std::int64_t>(h.size())}, h.data(), Dtype::F16);
  EXPECT_EQ(SafetensorsReader::from_memory(again.to_bytes()).read<float>("h"), h);
}

TEST(SafetensorsRoundTrip, StridedViewsMetadataAndRawTensors) {
  // A 3 x 4 window of a 3 x 6 buffer goes out as [3, 4] and comes back into another strided view.
  std::vector<double> buffer(18);
  for (std::size_t i = 0; i < buffer.size(); ++i) buffer[i] = static_cast<double>(i) * 0.5 - 3;
  const lora::MatrixView<const double> window(buffer.data() + 1, 3, 4, 6);
  SafetensorsWriter w;
  w.set_metadata("format", "pt");
  w.set_metadata("note", "caf\xC3\xA9 \"quoted\"\n");
  w.add("m", window);
  w.add_raw("ids", {Dtype::I64, {2}, {9, 0, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255, 255, 255, 255, 255}});
  w.add("scalar", std::vector<std::int64_t>{}, buffer.data());
  w.add("empty", {0, 5}, buffer.data());
  const SafetensorsReader r = SafetensorsReader::from_memory(w.to_bytes(), "strided");
  EXPECT_EQ(r.metadata(), w.metadata());
  std::vector<double> target(3 * 5, -1.0);
  r.read_into("m", lora::MatrixView<double>(target.data(), 3, 4, 5));
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 4; ++j) EXPECT_EQ(target[i * 5 + j], buffer[i * 6 + 1 + j]);
    EXPECT_EQ(target[i * 5 + 4], -1.0) << "outside the view: untouched";
  }
  EXPECT_EQ(r.read_raw("ids").dtype, Dtype::I64);
  EXPECT_EQ(r.read_raw("ids").bytes,
            (std::vector<std::uint8_t>{9, 0, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255, 255, 255, 255, 255}));
  EXPECT_EQ(r.info("scalar").numel, 1u);
  EXPECT_EQ(r.read<double>("scalar"), std::vector<double>{buffer[0]});
  EXPECT_EQ(r.info("empty").numel, 0u);
  EXPECT_TRUE(r.read<float>("empty").empty());
  expect_error([&] { (void)r.read<float>("ids"); }, {"\"ids\"", "I64"});
  expect_error([&] { (void)r.read<float>("missing"); }, {"strided", "no tensor named \"missing\""});
  std::vector<float> wrong(12);
  expect_error([&] { r.read_into("m", lora::MatrixView<float>(wrong.data(), 4, 3)); }, {"\"m\"", "[3, 4]", "[4, 3]"});
}

// ---- malformed files: one per check, then every truncation ----------------------------------

// A valid file: "a" F32 [2] at [0, 8), "b" F16 [3] at [8, 14), with metadata.
const std::string kGoodHeader =
    R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
    R"("b":{"dtype":"F16","shape":[3],"data_offsets":[8,14]}})";

std::vector<std::uint8_t> data_bytes(std::size_t n) {
  std::vector<std::uint8_t> out(n);
  for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<std::uint8_t>(0x3C + i);
  return out;
}

void expect_rejected(const std::vector<std::uint8_t>& file, std::initializer_list<std::string> parts) {
  expect_error([&] { (void)SafetensorsReader::from_memory(file, "bad.safetensors"); }, parts);
}
void expect_rejected(const std::string& header, std::size_t data, std::initializer_list<std::string> parts) {
  expect_rejected(file_of(header, data_bytes(data)), parts);
}

TEST(SafetensorsMalformed, TheGoodFileIsAccepted) {
  const SafetensorsReader r = SafetensorsReader::from_memory(file_of(kGoodHeader, data_bytes(14)));
  ASSERT_EQ(r.tensors().size(), 2u);
  EXPECT_EQ(r.info("b").dtype, Dtype::F16);
  EXPECT_EQ(r.data_offset(), 8 + kGoodHeader.size());
}

TEST(SafetensorsMalformed, FileAndHeaderLength) {
  expect_rejected(std::vector<std::uint8_t>{1, 2, 3}, {"bad.safetensors", "file size", "3 bytes"});
  std::vector<std::uint8_t> huge = file_of("{}", {});
  huge[0] = 0x01;  // 100,000,001 = 0x05F5E101
  huge[1] = 0xE1;
  huge[2] = 0xF5;
  huge[3] = 0x05;
  expect_rejected(huge, {"header length", "100000001", "limit"});
  std::vector<std::uint8_t> past = file_of(kGoodHeader, data_bytes(14));
  past[0] = static_cast<std::uint8_t>(kGoodHeader.size() + 15);  // one byte more than the file holds
  expect_rejected(past, {"header length"});
  std::vector<std::uint8_t> all_ones(16, 0xFF);
  expect_rejected(all_ones, {"header length"});
}

TEST(SafetensorsMalformed, HeaderJson) {
  expect_rejected(" " + kGoodHeader, 14, {"header start"});
  expect_rejected("[]", 0, {"header start"});
  expect_rejected(R"({"a":{"dtype":"F32",)", 0, {"header JSON", "header byte"});
  expect_rejected("{\"\xFF\":{}}", 0, {"header JSON"});  // not UTF-8
  expect_rejected(kGoodHeader + "x", 14, {"header JSON"});
  expect_rejected(kGoodHeader + "{}", 14, {"header JSON"});
  expect_rejected(std::string("{\"a\"\0:1}", 8), 0, {"header JSON"});
}

TEST(SafetensorsMalformed, HeaderStructure) {
  expect_rejected(R"({"a":1})", 0, {"header structure", "\"a\"", "object"});
  expect_rejected(R"({"a":{"dtype":"F32","shape":[2]}})", 8, {"header structure", "\"a\"", "no data_offsets"});
  expect_rejected(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", 8, {"header structure", "no dtype"});
  expect_rejected(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}})", 8,
                  {"header structure", "unknown field \"x\""});
  expect_rejected(R"({"a":{"dtype":5,"shape":[2],"data_offsets":[0,8]}})", 8, {"header structure", "dtype to be a string"});
  expect_rejected(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8, {"header structure", "shape"});
  expect_rejected(R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", 8, {"header structure", "2.0"});
  expect_rejected(R"({"a":{"dtype":"F32","shape":[[2]],"data_offsets":[0,8]}})", 8, {"header structure", "array"});
  expect_rejected(R"({"a":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", 8, {"header structure", "shape"});
  expect_rejected(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}})", 8,
                  {"header structure", "more than two"});
  expect_rejected(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8]}})", 8, {"header structure", "1 entries"});
  expect_rejected(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":null}})", 8, {"header structure", "null"});
  expect_rejected(R"({"__metadata__":{"k":1}})", 0, {"header structure", "__metadata__", "\"k\""});
  expect_rejected(R"({"__metadata__":"pt"})", 0, {"header structure", "__metadata__"});
  expect_rejected(R"({"__metadata__":{"k":{"deep":"x"}}})", 0, {"header structure", "__metadata__"});
}

TEST(SafetensorsMalformed, DuplicateNames) {
  expect_rejected(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                  8, {"duplicate name", "\"a\""});
  expect_rejected(R"({"a":{"dtype":"F32","dtype":"F16","shape":[1],"data_offsets":[0,4]}})", 4,
                  {"duplicate name", "\"a\"", "dtype twice"});
  expect_rejected(R"({"__metadata__":{"k":"1","k":"2"}})", 0, {"duplicate name", "\"k\""});
  expect_rejected(R"({"__metadata__":{},"__metadata__":{}})", 0, {"duplicate name", "__metadata__"});
}

TEST(SafetensorsMalformed, DtypeShapeAndSizes) {
  expect_rejected(R"({"a":{"dtype":"F17","shape":[2],"data_offsets":[0,8]}})", 8, {"dtype", "\"a\"", "\"F17\"", "F32"});
  expect_rejected(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,8]}})", 8,
                  {"shape", "\"a\"", "64 bits"});
  expect_rejected(R"({"a":{"dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,8]}})", 8, {"shape", "2^63"});
  expect_rejected(R"({"a":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,8]}})", 8, {"shape", "\"a\""});
  expect_rejected(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8,
                  {"byte size", "\"a\"", "needs 12 bytes", "hold 8"});
  expect_rejected(R"({"a":{"dtype":"F64","shape":[2,0],"data_offsets":[0,8]}})", 8, {"byte size"});
}

TEST(SafetensorsMalformed, OffsetsOverlapsGapsAndCoverage) {
  expect_rejected(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8, {"data_offsets", "\"a\"", "begin is after end"});
  expect_rejected(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[4],"data_offsets":[8,16]}})",
                  14, {"data_offsets", "\"b\"", "ends past", "14 bytes"});
  expect_rejected(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,18446744073709551615]}})", 8, {"data_offsets", "\"a\""});
  expect_rejected(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[3],"data_offsets":[6,12]}})",
                  14, {"overlap", "\"b\"", "\"a\""});
  expect_rejected(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}})",
                  8, {"overlap", "\"e\""});
  expect_rejected(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[3],"data_offsets":[10,16]}})",
                  16, {"gap", "[8, 10)", "\"b\""});
  expect_rejected(R"({"b":{"dtype":"F16","shape":[3],"data_offsets":[2,8]}})", 8, {"gap", "[0, 2)"});
  expect_rejected(kGoodHeader, 18, {"coverage", "18 bytes", "[0, 14)"});
  expect_rejected("{}", 1, {"coverage"});
  // Zero-size tensors at a shared boundary and a scalar are fine.
  EXPECT_NO_THROW((void)SafetensorsReader::from_memory(file_of(
      R"({"e":{"dtype":"F32","shape":[0,3],"data_offsets":[0,0]},"s":{"dtype":"F64","shape":[],"data_offsets":[0,8]},)"
      R"("z":{"dtype":"U8","shape":[0],"data_offsets":[8,8]}})",
      data_bytes(8))));
}

TEST(SafetensorsMalformed, EveryTruncationAndEveryWrongLengthIsRejected) {
  SafetensorsWriter w;
  w.set_metadata("format", "pt");
  const float v[5] = {1, 2, 3, 4, 5};
  w.add("a", {5}, v);
  w.add("b", {2, 2}, v, Dtype::BF16);
  w.add("c", std::vector<std::int64_t>{}, v, Dtype::F64);
  const std::vector<std::uint8_t> good = w.to_bytes();
  ASSERT_EQ(good[1], 0) << "the header length below is read from byte 0 alone";
  ASSERT_NO_THROW((void)SafetensorsReader::from_memory(good));
  for (std::size_t k = 0; k < good.size(); ++k) {
    const std::vector<std::uint8_t> cut(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(k));
    EXPECT_THROW((void)SafetensorsReader::from_memory(cut), lora::Error) << "truncated to " << k << " bytes";
  }
  std::vector<std::uint8_t> longer = good;
  longer.push_back(0);
  expect_rejected(longer, {"coverage"});
  for (int delta : {-8, -1, 1, 8}) {  // a header length that is off moves every later boundary
    std::vector<std::uint8_t> shifted = good;
    shifted[0] = static_cast<std::uint8_t>(shifted[0] + delta);
    EXPECT_THROW((void)SafetensorsReader::from_memory(shifted), lora::Error) << "header length off by " << delta;
  }
  // The same through files on disk, at the section boundaries.
  TempDir dir;
  const std::size_t header_end = 8 + static_cast<std::size_t>(good[0]);
  for (std::size_t k : {std::size_t{0}, std::size_t{7}, std::size_t{8}, header_end - 1, header_end, good.size() - 1}) {
    io_test::write_file(dir / "cut.safetensors",
                        std::vector<std::uint8_t>(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(k)));
    EXPECT_THROW((void)SafetensorsReader::open(dir / "cut.safetensors"), lora::Error) << k;
  }
  expect_error([&] { (void)SafetensorsReader::open(dir / "missing.safetensors"); }, {"cannot open"});
}

TEST(SafetensorsReader, AFileThatShrinksAfterOpeningIsCaught) {
  TempDir dir;
  SafetensorsWriter w;
  const float v[4] = {1, 2, 3, 4};
  w.add("a", {4}, v);
  w.write(dir / "t.safetensors");
  const SafetensorsReader r = SafetensorsReader::open(dir / "t.safetensors");
  std::vector<std::uint8_t> bytes = io_test::read_file(dir / "t.safetensors");
  bytes.resize(bytes.size() - 4);
  io_test::write_file(dir / "t.safetensors", bytes);
  expect_error([&] { (void)r.read<float>("a"); }, {"changed since it was opened"});
}

// ---- issue 9: NUL bytes, chunked reads, deep index files, temporaries and permissions -------

TEST(SafetensorsMalformed, ANulByteInTheHeaderIsRefusedWhateverFollowsIt) {
  // A complete header, then a NUL and junk within the header length: the JSON parser stopped at the NUL.
  std::string header = kGoodHeader + std::string(1, '\0') + "junk{[\"";
  header.append((8 - header.size() % 8) % 8, ' ');
  expect_rejected(header, 14, {"bad.safetensors", "header JSON", "NUL", std::to_string(kGoodHeader.size())});
  // Nesting 100,000 deep in the header is refused by its grammar, at the second level.
  expect_rejected(R"({"__metadata__":)" + std::string(100'000, '[') + std::string(100'000, ']') + "}", 0,
                  {"header structure", "__metadata__"});
}

TEST(SafetensorsReader, ReadsInChunksAcrossRowsAndStridesExactly) {
  // 3 x 200,000 F32 = 2.4 MB: more than one 1 MiB chunk, chunk edges in the middle of rows.
  constexpr std::int64_t rows = 3, cols = 200'000;
  std::vector<float> v(rows * cols);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i) * 0.5f - 7.0f;
  SafetensorsWriter w;
  w.add("big", {rows, cols}, v.data());
  TempDir dir;
  w.write(dir / "big.safetensors");
  for (const SafetensorsReader& r : {SafetensorsReader::open(dir / "big.safetensors"), SafetensorsReader::from_memory(w.to_bytes())}) {
    EXPECT_EQ(r.read<float>("big"), v);
    std::vector<float> strided(rows * (cols + 3), -1.0f);
    r.read_into("big", lora::MatrixView<float>(strided.data(), rows, cols, cols + 3));
    for (std::int64_t i = 0; i < rows; ++i) {
      EXPECT_EQ(std::memcmp(&strided[i * (cols + 3)], &v[i * cols], cols * sizeof(float)), 0) << "row " << i;
      EXPECT_EQ(strided[i * (cols + 3) + cols], -1.0f) << "the padding after row " << i << " was written";
    }
  }
}

TEST(SafetensorsIndex, IsParsedWithBoundedDepthAndCheckedShardNames) {
  const lora::io::SafetensorsIndex index = lora::io::parse_safetensors_index(
      R"({"metadata": {"total_size": 16}, "weight_map": {"b": "model-2.safetensors", "a": "model-1.safetensors"}})",
      "model.safetensors.index.json");
  ASSERT_EQ(index.weight_map.size(), 2u);
  EXPECT_EQ(index.weight_map[0], (std::pair<std::string, std::string>{"b", "model-2.safetensors"})) << "file order";
  EXPECT_EQ(index.json.at("metadata").at("total_size"), 16);
  auto rejected = [](const std::string& text, std::initializer_list<std::string> parts) {
    expect_error([&] { (void)lora::io::parse_safetensors_index(text, "model.safetensors.index.json"); }, parts);
  };
  // 100,000 levels: a stack overflow in lora-tool's parse before.
  rejected(R"({"metadata": )" + std::string(100'000, '[') + std::string(100'000, ']') + R"(, "weight_map": {}})",
           {"model.safetensors.index.json", "nested deeper than 64"});
  rejected(R"({"weight_map": {"a": "../secret.safetensors"}})", {"\"a\"", "\"../secret.safetensors\"", "not a file name"});
  rejected(R"({"weight_map": {"a": ["x"]}})", {"\"a\"", "[\"x\"]", "expected a file name"});
  rejected(R"({"weight_map": {"a": ")" + std::string(1 << 20, 'x') + "/\"}}", {"not a file name", "1048577 bytes"});
  rejected(R"({"metadata": {}})", {"weight_map"});
  rejected("{\"weight_map\": ", {"not valid JSON"});
  TempDir dir;
  std::filesystem::create_directory(dir / "index.json");
  expect_error([&] { (void)lora::io::read_safetensors_index(dir / "index.json"); }, {dir / "index.json", "directory"});
}

TEST(SafetensorsWriter, KeepsAReplacedFilesPermissionsAndRemovesStaleTemporaries) {
  TempDir dir;
  const std::string path = dir / "model.safetensors";
  SafetensorsWriter w;
  const float v[2] = {1, 2};
  w.add("w", {2}, v);
  w.write(path);
  ASSERT_EQ(::chmod(path.c_str(), 0600), 0);
  // A temporary whose writer is gone (a killed save), one of a live writer (pid 1), one of another name.
  const std::string stale = dir / ".model.safetensors.tmp.2147483646.0", live = dir / ".model.safetensors.tmp.1.0",
                    other = dir / ".other.safetensors.tmp.2147483646.0";
  for (const std::string& p : {stale, live, other}) io_test::write_file(p, std::string("half"));
  w.write(path);
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0600u) << "re-writing a 0600 file widened its permissions";
  EXPECT_FALSE(std::filesystem::exists(stale)) << "a dead writer's temporary was left behind";
  EXPECT_TRUE(std::filesystem::exists(live)) << "a live writer's temporary was removed";
  EXPECT_TRUE(std::filesystem::exists(other)) << "another file's temporary was removed";
}

}  // namespace
