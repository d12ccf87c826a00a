// DataParallel without MPI: SingleProcess leaves gradients bit for bit; a
// group of identical replicas (every rank the same shard) gives back the
// gradients, through one sum per step of one bucket; a host communicator and
// host tensors need no staging. (Real ranks: tests/mpi/test_data_parallel.cpp.)
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <string>
#include <lora/dist/data_parallel.hpp>
#include <lora/model.hpp>
#include <vector>

#include "cpu_test_util.hpp"
#include "dist_test_util.hpp"

namespace {

struct TwoLayers {
  lora::cpu::Context ctx;
  lora::cpu::Matrix<float> W1 = io_test::random_matrix<float>(12, 8, 1), W2 = io_test::random_matrix<float>(5, 12, 2);
  lora::cpu::Model<float> model{ctx};
  TwoLayers() {
    model.add_base("fc1", W1.view());
    model.add_base("fc2", W2.view());
    lora::io::PeftConfig config;
    config.r = 3;
    config.target_modules = {"fc1", "fc2"};
    model.add_adapter("default", config, 4);
    for (auto& p : model.parameters())  // values and gradients that are not all zero
      for (std::int64_t i = 0; i < p.value.rows; ++i)
        for (std::int64_t j = 0; j < p.value.cols; ++j) {
          p.value(i, j) = static_cast<float>(lora::standard_normal(3, 0, 0, static_cast<std::uint64_t>(i * 31 + j)));
          p.grad(i, j) = static_cast<float>(lora::standard_normal(4, 0, 0, static_cast<std::uint64_t>(i * 31 + j)));
        }
  }
  std::vector<float> grads() {
    std::vector<float> out;
    for (const auto& p : model.parameters())
      for (std::int64_t i = 0; i < p.grad.rows; ++i)
        for (std::int64_t j = 0; j < p.grad.cols; ++j) out.push_back(p.grad(i, j));
    return out;
  }
};

TEST(DataParallel, SingleProcessLeavesGradientsBitForBit) {
  TwoLayers net;
  lora::dist::SingleProcess one;
  lora::dist::DataParallel<float> dp(net.ctx, one, net.model.parameters());
  const std::vector<float> before = net.grads();
  EXPECT_EQ(dp.allreduce_gradients(17), 17.0);
  EXPECT_EQ(std::memcmp(before.data(), net.grads().data(), before.size() * sizeof(float)), 0);
  EXPECT_TRUE(dp.parameters_identical());
}

TEST(DataParallel, ReplicasAverageBackToTheirGradients) {
  TwoLayers net;
  lora::test::Replicas three(3);
  lora::dist::DataParallel<float> dp(net.ctx, three, net.model.parameters());
  // 2 layers x (A: 3 x d_in, B: d_out x 3) + the count
  EXPECT_EQ(dp.bucket_elements(), static_cast<std::size_t>(3 * (8 + 12) + 3 * (12 + 5) + 1));
  const std::vector<float> before = net.grads();
  EXPECT_EQ(dp.allreduce_gradients(5), 15.0);  // 3 ranks of 5 rows
  EXPECT_EQ(three.sums, 1) << "one bucket, one call";
  const std::vector<float> after = net.grads();
  for (std::size_t k = 0; k < before.size(); ++k) EXPECT_NEAR(after[k], before[k], 1e-6 * std::fabs(before[k]) + 1e-7);
}

TEST(DataParallel, BroadcastsAndComparesTheValues) {
  TwoLayers net;
  lora::test::Replicas two(2);
  lora::dist::DataParallel<float> dp(net.ctx, two, net.model.parameters());
  dp.broadcast_parameters();
  EXPECT_EQ(two.broadcasts, 1);
  EXPECT_TRUE(dp.parameters_identical());
}

TEST(DataParallel, RefusesNoRowsAnywhere) {
  TwoLayers net;
  lora::test::Replicas two(2);
  lora::dist::DataParallel<float> dp(net.ctx, two, net.model.parameters());
  EXPECT_THROW(dp.allreduce_gradients(0), lora::Error);
  EXPECT_THROW(dp.allreduce_gradients(-1), lora::Error);
}

TEST(DataParallel, RefusesADeviceCommunicatorForHostTensors) {
  TwoLayers net;
  lora::test::Replicas device(2, [](void*, std::size_t, bool, double) {});
  EXPECT_THROW(lora::dist::DataParallel<float>(net.ctx, device, net.model.parameters()), lora::Error);
}

}  // namespace

// The rank in the dropout key: rank 0 draws what a model that never heard of
// ranks draws; rank 1 other masks; set before or after add_adapter alike.
TEST(DataParallel, DropoutRankKeysTheMasks) {
  auto hidden = [](int rank, bool set_first) {
    lora::cpu::Context ctx;
    lora::cpu::Matrix<double> W = io_test::random_matrix<double>(6, 10, 1), x = io_test::random_matrix<double>(7, 10, 2);
    lora::cpu::Model<double> model(ctx);
    model.add_base("fc", W.view());
    if (set_first && rank >= 0) model.set_dropout_rank(static_cast<std::uint32_t>(rank));
    lora::io::PeftConfig config;
    config.r = 2;
    config.lora_dropout = 0.5;
    config.target_modules = {"fc"};
    model.add_adapter("default", config, 3);
    if (!set_first && rank >= 0) model.set_dropout_rank(static_cast<std::uint32_t>(rank));
    auto B = model.module("fc").get("default").lora_B().value;  // non-zero: the adapter path shows in y
    for (std::int64_t k = 0; k < B.rows * B.cols; ++k) B.data[k] = 0.5;
    lora::cpu::Matrix<double> y(7, 6);
    lora::cpu::Model<double>::Set::ForwardState state;
    model.module("fc").forward(x.view(), y.view(), state);
    return std::vector<double>(y.data(), y.data() + y.size());
  };
  EXPECT_EQ(hidden(0, true), hidden(-1, true));
  EXPECT_NE(hidden(1, true), hidden(0, true));
  EXPECT_EQ(hidden(1, true), hidden(1, false));
  EXPECT_EQ(hidden(1, true), hidden(1, true)) << "a rank's masks repeat";
}

// Every way an adapter joins the model takes the model's dropout rank.
TEST(DataParallel, DropoutRankReachesEveryNewAdapter) {
  lora::cpu::Context ctx;
  lora::cpu::Matrix<float> W = io_test::random_matrix<float>(6, 10, 1);
  lora::cpu::Model<float> model(ctx);
  model.add_base("fc", W.view());
  lora::io::PeftConfig config;
  config.r = 2;
  config.target_modules = {"fc"};
  model.add_adapter("first", config, 3);
  model.set_dropout_rank(3);
  EXPECT_EQ(model.module("fc").get("first").dropout_rank(), 3u);
  model.add_adapter("second", config, 3);
  model.add_weighted_adapter("combined", {{"first", 1.0}, {"second", 1.0}});
  const std::string dir = (std::filesystem::temp_directory_path() / ("lora_dp_rank_" + std::to_string(::getpid()))).string();
  model.save_peft("first", dir);
  model.load_peft(dir, "loaded");
  std::filesystem::remove_all(dir);
  for (const char* name : {"second", "combined", "loaded"})
    EXPECT_EQ(model.module("fc").get(name).dropout_rank(), 3u) << name;
}
