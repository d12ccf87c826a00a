// Helpers shared by the tests: a temporary directory, raw file access that
// does not go through lora::io, test data, expect_error. The test files of a
// binary are compiled as one unit (UNITY_BUILD, tests/CMakeLists.txt): a helper
// two of them need lives here, not twice in their anonymous namespaces.
#pragma once

#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <cstring>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "lora/core/error.hpp"
#include "lora/core/matrix_view.hpp"

namespace io_test {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr float kInfF = std::numeric_limits<float>::infinity();

// Uniform values in [-1, 1) from a seeded generator, row by row.
template <class T>
void fill_random(lora::MatrixView<T> v, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> dist(-1.0, 1.0);
  for (std::int64_t i = 0; i < v.rows; ++i)
    for (std::int64_t j = 0; j < v.cols; ++j) v(i, j) = static_cast<T>(dist(gen));
}

// The bytes of a view's elements, row by row, as a compact file stores them.
template <class T>
std::vector<std::uint8_t> bytes_of(lora::MatrixView<const T> v) {
  std::vector<std::uint8_t> out(static_cast<std::size_t>(v.rows * v.cols) * sizeof(T));
  for (std::int64_t i = 0; i < v.rows; ++i)
    std::memcpy(out.data() + static_cast<std::size_t>(i * v.cols) * sizeof(T), v.data + i * v.stride,
                static_cast<std::size_t>(v.cols) * sizeof(T));
  return out;
}

// A merge by its definition, a naive loop in double over W as stored (d_out x d_in,
// or d_in x d_out with fan_in_fan_out): V = W + factor s B A (each element of B A
// a dot product of a row of B and a column of A); for a DoRA module (m.dora())
// every output o of V, a row (a column with fan_in_fan_out), is then scaled to
// norm m[o]: W' = m[o] / ||V_o|| * V_o. Module: lora::io::AdapterModule.
template <class Module>
std::vector<double> naive_merge(const std::vector<double>& W, const Module& m, bool fan_in_fan_out, double factor) {
  const std::int64_t cols = fan_in_fan_out ? m.d_out() : m.d_in();  // of W as stored
  auto at = [&](std::vector<double>& v, std::int64_t o, std::int64_t in) -> double& {
    return v[static_cast<std::size_t>(fan_in_fan_out ? in * cols + o : o * cols + in)];
  };
  std::vector<double> out = W;
  for (std::int64_t o = 0; o < m.d_out(); ++o)
    for (std::int64_t in = 0; in < m.d_in(); ++in) {
      double dot = 0;
      for (int k = 0; k < m.r; ++k) dot += static_cast<double>(m.B(o, k)) * static_cast<double>(m.A(k, in));
      at(out, o, in) += factor * m.scale * dot;
    }
  if (m.dora()) {
    for (std::int64_t o = 0; o < m.d_out(); ++o) {
      double sum = 0;
      for (std::int64_t in = 0; in < m.d_in(); ++in) sum += at(out, o, in) * at(out, o, in);
      for (std::int64_t in = 0; in < m.d_in(); ++in) at(out, o, in) *= static_cast<double>(m.magnitude(0, o)) / std::sqrt(sum);
    }
  }
  return out;
}

// A fresh directory, removed with everything in it at the end of the scope.
class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    const auto base = std::filesystem::temp_directory_path();
    for (int attempt = 0;; ++attempt) {
      path_ = base / ("lora-io-test-" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) + "-" +
                      std::to_string(std::rand()) + "-" + std::to_string(counter++));
      if (std::filesystem::create_directory(path_) || attempt > 100) break;
    }
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  std::string operator/(const std::string& name) const { return (path_ / name).string(); }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

inline std::vector<std::uint8_t> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.is_open()) << "cannot open " << path;
  return std::vector<std::uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

inline void write_file(const std::string& path, const std::vector<std::uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}
inline void write_file(const std::string& path, const std::string& text) {
  write_file(path, std::vector<std::uint8_t>(text.begin(), text.end()));
}

// Runs f, expects a lora::Error (any other exception escapes and fails the
// test), and checks that its message contains every one of `parts`.
template <class F>
void expect_error(F&& f, std::initializer_list<std::string> parts) {
  try {
    f();
  } catch (const lora::Error& e) {
    const std::string message = e.what();
    for (const std::string& part : parts)
      EXPECT_NE(message.find(part), std::string::npos) << "message \"" << message << "\" lacks \"" << part << "\"";
    return;
  }
  ADD_FAILURE() << "expected a lora::Error mentioning \"" << *parts.begin() << "\"";
}

// The real PEFT fixtures (LORA_FIXTURES_DIR, set by tests/CMakeLists.txt), or "" when absent.
inline std::string fixtures_dir() {
  const char* dir = std::getenv("LORA_FIXTURES_DIR");
  if (dir == nullptr || !std::filesystem::is_directory(dir)) return "";
  return dir;
}

}  // namespace io_test
