// Test data on the CPU backend, beside io_test_util.hpp (which nvcc also
// compiles, so it stays free of Eigen).
#pragma once

#include <cstdint>
#include <random>

#include "io_test_util.hpp"
#include "lora/cpu/backend.hpp"

namespace io_test {

// rows x cols of U(lo, hi) from std::mt19937_64, in storage order: test data
// that does not come from the library's own generator.
template <class T>
lora::cpu::Matrix<T> random_matrix(std::int64_t rows, std::int64_t cols, std::uint64_t seed, double lo = -1.0,
                                   double hi = 1.0) {
  lora::cpu::Matrix<T> m(rows, cols);
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  for (std::int64_t i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(dist(gen));
  return m;
}

}  // namespace io_test
