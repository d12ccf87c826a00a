// Shared by the CUDA tests that run backend_ops.hpp / model_ops.hpp on the
// GPU and the CPU: the inputs (rounded to T) and the output comparisons.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

// <lora/cuda.hpp> (through the test util) before anything that includes Eigen:
// it sets EIGEN_NO_CUDA first.
#include "cuda/cuda_test_util.cuh"
// (keep this order)
#include "cuda/backend_ops.hpp"

namespace lora::cuda::testing {

using backend_ops::find_output;
using backend_ops::OpInputs;
using backend_ops::Outputs;

// Inputs rounded to T, so the CPU (fp32) and the GPU (T) start from the same numbers.
template <class T>
OpInputs make_inputs() {
  using backend_ops::kIn;
  using backend_ops::kOut;
  using backend_ops::kRows;
  OpInputs in;
  in.W = round_to<T>(uniform(static_cast<std::size_t>(kOut * kIn), 11, -0.15f, 0.15f));
  in.bias = round_to<T>(uniform(static_cast<std::size_t>(kOut), 12));
  in.x = round_to<T>(uniform(static_cast<std::size_t>(kRows * kIn), 13));
  in.x2 = round_to<T>(uniform(static_cast<std::size_t>(kRows * kIn), 14));
  in.dL_dy = round_to<T>(uniform(static_cast<std::size_t>(kRows * kOut), 15));
  in.dL_dy2 = round_to<T>(uniform(static_cast<std::size_t>(kRows * kOut), 16));
  const std::vector<lora::Config> configs = backend_ops::set_configs(0.0);
  for (std::size_t k = 0; k < configs.size(); ++k) {
    in.B.push_back(uniform(static_cast<std::size_t>(kOut * configs[k].r), 20 + k, -0.2f, 0.2f));
  }
  return in;
}

inline double norm(const std::vector<float>& v) {
  double s = 0.0;
  for (float x : v) s += static_cast<double>(x) * x;
  return std::sqrt(s);
}

// Every CPU output has a GPU output of the same name, size and values (to tol),
// and is not all zeros (a zero reference would let a zero output pass).
inline void expect_parity(const Outputs& cpu, const Outputs& gpu, double tol) {
  ASSERT_EQ(cpu.size(), gpu.size());
  for (const auto& [name, expected] : cpu) {
    const std::vector<float>* found = find_output(gpu, name);
    ASSERT_NE(found, nullptr) << name;
    EXPECT_GT(norm(expected), 0.0) << name << ": the CPU reference is all zeros";
    EXPECT_LE(rel_err(*found, expected), tol) << name;
  }
}

// Two outputs of one run agree to tol.
inline void expect_close(const Outputs& out, const std::string& a, const std::string& b, double tol) {
  const std::vector<float>*x = find_output(out, a), *y = find_output(out, b);
  ASSERT_TRUE(x != nullptr && y != nullptr) << a << ", " << b;
  EXPECT_LE(rel_err(*x, *y), tol) << a << " vs " << b;
}

}  // namespace lora::cuda::testing
