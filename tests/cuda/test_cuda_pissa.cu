// PiSSA and OLoRA on the GPU (adapters/init.hpp): W is fetched from the device,
// decomposed on the host exactly as on the CPU (so A and B equal the CPU's
// bit for bit for an fp32 W), and the residual W - s B A is written on the
// device by add_delta; residual + s B A is W again to the type's rounding.
// bf16: the decomposition sees the bf16 W widened to fp32, the residual is
// rounded once to bf16.
#include <gtest/gtest.h>

#include <string>
#include <type_traits>
#include <vector>

#include "cuda/cuda_test_util.cuh"

namespace {

using namespace lora::cuda::testing;  // NOLINT(google-build-using-namespace)
using lora::Config;
using lora::HostSpace;
using lora::Init;
using lora::MatrixView;
using lora::cuda::Matrix;
using bf16 = __nv_bfloat16;

constexpr std::int64_t kIn = 53, kOut = 45;
constexpr int kRank = 5;

template <class T>
class CudaPissa : public CudaTest {};
using Types = ::testing::Types<float, bf16>;
TYPED_TEST_SUITE(CudaPissa, Types);

TYPED_TEST(CudaPissa, InitOnTheGpuRebuildsWAndMatchesTheCpu) {
  using T = TypeParam;
  auto& ctx = this->ctx();
  for (const auto& [init, niter] : {std::pair{Init::pissa, 0}, std::pair{Init::pissa, 3}, std::pair{Init::olora, 0}}) {
    for (bool fan_in_fan_out : {false, true}) {
      SCOPED_TRACE(lora::to_string(init, niter) + (fan_in_fan_out ? ", fan_in_fan_out" : ""));
      Config c;
      c.r = kRank;
      c.alpha = 10.0;
      c.init = init;
      c.pissa_niter = niter;
      c.fan_in_fan_out = fan_in_fan_out;
      c.seed = 7;
      const std::int64_t rows = fan_in_fan_out ? kIn : kOut, cols = fan_in_fan_out ? kOut : kIn;
      const std::vector<float> W = round_to<T>(uniform(static_cast<std::size_t>(rows * cols), 31));

      Matrix<T> gpu_W = upload<T>(ctx, W, rows, cols);
      lora::cuda::Linear<T> gpu(ctx, gpu_W.view(), {}, c, /*stream=*/2);
      lora::cpu::Context cpu_ctx;
      std::vector<float> cpu_W = W;
      lora::cpu::Linear<float> cpu(cpu_ctx, MatrixView<float>(cpu_W.data(), rows, cols), {}, c, /*stream=*/2);

      // The same host decomposition of the same values.
      const std::vector<float> A = download(ctx, gpu.A()), B = download(ctx, gpu.B());
      EXPECT_EQ(A, std::vector<float>(cpu.A().data, cpu.A().data + cpu.A().size()));
      EXPECT_EQ(B, std::vector<float>(cpu.B().data, cpu.B().data + cpu.B().size()));

      // residual + s B A = W.
      const std::vector<double> residual = download<double>(ctx, gpu.W());
      std::vector<double> rebuilt(residual.size());
      for (std::int64_t o = 0; o < kOut; ++o) {
        for (std::int64_t i = 0; i < kIn; ++i) {
          double delta = 0.0;
          for (int k = 0; k < kRank; ++k) delta += static_cast<double>(B[o * kRank + k]) * A[k * kIn + i];
          const std::int64_t at = fan_in_fan_out ? i * kOut + o : o * kIn + i;
          rebuilt[at] = residual[at] + gpu.scale() * delta;
        }
      }
      const double tol = std::is_same_v<T, float> ? 1e-6 : 1e-2;
      EXPECT_LE(rel_err(rebuilt, W), tol);
      EXPECT_GT(rel_err(residual, W), 0.1) << "W was not rewritten to the residual";
    }
  }
}

}  // namespace
