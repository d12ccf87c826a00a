// The same lora::Linear and lora::Adam on the GPU and on the CPU, same seed,
// same inputs: forward, backward (dL/dx, dL/dA, dL/dB) and Adam steps agree to
// ||gpu - cpu|| / ||cpu|| <= 1e-5 in fp32 (TF32 off) and <= 2e-2 in bf16/fp16,
// with and without dropout, at sizes that are not multiples of 8 or 16. GPU
// outputs are poisoned with NaN before every call, so an element the GPU
// fails to write fails the comparison. Then the invariants: W bit-identical
// after training, a fresh adapter gives the base output exactly, merge and
// unmerge, and adapters moving between backends.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "cuda/cuda_test_util.cuh"

namespace {

using namespace lora::cuda::testing;  // NOLINT(google-build-using-namespace)
using lora::Config;
using lora::GradMode;
using lora::HostSpace;
using lora::MatrixView;
using lora::Mode;
using lora::cuda::Backend;
using lora::cuda::DeviceSpace;
using lora::cuda::Matrix;
using bf16 = __nv_bfloat16;
using half = __half;

constexpr std::int64_t kN = 37, kIn = 53, kOut = 45;
constexpr int kRank = 5;

Config make_config(double dropout, bool fan_in_fan_out) {
  Config config;
  config.r = kRank;
  config.alpha = 10.0;  // s = 2
  config.dropout = dropout;
  config.fan_in_fan_out = fan_in_fan_out;
  config.seed = 20240917;
  return config;
}

// One problem, held on both backends. Host values are rounded to T, so the
// CPU (fp32) and the GPU (T) start from identical numbers.
template <class T>
struct Problem {
  Config config;
  bool with_bias;
  std::int64_t w_rows, w_cols;
  std::vector<float> W, bias, x, dL_dy, B0;

  // CPU side (fp32): W is borrowed by the layer, so it lives here.
  lora::cpu::Context cpu_ctx;
  std::vector<float> cpu_W, cpu_y, cpu_dL_dx;
  std::unique_ptr<lora::cpu::Linear<float>> cpu;

  // GPU side.
  lora::cuda::Context& gpu_ctx;
  Matrix<T> gpu_W, gpu_bias, gpu_x, gpu_dL_dy, gpu_y, gpu_dL_dx;
  std::unique_ptr<lora::cuda::Linear<T>> gpu;

  Problem(lora::cuda::Context& ctx, const Config& c, bool bias_on)
      : config(c), with_bias(bias_on), w_rows(c.fan_in_fan_out ? kIn : kOut), w_cols(c.fan_in_fan_out ? kOut : kIn),
        gpu_ctx(ctx) {
    W = round_to<T>(uniform(static_cast<std::size_t>(kOut * kIn), 1, -0.15f, 0.15f));
    bias = round_to<T>(uniform(static_cast<std::size_t>(kOut), 2));
    x = round_to<T>(uniform(static_cast<std::size_t>(kN * kIn), 3));
    dL_dy = round_to<T>(uniform(static_cast<std::size_t>(kN * kOut), 4));
    B0 = uniform(static_cast<std::size_t>(kOut * kRank), 5, -0.2f, 0.2f);  // fp32 master values

    cpu_W = W;
    cpu_y.assign(static_cast<std::size_t>(kN * kOut), 0.0f);
    cpu_dL_dx.assign(static_cast<std::size_t>(kN * kIn), 0.0f);
    cpu = std::make_unique<lora::cpu::Linear<float>>(
        cpu_ctx, MatrixView<float, HostSpace>(cpu_W.data(), w_rows, w_cols),
        with_bias ? MatrixView<const float, HostSpace>(bias.data(), 1, kOut) : MatrixView<const float, HostSpace>(),
        config);

    gpu_W = upload<T>(ctx, W, w_rows, w_cols);
    gpu_bias = upload<T>(ctx, bias, 1, kOut);
    gpu_x = upload<T>(ctx, x, kN, kIn);
    gpu_dL_dy = upload<T>(ctx, dL_dy, kN, kOut);
    gpu_y = Matrix<T>(kN, kOut);
    gpu_dL_dx = Matrix<T>(kN, kIn);
    gpu = std::make_unique<lora::cuda::Linear<T>>(
        ctx, gpu_W.view(), with_bias ? gpu_bias.view() : MatrixView<const T, DeviceSpace>(), config);
  }

