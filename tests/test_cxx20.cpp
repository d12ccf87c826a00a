// Built as C++20 (the rest of the suite is C++17): the headers compile clean
// under both, and the Backend concept accepts the CPU backend and rejects
// types that are not backends.
#include <gtest/gtest.h>

#include <vector>

#include "lora/lora.hpp"

static_assert(__cplusplus >= 202002L, "this translation unit must be compiled as C++20");
static_assert(lora::Backend<lora::cpu::Backend>);
static_assert(!lora::Backend<int>);
static_assert(!lora::Backend<lora::cpu::Context>);

namespace {

TEST(Cxx20, LayerRunsUnderCxx20) {
  lora::cpu::Context ctx;
  std::vector<float> W(3 * 4, 0.5f), x(2 * 4, 1.0f), y(2 * 3, -1.0f);
  lora::Config config;
  config.r = 2;
  lora::cpu::Linear<float> layer(ctx, {W.data(), 3, 4}, {}, config);
  layer.forward({x.data(), 2, 4}, {y.data(), 2, 3}, lora::Mode::eval);
  // B = 0, so y = x W^T = 4 * 0.5 * 1 = 2 exactly.
  for (float v : y) EXPECT_EQ(v, 2.0f);
}

}  // namespace
