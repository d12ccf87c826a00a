// DoRA on the GPU against the CPU (tests/test_dora.cpp checks the CPU against
// a naive DoRA): the vector ops DoRA adds to the backend, then one DoRA layer
// on both backends from the same numbers — forward, backward (dL/dx, dL/dA,
// dL/dB, dL/dm), Adam steps, merge / unmerge — in fp32 (TF32 off, <= 1e-5)
// and bf16 / fp16 activations with fp32 masters (<= 2e-2), with dropout and
// fan_in_fan_out, at sizes that are not multiples of 8 or 16. GPU outputs
// are poisoned with NaN first, so an element never written fails.
#include <gtest/gtest.h>

#include <type_traits>
#include <vector>

#include "cuda/cuda_test_util.cuh"

namespace {

using namespace lora::cuda::testing;  // NOLINT(google-build-using-namespace)
using lora::Config;
using lora::HostSpace;
using lora::MatrixView;
using lora::Mode;
using lora::cuda::Backend;
using lora::cuda::DeviceSpace;
using lora::cuda::Matrix;
using bf16 = __nv_bfloat16;
using half = __half;
using Cpu = lora::cpu::Backend;

template <class T>
MatrixView<const T, HostSpace> hview(const std::vector<T>& v, std::int64_t rows, std::int64_t cols) {
  return {v.data(), rows, cols};
}
template <class T>
MatrixView<T, HostSpace> hview(std::vector<T>& v, std::int64_t rows, std::int64_t cols) {
  return {v.data(), rows, cols};
}
std::vector<float> host(MatrixView<const float, HostSpace> v) { return std::vector<float>(v.data, v.data + v.size()); }
// count values uniform in [lo, hi) (cuda_test_util's uniform, with a signed count).
std::vector<float> values(std::int64_t count, std::uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
  return uniform(static_cast<std::size_t>(count), seed, lo, hi);
}

class CudaDoraOps : public CudaTest {};

// scale_columns, scale_rows, column_dots, row_dots and magnitude_scale on
// both backends, beta 0 and 1, over a 37 x 45 window of a wider buffer.
TEST_F(CudaDoraOps, VectorOpsMatchTheCpu) {
  constexpr std::int64_t n = 37, d = 45, stride = 50;
  lora::cpu::Context cpu;
  auto& ctx = this->ctx();
  const std::vector<float> xs = values(n * stride, 1), ys = values(n * stride, 2), vc = values(d, 3),
                           vr = values(n, 4), out0 = values(d, 5), rows0 = values(n, 6);
  Matrix<float> gx = upload<float>(ctx, xs, n, stride), gy = upload<float>(ctx, ys, n, stride);
  const Matrix<float> gvc = upload<float>(ctx, vc, 1, d), gvr = upload<float>(ctx, vr, 1, n);
  const auto gxv = cview(gx.view().col_block(2, d)), gbv = cview(gy.view().col_block(0, d));
  const auto cxv = hview(xs, n, stride).col_block(2, d), cbv = hview(ys, n, stride).col_block(0, d);
  for (const double beta : {0.0, 1.0}) {
    SCOPED_TRACE(::testing::Message() << "beta " << beta);
    std::vector<float> c_cols = values(n * d, 7), c_rows = c_cols, c_cd = out0, c_rd = rows0;
    Matrix<float> g_cols = upload<float>(ctx, c_cols, n, d), g_rows = upload<float>(ctx, c_rows, n, d),
                  g_cd = upload<float>(ctx, c_cd, 1, d), g_rd = upload<float>(ctx, c_rd, 1, n);
    Cpu::scale_columns(cpu, hview(vc, 1, d), cxv, beta, hview(c_cols, n, d));
    Cpu::scale_rows(cpu, hview(vr, 1, n), cxv, beta, hview(c_rows, n, d));
    Cpu::column_dots(cpu, 0.5, cxv, cbv, beta, hview(c_cd, 1, d));
    Cpu::row_dots(cpu, 0.5, cxv, cbv, beta, hview(c_rd, 1, n));
    Backend::scale_columns(ctx, cview(gvc), gxv, beta, g_cols.view());
    Backend::scale_rows(ctx, cview(gvr), gxv, beta, g_rows.view());
    Backend::column_dots(ctx, 0.5, gxv, gbv, beta, g_cd.view());
    Backend::row_dots(ctx, 0.5, gxv, gbv, beta, g_rd.view());
    EXPECT_LE(rel_err(download(ctx, g_cols), c_cols), 1e-6);
    EXPECT_LE(rel_err(download(ctx, g_rows), c_rows), 1e-6);
    EXPECT_LE(rel_err(download(ctx, g_cd), c_cd), 1e-6);
    EXPECT_LE(rel_err(download(ctx, g_rd), c_rd), 1e-6);
  }
  // column_dots of bf16 into fp32, as DoRA's dL/dm does with 16-bit activations.
  const std::vector<float> a16 = round_to<bf16>(values(n * d, 8)), b16 = round_to<bf16>(values(n * d, 9));
  std::vector<float> c16(static_cast<std::size_t>(d));
  Cpu::column_dots(cpu, 1.0, hview(a16, n, d), hview(b16, n, d), 0.0, hview(c16, 1, d));
  const Matrix<bf16> ga16 = upload<bf16>(ctx, a16, n, d), gb16 = upload<bf16>(ctx, b16, n, d);
  Matrix<float> g16(1, d);
  Backend::column_dots(ctx, 1.0, cview(ga16), cview(gb16), 0.0, g16.view());
  EXPECT_LE(rel_err(download(ctx, g16), c16), 1e-6);

  const std::vector<float> m = values(d, 10), sq = values(d, 11, 1.0f, 2.0f), cross = values(d, 12);
  std::vector<float> inv_n(static_cast<std::size_t>(d)), c(static_cast<std::size_t>(d));
  Cpu::magnitude_scale(cpu, hview(m, 1, d), hview(sq, 1, d), hview(cross, 1, d), 0.5, hview(inv_n, 1, d), hview(c, 1, d));
  Matrix<float> ginv(1, d), gc(1, d);
  const Matrix<float> gm = upload<float>(ctx, m, 1, d), gsq = upload<float>(ctx, sq, 1, d),
                      gcross = upload<float>(ctx, cross, 1, d);
  Backend::magnitude_scale(ctx, cview(gm), cview(gsq), cview(gcross), 0.5, ginv.view(), gc.view());
  EXPECT_LE(rel_err(download(ctx, ginv), inv_n), 1e-7);
  EXPECT_LE(rel_err(download(ctx, gc), c), 1e-7);
}

constexpr std::int64_t kN = 37, kIn = 53, kOut = 45;
constexpr int kRank = 5;

template <class T>
class CudaDora : public CudaTest {};
using LayerTypes = ::testing::Types<float, bf16, half>;
TYPED_TEST_SUITE(CudaDora, LayerTypes);

TYPED_TEST(CudaDora, ParityWithCpuForForwardBackwardAdamAndMerge) {
  using T = TypeParam;
  const double tol = parity_tolerance<T>();
  auto& ctx = this->ctx();
  for (const bool fan : {false, true}) {
    SCOPED_TRACE(::testing::Message() << "fan_in_fan_out " << fan);
    Config config;
    config.r = kRank;
    config.alpha = 10.0;
    config.dropout = 0.2;
    config.fan_in_fan_out = fan;
    config.use_dora = true;
    config.seed = 31;
    const std::int64_t w_rows = fan ? kIn : kOut, w_cols = fan ? kOut : kIn;
    // Host values rounded to T, so both backends start from the same numbers.
    const std::vector<float> W = round_to<T>(values(kOut * kIn, 1, -0.15f, 0.15f)), bias = round_to<T>(values(kOut, 2)),
                             x = round_to<T>(values(kN * kIn, 3)), dL_dy = round_to<T>(values(kN * kOut, 4)),
                             B0 = values(kOut * kRank, 5, -0.2f, 0.2f);
    std::vector<float> cpu_W = W, cpu_y(static_cast<std::size_t>(kN * kOut)), cpu_dx(static_cast<std::size_t>(kN * kIn));
    lora::cpu::Context cpu_ctx;
    lora::cpu::Linear<float> cpu(cpu_ctx, hview(cpu_W, w_rows, w_cols), hview(bias, 1, kOut), config);
    Matrix<T> gW = upload<T>(ctx, W, w_rows, w_cols), gbias = upload<T>(ctx, bias, 1, kOut),
              gx = upload<T>(ctx, x, kN, kIn), gdy = upload<T>(ctx, dL_dy, kN, kOut), gy(kN, kOut), gdx(kN, kIn);
    lora::cuda::Linear<T> gpu(ctx, gW.view(), cview(gbias), config);
    // m starts at the row norms of W on both.
    EXPECT_LE(rel_err(download(ctx, gpu.magnitude()), host(cpu.magnitude())), tol) << "initial m";
    // B moved off zero and m off ||W|| (else c = 1 hides every DoRA term).
    Cpu::copy_from_host(cpu_ctx, hview(B0, kOut, kRank), cpu.lora_B().value);
    Backend::copy_from_host(ctx, hview(B0, kOut, kRank), gpu.lora_B().value);
    const auto options = lora::AdamOptions::adamw(1e-3, 0.1);
    lora::cpu::Adam<float> cpu_adam(cpu_ctx, options);
    lora::cuda::Adam<float> gpu_adam(ctx, options);
    cpu_adam.add_group(cpu.parameters());
    gpu_adam.add_group(gpu.parameters());
    EXPECT_EQ(gpu_adam.state_bytes(), 8u * static_cast<std::size_t>(gpu.trainable_parameters()));
    for (int step = 0; step < 3; ++step) {
      SCOPED_TRACE(::testing::Message() << "step " << step);
      poison(ctx, gy.view());
      poison(ctx, gdx.view());
      poison(ctx, gpu.lora_magnitude().grad);
      cpu.forward(hview(x, kN, kIn), hview(cpu_y, kN, kOut));
      gpu.forward(cview(gx), gy.view());
      EXPECT_LE(rel_err(download(ctx, gy), cpu_y), tol) << "y";
      cpu.backward(hview(x, kN, kIn), hview(dL_dy, kN, kOut), hview(cpu_dx, kN, kIn));
      gpu.backward(cview(gx), cview(gdy), gdx.view());
      EXPECT_LE(rel_err(download(ctx, gdx), cpu_dx), tol) << "dL_dx";
      EXPECT_LE(rel_err(download(ctx, gpu.dL_dA()), host(cpu.dL_dA())), tol) << "dL_dA";
      EXPECT_LE(rel_err(download(ctx, gpu.dL_dB()), host(cpu.dL_dB())), tol) << "dL_dB";
      EXPECT_LE(rel_err(download(ctx, gpu.adapter().dL_dm()), host(cpu.adapter().dL_dm())), tol) << "dL_dm";
      cpu_adam.step();
      gpu_adam.step();
      EXPECT_LE(rel_err(download(ctx, gpu.magnitude()), host(cpu.magnitude())), tol) << "m";
    }
    // Merged == unmerged on the GPU; unmerge restores W up to rounding.
    gpu.inference(cview(gx), gy.view());
    const std::vector<float> before = download(ctx, gy);
    gpu.merge();
    gpu.inference(cview(gx), gy.view());
    constexpr bool kFloat = std::is_same_v<T, float>;
    EXPECT_LE(rel_err(download(ctx, gy), before), kFloat ? 1e-5 : 2e-2) << "merged";
    gpu.unmerge();
    EXPECT_LE(rel_err(download(ctx, gW), W), kFloat ? 1e-6 : 1e-2) << "unmerged W";
    if (::testing::Test::HasFailure()) return;
  }
}

// An NF4 base on the GPU (QDoRA): the dense merged weight equals the CPU's.
TEST_F(CudaDoraOps, QDoraMergedWeightMatchesTheCpu) {
  auto& ctx = this->ctx();
  const std::vector<float> W = values(kOut * 64, 1, -0.2f, 0.2f), B0 = values(kOut * kRank, 2, -0.2f, 0.2f);
  Config config;
  config.r = kRank;
  config.use_dora = true;
  lora::cpu::Context cpu_ctx;
  lora::AdapterSet<float, Cpu, lora::cpu::Nf4Base<float>> cpu(
      lora::cpu::Nf4Base<float>::quantize(cpu_ctx, hview(W, kOut, 64)));
  const Matrix<float> gW = upload<float>(ctx, W, kOut, 64);
  lora::AdapterSet<float, Backend, lora::cuda::Nf4Base<float>> gpu(lora::cuda::Nf4Base<float>::quantize(ctx, cview(gW)));
  Cpu::copy_from_host(cpu_ctx, hview(B0, kOut, kRank), cpu.add("d", config).lora_B().value);
  Backend::copy_from_host(ctx, hview(B0, kOut, kRank), gpu.add("d", config).lora_B().value);
  std::vector<float> cpu_out(static_cast<std::size_t>(kOut * 64));
  Matrix<float> gpu_out(kOut, 64);
  poison(ctx, gpu_out.view());
  cpu.merged_weight("d", hview(cpu_out, kOut, 64));
  gpu.merged_weight("d", gpu_out.view());
  EXPECT_LE(rel_err(download(ctx, gpu_out), cpu_out), 1e-6);
}

}  // namespace
