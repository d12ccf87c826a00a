// DataParallel<T, cuda::Backend>: the bucket packed and unpacked on the GPU,
// summed by a communicator of host memory (through a host copy) or of device
// memory (directly), with Replicas (tests/dist_test_util.hpp) standing in for
// the other ranks; and, where NCCL is found, lora::dist::Nccl on one rank.
// Host C++, as test_cuda_host.cpp; skipped where no GPU is visible.
#include <gtest/gtest.h>

#include <lora/dist/data_parallel.hpp>
#include <string>
#include <vector>

#include "cuda/cuda_test_util.cuh"
#include "dist_test_util.hpp"
#ifdef LORA_TEST_NCCL
#include <lora/dist/nccl.hpp>
#endif

namespace {

using namespace lora::cuda::testing;  // NOLINT(google-build-using-namespace)
using lora::cuda::Matrix;
using DeviceParallel = lora::dist::DataParallel<float, lora::cuda::Backend>;

class CudaDataParallel : public CudaTest {
 protected:
  // Two parameters of odd shapes, their values and gradients from the host.
  void SetUp() override {
    CudaTest::SetUp();
    if (IsSkipped()) return;
    values_ = {uniform(15, 1), uniform(14, 2)};
    grads_ = {uniform(15, 3), uniform(14, 4)};
    v1_ = upload<float>(ctx(), values_[0], 3, 5);
    g1_ = upload<float>(ctx(), grads_[0], 3, 5);
    v2_ = upload<float>(ctx(), values_[1], 7, 2);
    g2_ = upload<float>(ctx(), grads_[1], 7, 2);
  }
  std::vector<lora::Parameter<float, lora::cuda::DeviceSpace>> params() {
    return {{v1_.view(), g1_.view(), "a"}, {v2_.view(), g2_.view(), "b"}};
  }
  // ranks replicas of this process, summing in device memory with the backend's own scale.
  lora::test::Replicas device_replicas(int ranks) {
    return lora::test::Replicas(ranks, [this](void* data, std::size_t n, bool is_double, double factor) {
      const auto cols = static_cast<std::int64_t>(n);
      if (is_double) {
        lora::cuda::Backend::scale(ctx(), lora::MatrixView<double, lora::cuda::DeviceSpace>(static_cast<double*>(data), 1, cols), factor);
      } else {
        lora::cuda::Backend::scale(ctx(), lora::MatrixView<float, lora::cuda::DeviceSpace>(static_cast<float*>(data), 1, cols), factor);
      }
      ctx().synchronize();
    });
  }
  void expect_gradients_unchanged(const char* what) {
    EXPECT_LE(rel_err(download(ctx(), g1_), grads_[0]), 1e-6) << what;
    EXPECT_LE(rel_err(download(ctx(), g2_), grads_[1]), 1e-6) << what;
    EXPECT_EQ(download(ctx(), v1_), values_[0]) << what;
  }

  std::vector<std::vector<float>> values_, grads_;
  Matrix<float> v1_, g1_, v2_, g2_;
};

TEST_F(CudaDataParallel, HostCommunicatorThroughAHostCopy) {
  lora::test::Replicas three(3);
  DeviceParallel dp(ctx(), three, params());
  EXPECT_EQ(dp.bucket_elements(), 15u + 14u + 1u);
  EXPECT_EQ(dp.allreduce_gradients(4), 12.0);  // 3 ranks of 4 rows: each gradient back to itself
  EXPECT_EQ(three.sums, 1);
  expect_gradients_unchanged("host communicator");
  dp.broadcast_parameters();
  EXPECT_TRUE(dp.parameters_identical());
  expect_gradients_unchanged("after broadcast");
}

TEST_F(CudaDataParallel, DeviceCommunicatorDirectly) {
  lora::test::Replicas two = device_replicas(2);
  DeviceParallel dp(ctx(), two, params());
  EXPECT_EQ(dp.allreduce_gradients(5), 10.0);
  EXPECT_EQ(two.sums, 1);
  expect_gradients_unchanged("device communicator");
  EXPECT_TRUE(dp.parameters_identical());
}

#ifdef LORA_TEST_NCCL
TEST_F(CudaDataParallel, NcclOnOneRank) {
  lora::dist::SingleProcess bootstrap;
  lora::dist::Nccl nccl(bootstrap, /*device=*/0);
  EXPECT_NE(nccl.describe().find("NCCL"), std::string::npos) << nccl.describe();
  EXPECT_EQ(nccl.memory(), lora::dist::Memory::device);
  Matrix<float> x = upload<float>(ctx(), {1.5f, -2.0f, 3.25f}, 1, 3);
  ctx().synchronize();
  nccl.allreduce_sum(x.view().data, 3);  // one rank: the sum is the value
  nccl.broadcast(x.view().data, 3 * sizeof(float), 0);
  nccl.barrier();
  EXPECT_EQ(download(ctx(), x), (std::vector<float>{1.5f, -2.0f, 3.25f}));
  DeviceParallel dp(ctx(), nccl, params());
  EXPECT_EQ(dp.allreduce_gradients(7), 7.0);
  expect_gradients_unchanged("NCCL, one rank");
  EXPECT_TRUE(dp.parameters_identical());
}
#endif

}  // namespace
