// Shared by the CUDA tests: the fixture that skips without a GPU, host data
// from the library's RNG, bf16 rounding, and the error metric
// ||gpu - cpu|| / ||cpu|| computed in double.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "lora/cuda.hpp"

namespace lora::cuda::testing {

// Every CUDA test derives from this: without a device it skips with a
// message, with one it holds a fresh Context (TF32 off).
class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (device_count() == 0) {
      GTEST_SKIP() << "no CUDA device visible (cudaGetDeviceCount found none): CUDA test skipped";
    }
    ctx_ = std::make_unique<Context>();
  }
  Context& ctx() { return *ctx_; }

 private:
  std::unique_ptr<Context> ctx_;
};

// n values uniform in [lo, hi), a pure function of (seed, n).
inline std::vector<float> uniform(std::size_t n, std::uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::vector<float> out(n);
  for (std::size_t i = 0; i < n; ++i) {
    out[i] = lo + (hi - lo) * uniform01(random_bits(seed, 7u, 0u, i));
  }
  return out;
}

// Values of T, returned as floats (exact: every bf16/fp16 value is a float).
template <class T>
std::vector<float> round_to(std::vector<float> v) {
  for (float& x : v) x = value_cast<float>(value_cast<T>(x));
  return v;
}

template <class To, class From>
std::vector<To> cast_all(const std::vector<From>& v) {
  std::vector<To> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = value_cast<To>(v[i]);
  return out;
}

// A device matrix holding the (rows x cols, contiguous) host values, converted to T.
template <class T>
Matrix<T> upload(Context& ctx, const std::vector<float>& host, std::int64_t rows, std::int64_t cols) {
  const std::vector<T> converted = cast_all<T>(host);
  return to_device(ctx, MatrixView<const T, HostSpace>(converted.data(), rows, cols));
}

// The device matrix's values as floats (or doubles), row-major.
template <class Out = float, class T>
std::vector<Out> download(Context& ctx, MatrixView<const T, DeviceSpace> device) {
  std::vector<T> host(static_cast<std::size_t>(device.rows * device.cols));
  Backend::copy_to_host(ctx, device, MatrixView<T, HostSpace>(host.data(), device.rows, device.cols));
  return cast_all<Out>(host);
}
template <class Out = float, class T>
std::vector<Out> download(Context& ctx, const Matrix<T>& device) {
  return download<Out>(ctx, device.view());
}

// Read-only views, for the ops whose inputs are views of const T.
template <class T>
MatrixView<const T, DeviceSpace> cview(MatrixView<T, DeviceSpace> v) {
  return v;
}
template <class T>
MatrixView<const T, DeviceSpace> cview(const Matrix<T>& m) {
  return m.view();
}

template <class T>
void poison(Context& ctx, MatrixView<T, DeviceSpace> x) {
  Backend::fill(ctx, x, value_cast<T>(std::numeric_limits<float>::quiet_NaN()));
}

// ||a - b|| / ||b|| in double; +inf when a holds a NaN (an unwritten element)
// or the sizes differ, so a poisoned output can never pass.
template <class A, class B>
double rel_err(const std::vector<A>& a, const std::vector<B>& b) {
  if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
  double diff = 0.0, ref = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double x = static_cast<double>(a[i]), y = static_cast<double>(b[i]);
    if (!std::isfinite(x)) return std::numeric_limits<double>::infinity();
    diff += (x - y) * (x - y);
    ref += y * y;
  }
  return ref == 0.0 ? (diff == 0.0 ? 0.0 : std::numeric_limits<double>::infinity()) : std::sqrt(diff / ref);
}

// The parity bounds of issue 3: fp32 with TF32 off, and 16-bit.
template <class T>
constexpr double parity_tolerance() {
  return std::is_same_v<T, float> ? 1e-5 : std::is_same_v<T, double> ? 1e-12 : 2e-2;
}

}  // namespace lora::cuda::testing
