// Data-parallel training over MPI, run by ctest as `mpirun -np 2 test_mpi`:
// every rank runs every test, each collective in the same order. The
// single-process reference runs inside each rank (SingleProcess: no
// communication), so one launch compares both.
//
// The model: two linear layers (W1: 24 x 16, W2: 8 x 24) with a ReLU between,
// r = 4 adapters on both, loss = mean over rows of 0.5 ||y - target||^2;
// AdamW with weight decay; 8 rows in all.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <lora/dist/data_parallel.hpp>
#include <lora/dist/mpi.hpp>
#include <lora/model.hpp>
#include <memory>
#include <string>
#include <vector>

namespace {

lora::dist::Communicator* g_world = nullptr;  // MPI_COMM_WORLD, set in main

constexpr int kDin = 16, kHidden = 24, kDout = 8, kRows = 8;

template <class T>
lora::cpu::Matrix<T> random_matrix(std::int64_t rows, std::int64_t cols, std::uint64_t stream, double std = 1.0) {
  lora::cpu::Matrix<T> m(rows, cols);
  for (std::int64_t k = 0; k < m.size(); ++k)
    m.data()[k] = static_cast<T>(std * lora::standard_normal(99, static_cast<std::uint32_t>(stream), 0, k));
  return m;
}

// The model, its optimizer, and one step's gradients on rows [begin, end) of the data.
template <class T>
struct Net {
  lora::cpu::Context ctx;
  lora::cpu::Matrix<T> W1 = random_matrix<T>(kHidden, kDin, 1, 0.25), W2 = random_matrix<T>(kDout, kHidden, 2, 0.2);
  lora::Model<T, lora::cpu::Backend> model{ctx};
  std::unique_ptr<lora::cpu::Adam<T>> adam;
  typename lora::Model<T, lora::cpu::Backend>::Set::ForwardState s1, s2;

  explicit Net(double dropout = 0.0, std::uint32_t rank = 0) {
    model.add_base("fc1", W1.view());
    model.add_base("fc2", W2.view());
    model.set_dropout_rank(rank);
    lora::io::PeftConfig config;
    config.r = 4;
    config.lora_alpha = 8;
    config.lora_dropout = dropout;
    config.target_modules = {"fc1", "fc2"};
    model.add_adapter("default", config, /*seed=*/7);  // one seed for all ranks: it keys the dropout masks too
    // B non-zero from the start, so both layers' A and B get gradients at step 1;
    // different on each rank, so the ranks start apart and broadcast_parameters must align them.
    for (const std::string& m : model.modules()) {
      auto B = model.module(m).get("default").lora_B().value;
      for (std::int64_t i = 0; i < B.rows; ++i)
        for (std::int64_t j = 0; j < B.cols; ++j)
          B(i, j) = static_cast<T>(0.1 * lora::standard_normal(5 + rank, m == "fc1" ? 1 : 2, 0, i * B.cols + j));
    }
    adam = std::make_unique<lora::cpu::Adam<T>>(ctx, lora::AdamOptions::adamw(1e-2, 0.01));
    adam->add_group(model.parameters());
  }

  // Forward and backward on rows [begin, end): gradients of the mean loss over those rows.
  void gradients(int begin, int end) {
    const std::int64_t n = end - begin;
    const auto x_all = random_matrix<T>(kRows, kDin, 3), t_all = random_matrix<T>(kRows, kDout, 4);
    lora::cpu::Matrix<T> x(n, kDin), t(n, kDout), h(n, kHidden), a(n, kHidden), y(n, kDout), dy(n, kDout),
        da(n, kHidden);
    for (std::int64_t i = 0; i < n; ++i) {
      for (int j = 0; j < kDin; ++j) x(i, j) = x_all(begin + i, j);
      for (int j = 0; j < kDout; ++j) t(i, j) = t_all(begin + i, j);
    }
    model.module("fc1").forward(x.view(), h.view(), s1);
    for (std::int64_t k = 0; k < h.size(); ++k) a.data()[k] = std::max(h.data()[k], T(0));
    model.module("fc2").forward(a.view(), y.view(), s2);
    for (std::int64_t k = 0; k < y.size(); ++k) dy.data()[k] = (y.data()[k] - t.data()[k]) / static_cast<T>(n);
    model.module("fc2").backward(s2, a.view(), dy.view(), da.view());
    for (std::int64_t k = 0; k < da.size(); ++k) da.data()[k] = h.data()[k] > T(0) ? da.data()[k] : T(0);
    model.module("fc1").backward(s1, x.view(), da.view(), {});
  }