  // B = B0 on both sides (a fresh adapter's B = 0 makes dL/dA and the LoRA
  // part of dL/dx vanish, which would prove nothing).
  void set_B() {
    lora::cpu::Backend::copy_from_host(cpu_ctx, MatrixView<const float, HostSpace>(B0.data(), kOut, kRank),
                                       cpu->lora_B().value);
    Backend::copy_from_host(gpu_ctx, MatrixView<const float, HostSpace>(B0.data(), kOut, kRank), gpu->lora_B().value);
  }

  void forward(Mode mode) {
    poison(gpu_ctx, gpu_y.view());
    cpu->forward(MatrixView<const float, HostSpace>(x.data(), kN, kIn),
                 MatrixView<float, HostSpace>(cpu_y.data(), kN, kOut), mode);
    gpu->forward(gpu_x.view(), gpu_y.view(), mode);
  }
  void backward() {
    poison(gpu_ctx, gpu_dL_dx.view());
    poison(gpu_ctx, gpu->lora_A().grad);
    poison(gpu_ctx, gpu->lora_B().grad);
    cpu->backward(MatrixView<const float, HostSpace>(x.data(), kN, kIn),
                  MatrixView<const float, HostSpace>(dL_dy.data(), kN, kOut),
                  MatrixView<float, HostSpace>(cpu_dL_dx.data(), kN, kIn));
    gpu->backward(gpu_x.view(), gpu_dL_dy.view(), gpu_dL_dx.view());
  }
  static std::vector<float> host(MatrixView<const float, HostSpace> v) {
    return std::vector<float>(v.data, v.data + v.size());
  }
};

template <class T>
class CudaLinear : public CudaTest {};
using LayerTypes = ::testing::Types<float, bf16, half>;
TYPED_TEST_SUITE(CudaLinear, LayerTypes);

TYPED_TEST(CudaLinear, ParityWithCpuForForwardBackwardAndAdam) {
  using T = TypeParam;
  const double tol = parity_tolerance<T>();
  struct Case {
    double dropout;
    bool fan_in_fan_out;
    bool bias;
  };
  for (const Case& c : {Case{0.0, false, true}, Case{0.3, false, false}, Case{0.3, true, true}}) {
    SCOPED_TRACE(::testing::Message() << "dropout " << c.dropout << ", fan_in_fan_out " << c.fan_in_fan_out
                                      << ", bias " << c.bias);
    Problem<T> p(this->ctx(), make_config(c.dropout, c.fan_in_fan_out), c.bias);
    auto& ctx = p.gpu_ctx;
    // Same seed, same A: both backends draw it with the same host code.
    EXPECT_EQ(download(ctx, p.gpu->A()), Problem<T>::host(p.cpu->A()));
    p.set_B();
    // lr 1e-3: a step moves each element by ~lr (Adam's first step is lr * sign(g)),
    // far above the fp32 bound, while a 16-bit gradient whose sign differs from
    // the CPU's (|g| near 0) moves the comparison by only 2 lr / ||B||.
    const auto options = lora::AdamOptions::adamw(1e-3, 0.1);
    lora::cpu::Adam<float> cpu_adam(p.cpu_ctx, options);
    lora::cuda::Adam<float> gpu_adam(ctx, options);
    cpu_adam.add_group(p.cpu->parameters());
    gpu_adam.add_group(p.gpu->parameters());
    for (int step = 0; step < 3; ++step) {
      SCOPED_TRACE(::testing::Message() << "step " << step);
      p.forward(Mode::train);
      EXPECT_LE(rel_err(download(ctx, p.gpu_y), p.cpu_y), tol) << "y";
      p.backward();
      EXPECT_LE(rel_err(download(ctx, p.gpu_dL_dx), p.cpu_dL_dx), tol) << "dL_dx";
      EXPECT_LE(rel_err(download(ctx, p.gpu->dL_dA()), Problem<T>::host(p.cpu->dL_dA())), tol) << "dL_dA";
      EXPECT_LE(rel_err(download(ctx, p.gpu->dL_dB()), Problem<T>::host(p.cpu->dL_dB())), tol) << "dL_dB";
      cpu_adam.step();
      gpu_adam.step();
      EXPECT_LE(rel_err(download(ctx, p.gpu->A()), Problem<T>::host(p.cpu->A())), tol) << "A";
      EXPECT_LE(rel_err(download(ctx, p.gpu->B()), Problem<T>::host(p.cpu->B())), tol) << "B";
    }
    EXPECT_EQ(p.gpu->dropout_calls(), p.cpu->dropout_calls());
    // Eval after training: no dropout, same adapter.
    p.forward(Mode::eval);
    EXPECT_LE(rel_err(download(ctx, p.gpu_y), p.cpu_y), tol) << "y (eval)";
    if (::testing::Test::HasFailure()) return;
  }
}

TYPED_TEST(CudaLinear, FreshAdapterGivesTheBaseOutputExactly) {
  using T = TypeParam;
  Problem<T> p(this->ctx(), make_config(0.3, false), true);
  auto& ctx = p.gpu_ctx;
  // The frozen layer alone, computed by the backend directly.
  Matrix<T> base(kN, kOut);
  Backend::gemm<T, T>(ctx, lora::Op::N, lora::Op::T, 1.0, cview(p.gpu_x), cview(p.gpu_W), 0.0, base.view());
  Backend::add_row_vector(ctx, base.view(), cview(p.gpu_bias));
  const auto expected = download(ctx, base);
  for (Mode mode : {Mode::train, Mode::eval}) {
    p.forward(mode);  // B = 0: the LoRA path adds exactly zero, with or without dropout
    const auto y = download(ctx, p.gpu_y);
    ASSERT_EQ(y.size(), expected.size());
    for (std::size_t i = 0; i < y.size(); ++i) ASSERT_EQ(y[i], expected[i]) << "element " << i;
  }
}

TYPED_TEST(CudaLinear, WIsBitIdenticalAfterTraining) {
  using T = TypeParam;
  Problem<T> p(this->ctx(), make_config(0.3, false), true);
  auto& ctx = p.gpu_ctx;
  auto raw = [&](const Matrix<T>& m) {
    std::vector<T> out(static_cast<std::size_t>(m.size()));
    Backend::copy_to_host(ctx, m.view(), MatrixView<T, HostSpace>(out.data(), m.rows(), m.cols()));
    return out;
  };
  const std::vector<T> W_before = raw(p.gpu_W), bias_before = raw(p.gpu_bias);
  lora::cuda::Adam<float> adam(ctx, lora::AdamOptions::adamw(1e-2, 0.1));
  adam.add_group(p.gpu->parameters());
  EXPECT_EQ(adam.state_bytes(), 8u * static_cast<std::size_t>(p.gpu->trainable_parameters()));
  for (int step = 0; step < 4; ++step) {
    p.gpu->forward(p.gpu_x.view(), p.gpu_y.view(), Mode::train);
    p.gpu->backward(p.gpu_x.view(), p.gpu_dL_dy.view(), p.gpu_dL_dx.view());
    adam.step();
  }
  const std::vector<T> W_after = raw(p.gpu_W), bias_after = raw(p.gpu_bias);
  EXPECT_EQ(std::memcmp(W_before.data(), W_after.data(), W_before.size() * sizeof(T)), 0);
  EXPECT_EQ(std::memcmp(bias_before.data(), bias_after.data(), bias_before.size() * sizeof(T)), 0);
  // Training did happen: B moved away from zero.
  EXPECT_GT(Backend::sum_squares(ctx, p.gpu->B()), 0.0);
}

TYPED_TEST(CudaLinear, MergeAndUnmergeOnTheGpu) {
  using T = TypeParam;
  const double tol = parity_tolerance<T>();
  for (bool fan_in_fan_out : {false, true}) {
    SCOPED_TRACE(fan_in_fan_out ? "fan_in_fan_out" : "W: d_out x d_in");
    Problem<T> p(this->ctx(), make_config(0.0, fan_in_fan_out), true);
    auto& ctx = p.gpu_ctx;
    p.set_B();
    p.forward(Mode::eval);
    const auto unmerged = download(ctx, p.gpu_y);
    p.gpu->merge();
    // W + s B A (or its transpose), from the host values in double.
    const auto A = Problem<T>::host(p.cpu->A());
    std::vector<double> expected_W(p.W.size());
    for (std::int64_t o = 0; o < kOut; ++o) {
      for (std::int64_t i = 0; i < kIn; ++i) {
        double delta = 0.0;
        for (int k = 0; k < kRank; ++k) delta += static_cast<double>(p.B0[o * kRank + k]) * A[k * kIn + i];
        const std::int64_t at = fan_in_fan_out ? i * kOut + o : o * kIn + i;
        expected_W[at] = static_cast<double>(p.W[at]) + p.gpu->scale() * delta;
      }
    }
    const double w_tol = std::is_same_v<T, float> ? 1e-6 : 1e-2;
    EXPECT_LE(rel_err(download(ctx, p.gpu_W), expected_W), w_tol);
    p.forward(Mode::eval);
    EXPECT_LE(rel_err(download(ctx, p.gpu_y), unmerged), tol) << "merged vs unmerged output";
    EXPECT_THROW(p.gpu->forward(p.gpu_x.view(), p.gpu_y.view(), Mode::train), lora::Error);
    p.gpu->unmerge();
    EXPECT_LE(rel_err(download(ctx, p.gpu_W), p.W), w_tol) << "W after unmerge";
    p.forward(Mode::eval);
    EXPECT_LE(rel_err(download(ctx, p.gpu_y), unmerged), tol) << "unmerged again";
  }
}

TYPED_TEST(CudaLinear, AdapterMovesBetweenBackends) {
  using T = TypeParam;
  const double tol = parity_tolerance<T>();
  Problem<T> p(this->ctx(), make_config(0.0, false), true);
  auto& ctx = p.gpu_ctx;
  p.set_B();
  lora::cuda::Adam<float> adam(ctx, lora::AdamOptions::adamw(5e-2, 0.0));
  adam.add_group(p.gpu->parameters());
  for (int step = 0; step < 2; ++step) {
    p.gpu->forward(p.gpu_x.view(), p.gpu_y.view(), Mode::train);
    p.gpu->backward(p.gpu_x.view(), p.gpu_dL_dy.view(), p.gpu_dL_dx.view());
    adam.step();
  }
  // GPU -> CPU: the trained A and B, copied into the CPU layer, give the GPU's output.
  const auto A = lora::cuda::to_host(ctx, p.gpu->A());
  const auto B = lora::cuda::to_host(ctx, p.gpu->B());
  lora::cpu::Backend::copy_from_host(p.cpu_ctx, A.view(), p.cpu->lora_A().value);
  lora::cpu::Backend::copy_from_host(p.cpu_ctx, B.view(), p.cpu->lora_B().value);
  p.forward(Mode::eval);
  EXPECT_LE(rel_err(download(ctx, p.gpu_y), p.cpu_y), tol);
  // CPU -> GPU: a CPU-side change to B reaches the GPU layer.
  std::vector<float> B2 = Problem<T>::host(p.cpu->B());
  for (float& v : B2) v = -v;
  lora::cpu::Backend::copy_from_host(p.cpu_ctx, MatrixView<const float, HostSpace>(B2.data(), kOut, kRank),
                                     p.cpu->lora_B().value);
  Backend::copy_from_host(ctx, MatrixView<const float, HostSpace>(B2.data(), kOut, kRank), p.gpu->lora_B().value);
  p.forward(Mode::eval);
  EXPECT_LE(rel_err(download(ctx, p.gpu_y), p.cpu_y), tol);
}

TYPED_TEST(CudaLinear, MemoryReportCountsMastersAndComputeCopies) {
  using T = TypeParam;
  Problem<T> p(this->ctx(), make_config(0.0, false), false);
  const std::size_t elements = static_cast<std::size_t>(kRank * (kIn + kOut));
  const std::size_t copies = std::is_same_v<T, float> ? 0 : sizeof(T) * elements;  // 16-bit copies of A and B
  const lora::MemoryReport report = p.gpu->memory();
  EXPECT_EQ(report.parameter_bytes, sizeof(float) * elements + copies);
  EXPECT_EQ(report.gradient_bytes, sizeof(float) * elements);
  EXPECT_EQ(report.frozen_bytes, sizeof(T) * static_cast<std::size_t>(kIn * kOut));
}

TYPED_TEST(CudaLinear, BadInputIsALoraError) {
  using T = TypeParam;
  Problem<T> p(this->ctx(), make_config(0.0, false), false);
  Matrix<T> wrong_x(kN, kIn + 1);
  EXPECT_THROW(p.gpu->forward(wrong_x.view(), p.gpu_y.view(), Mode::train), lora::Error);
  EXPECT_THROW(p.gpu->backward(p.gpu_x.view(), p.gpu_dL_dy.view(), p.gpu_dL_dx.view()), lora::Error);  // no forward yet
  // Views are checked in full on the device too: a negative size, a stride below the width.
  EXPECT_THROW(p.gpu->forward(MatrixView<const T, DeviceSpace>(p.gpu_x.data(), -1, kIn), p.gpu_y.view(), Mode::eval),
               lora::Error);
  EXPECT_THROW(p.gpu->forward(p.gpu_x.view(), MatrixView<T, DeviceSpace>(p.gpu_y.data(), kN, kOut, kOut - 1), Mode::eval),
               lora::Error);
}

}  // namespace
