// Eval forward from several threads on one shared lora::Model, under
// ThreadSanitizer (tests/CMakeLists.txt builds this file alone with
// -fsanitize=thread): 4 threads run AdapterSet::inference,
// AdapterSet::inference_mixed and Linear::inference on every module of one
// model, many times. A race makes TSan report it and the binary exit non-zero;
// every output must also equal the single-thread run's, bit for bit.
//
// The sizes keep every GEMM below the CPU backend's CBLAS threshold
// (cpu::detail::kCblasMinMacs, 2^15 multiply-adds) and far below Eigen's
// OpenMP threshold (~5e4 per thread), so all arithmetic is Eigen's own,
// single-threaded and instrumented: OpenBLAS and libgomp are not built with
// TSan, and their internal synchronisation would be invisible to it.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "lora/model.hpp"

namespace {

using Backend = lora::cpu::Backend;
template <class T>
using Matrix = lora::cpu::Matrix<T>;
using Bytes = std::vector<std::uint8_t>;

void fill_random(lora::MatrixView<float> v, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (std::int64_t i = 0; i < v.rows; ++i)
    for (std::int64_t j = 0; j < v.cols; ++j) v(i, j) = dist(gen);
}

Bytes bytes_of(const Matrix<float>& m) {
  Bytes out(m.bytes());
  std::memcpy(out.data(), m.data(), m.bytes());
  return out;
}

// A two-block model (d_model 16, MLP 24; the MLP's up projection has a bias),
// two adapters on every module, both active with weights; and a lora::Linear.
struct SharedModel {
  static constexpr std::int64_t kModel = 16, kMlp = 24, kRows = 6;
  struct Layer {
    const char* name;
    std::int64_t d_in, d_out;
  };
  static constexpr Layer kLayers[] = {{"blocks.0.attn.q", kModel, kModel}, {"blocks.0.mlp.up", kModel, kMlp},
                                      {"blocks.0.mlp.down", kMlp, kModel}, {"blocks.1.attn.q", kModel, kModel},
                                      {"blocks.1.mlp.up", kModel, kMlp},   {"blocks.1.mlp.down", kMlp, kModel}};
  // Row i of a mixed batch: "a" on rows 0, 1, 5 (gathered), "b" on 2, 3 (one run), row 4 the base.
  const std::vector<std::string> row_adapters = {"a", "a", "b", "b", "", "a"};

  lora::cpu::Context ctx;
  std::vector<Matrix<float>> weights;
  Matrix<float> up_bias{1, kMlp};
  lora::Model<float, Backend> model{ctx};
  Matrix<float> linear_W{kMlp, kModel};
  lora::Linear<float, Backend> linear{ctx, linear_W.view(), up_bias.view(), linear_config()};
  Matrix<float> x_model{kRows, kModel}, x_mlp{kRows, kMlp};

  SharedModel() {
    weights.reserve(std::size(kLayers));
    fill_random(up_bias.view(), 1);
    for (const Layer& l : kLayers) {
      weights.emplace_back(l.d_out, l.d_in);
      fill_random(weights.back().view(), 10 + weights.size());
      const bool up = std::string(l.name).find("up") != std::string::npos;
      model.add_base(l.name, weights.back().view(), up ? lora::MatrixView<const float>(up_bias.view()) : lora::MatrixView<const float>());
    }
    lora::io::PeftConfig a, b;
    a.target_modules_regex = b.target_modules_regex = "all-linear";
    a.r = 4;
    b.r = 2;
    b.lora_alpha = 3;
    model.add_adapter("a", a, 1);
    model.add_adapter("b", b, 2);
    model.set_adapter({{"a", 1.0}, {"b", -0.5}});
    for (const char* name : {"a", "b"})
      for (auto p : model.parameters(name))
        if (p.name.find(".lora_B.") != std::string::npos) fill_random(p.value, std::hash<std::string>{}(p.name));
    fill_random(linear_W.view(), 3);
    fill_random(linear.lora_B().value, 4);
    fill_random(x_model.view(), 5);
    fill_random(x_mlp.view(), 6);
  }
  static lora::Config linear_config() {
    lora::Config c;
    c.r = 3;
    c.dropout = 0.5;  // eval applies none
    return c;
  }

  // Every eval output of the model and the Linear, through const references only.
  static std::vector<Bytes> outputs(const SharedModel& m) {
    std::vector<Bytes> out;
    for (const Layer& l : kLayers) {
      const lora::AdapterSet<float, Backend>& set = m.model.module(l.name);
      const Matrix<float>& x = l.d_in == kModel ? m.x_model : m.x_mlp;
      Matrix<float> y(kRows, l.d_out), y_mixed(kRows, l.d_out);
      set.inference(x.view(), y.view());
      set.inference_mixed(x.view(), m.row_adapters, y_mixed.view());
      out.push_back(bytes_of(y));
      out.push_back(bytes_of(y_mixed));
    }
    Matrix<float> y(kRows, kMlp);
    m.linear.inference(m.x_model.view(), y.view());
    out.push_back(bytes_of(y));
    return out;
  }
};

TEST(ModelThreads, EvalForwardFromFourThreadsOnOneModelMatchesOneThread) {
  const SharedModel shared;
  const std::vector<Bytes> expected = SharedModel::outputs(shared);
  ASSERT_EQ(expected.size(), 2 * std::size(SharedModel::kLayers) + 1);
  ASSERT_NE(expected[0], expected[1]) << "the mixed batch differs from the weighted active set";

  constexpr int kThreads = 4, kIterations = 100;
  std::vector<int> mismatches(kThreads, 0);  // one slot per thread
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&shared, &expected, &mismatches, t] {
      for (int i = 0; i < kIterations; ++i)
        if (SharedModel::outputs(shared) != expected) ++mismatches[static_cast<std::size_t>(t)];
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(mismatches, std::vector<int>(kThreads, 0)) << "iterations whose outputs differ from one thread's, per thread";
}

}  // namespace