  std::vector<T> values() {
    std::vector<T> out;
    for (const auto& p : model.parameters())
      for (std::int64_t i = 0; i < p.value.rows; ++i)
        for (std::int64_t j = 0; j < p.value.cols; ++j) out.push_back(p.value(i, j));
    return out;
  }
};

// max |a - b| / max |b|
template <class T>
double relative_difference(const std::vector<T>& a, const std::vector<T>& b) {
  double diff = 0.0, ref = 1e-30;
  for (std::size_t k = 0; k < a.size(); ++k) {
    diff = std::max(diff, std::fabs(static_cast<double>(a[k]) - static_cast<double>(b[k])));
    ref = std::max(ref, std::fabs(static_cast<double>(b[k])));
  }
  return diff / ref;
}

template <class T>
constexpr double kTolerance = std::is_same_v<T, float> ? 1e-6 : 1e-12;

// `steps` AdamW steps: the reference on all rows in one process, and the
// data-parallel net on this rank's rows [split[rank], split[rank + 1]); both
// clipped to max_norm. Checks the ranks' adapters are bit-identical at every
// step, and returns the largest relative difference from the reference and
// the largest relative difference of the gradient norms.
template <class T>
std::pair<double, double> train_side_by_side(const std::vector<int>& split, int steps, double max_norm) {
  lora::dist::Communicator& comm = *g_world;
  Net<T> reference, parallel(0.0, static_cast<std::uint32_t>(comm.rank()));
  lora::dist::DataParallel<T> dp(parallel.ctx, comm, parallel.model.parameters());
  dp.broadcast_parameters();
  EXPECT_EQ(relative_difference(parallel.values(), reference.values()), 0.0) << "rank 0's initial adapter everywhere";
  double norm_diff = 0.0;
  for (int step = 0; step < steps; ++step) {
    reference.gradients(0, kRows);
    const double reference_norm = reference.adam->clip_grad_norm(max_norm);
    reference.adam->step();
    const int begin = split[static_cast<std::size_t>(comm.rank())], end = split[static_cast<std::size_t>(comm.rank()) + 1];
    parallel.gradients(begin, end);
    EXPECT_EQ(dp.allreduce_gradients(end - begin), kRows);
    const double norm = parallel.adam->clip_grad_norm(max_norm);  // the global norm: every rank holds the mean gradient
    parallel.adam->step();
    norm_diff = std::max(norm_diff, std::fabs(norm - reference_norm) / reference_norm);
    EXPECT_TRUE(dp.parameters_identical()) << "the ranks' adapters differ after step " << step + 1;
  }
  const double diff = relative_difference(parallel.values(), reference.values());
  if (comm.rank() == 0)
    std::printf("  after %d steps: adapters differ from one process's by %.2e (relative), gradient norms by %.2e\n",
                steps, diff, norm_diff);
  return {diff, norm_diff};
}

template <class T>
class DataParallelTest : public ::testing::Test {};
using Types = ::testing::Types<float, double>;
TYPED_TEST_SUITE(DataParallelTest, Types);

TYPED_TEST(DataParallelTest, HalvesOfTheBatchEqualTheWholeBatch) {
  ASSERT_EQ(g_world->size(), 2) << "run under mpirun -np 2";
  const auto [diff, norm_diff] = train_side_by_side<TypeParam>({0, 4, 8}, 20, 1e9);
  EXPECT_LE(diff, kTolerance<TypeParam>) << "20 AdamW steps on halves vs one process on the whole batch";
  EXPECT_LE(norm_diff, kTolerance<TypeParam>);
}

TYPED_TEST(DataParallelTest, UnevenShardsAverageByRows) {
  const auto [diff, norm_diff] = train_side_by_side<TypeParam>({0, 3, 8}, 20, 1e9);
  EXPECT_LE(diff, kTolerance<TypeParam>) << "3 and 5 rows: the mean over all 8, not the mean of two means";
  EXPECT_LE(norm_diff, kTolerance<TypeParam>);
}

TYPED_TEST(DataParallelTest, ClipsByTheGlobalNorm) {
  // max_norm far below the gradient norm: every step is clipped; a rank
  // clipping its own shard's gradient would differ from the reference.
  const auto [diff, norm_diff] = train_side_by_side<TypeParam>({0, 3, 8}, 20, 1e-3);
  EXPECT_LE(diff, kTolerance<TypeParam>);
  EXPECT_LE(norm_diff, kTolerance<TypeParam>) << "the norm clip_grad_norm saw is the whole batch's";
}

// The control: averaging the two shards' mean gradients (each rank's count 1)
// is wrong for uneven shards, and the comparison must see it.
TEST(DataParallel, WrongWeightingIsSeen) {
  lora::dist::Communicator& comm = *g_world;
  Net<double> reference, parallel(0.0, static_cast<std::uint32_t>(comm.rank()));
  lora::dist::DataParallel<double> dp(parallel.ctx, comm, parallel.model.parameters());
  dp.broadcast_parameters();
  reference.gradients(0, kRows);
  reference.adam->step();
  const int begin = comm.rank() == 0 ? 0 : 3, end = comm.rank() == 0 ? 3 : 8;
  parallel.gradients(begin, end);
  dp.allreduce_gradients(1.0);  // wrong: a mean of means
  parallel.adam->step();
  EXPECT_GT(relative_difference(parallel.values(), reference.values()), 1e-6);
}

// A checkpoint written by rank 0 at 2 processes resumes in one process: the
// next step on the whole batch equals the next data-parallel step.
TEST(DataParallel, CheckpointAtTwoResumesAtOne) {
  lora::dist::Communicator& comm = *g_world;
  long long token = comm.rank() == 0 ? static_cast<long long>(::getpid()) : 0;  // one file name for all ranks
  comm.broadcast(&token, sizeof token, 0);
  const std::string path =
      (std::filesystem::temp_directory_path() / ("lora_dp_" + std::to_string(token) + ".ckpt")).string();

  Net<double> parallel(0.0, static_cast<std::uint32_t>(comm.rank()));
  lora::dist::DataParallel<double> dp(parallel.ctx, comm, parallel.model.parameters());
  dp.broadcast_parameters();
  auto step = [&] {
    const int begin = comm.rank() == 0 ? 0 : 3, end = comm.rank() == 0 ? 3 : 8;
    parallel.gradients(begin, end);
    dp.allreduce_gradients(end - begin);
    parallel.adam->clip_grad_norm(1.0);
    parallel.adam->step();
  };
  for (int k = 0; k < 10; ++k) step();
  if (comm.rank() == 0) parallel.model.save_checkpoint(path, *parallel.adam);
  comm.barrier();  // the file is complete before anyone reads it

  Net<double> resumed;  // one process, a fresh model built the same way
  resumed.model.load_checkpoint(path, *resumed.adam);
  EXPECT_EQ(relative_difference(resumed.values(), parallel.values()), 0.0);
  step();
  resumed.gradients(0, kRows);
  resumed.adam->clip_grad_norm(1.0);
  resumed.adam->step();
  EXPECT_LE(relative_difference(resumed.values(), parallel.values()), 1e-12);
  EXPECT_EQ(resumed.adam->step_count(), parallel.adam->step_count());
  comm.barrier();
  if (comm.rank() == 0) std::filesystem::remove(path);
}

// Dropout: the rank enters the mask, so ranks given the same rows draw
// different masks; rank 0 draws a single-process run's; a rebuilt run draws
// the same again.
TEST(DataParallel, DropoutMasksDifferPerRankAndRepeat) {
  lora::dist::Communicator& comm = *g_world;
  auto outputs = [&](std::uint32_t rank) {
    Net<double> net(0.5, rank);
    lora::dist::DataParallel<double> dp(net.ctx, comm, net.model.parameters());
    dp.broadcast_parameters();  // the same A and B on every rank
    const auto x = random_matrix<double>(kRows, kDin, 3);
    lora::cpu::Matrix<double> h(kRows, kHidden);
    net.model.module("fc1").forward(x.view(), h.view(), net.s1);
    return std::vector<double>(h.data(), h.data() + h.size());
  };
  const std::vector<double> mine = outputs(static_cast<std::uint32_t>(comm.rank()));
  std::vector<double> rank0 = mine;
  comm.broadcast(rank0.data(), rank0.size() * sizeof(double), 0);
  if (comm.rank() != 0) {
    EXPECT_GT(relative_difference(mine, rank0), 1e-3) << "rank " << comm.rank() << " drew rank 0's mask";
  }
  EXPECT_EQ(relative_difference(outputs(static_cast<std::uint32_t>(comm.rank())), mine), 0.0) << "not reproducible";
  EXPECT_EQ(relative_difference(outputs(0), rank0), 0.0) << "rank 0's masks depend on the process";
}

}  // namespace

int main(int argc, char** argv) {
  lora::dist::MpiSession session(&argc, &argv);
  lora::dist::Mpi world;
  g_world = &world;
  ::testing::InitGoogleTest(&argc, argv);
  if (world.rank() != 0) {  // one rank's report is enough; every rank's failures still fail the run
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  if (world.rank() == 0) std::printf("%s\n", world.describe().c_str());
  int failed = RUN_ALL_TESTS();
  double any = failed ? 1.0 : 0.0;
  world.allreduce_sum(&any, 1);
  if (any != 0.0 && world.rank() == 0) std::printf("FAILED on at least one rank\n");
  return any != 0.0 ? 1 : 0;
}
