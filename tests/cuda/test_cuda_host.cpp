// lora::cuda from a host .cpp file: the host compiler (g++) compiles this
// file, with no CUDA of its own; the kernels it calls are compiled once, in
// lora_cuda_impl.cu (LORA_CUDA_IMPLEMENTATION). That the binary links proves
// the implementation file holds every op a layer and Adam use, for each
// element type; on a GPU the results must match lora::cpu on the same inputs
// (fp32/fp64 reference, the parity bounds of test_cuda_linear.cu).
#if defined(__CUDACC__)
#error "test_cuda_host.cpp must be compiled by the host compiler: that is what it tests"
#endif

#include <gtest/gtest.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "cuda/cuda_test_util.cuh"

namespace {

using namespace lora::cuda::testing;  // NOLINT(google-build-using-namespace)
using lora::HostSpace;
using lora::MatrixView;
using lora::cuda::Matrix;

template <class T>
class CudaFromHost : public CudaTest {};
using Types = ::testing::Types<float, double, __nv_bfloat16, __half>;
TYPED_TEST_SUITE(CudaFromHost, Types);

TYPED_TEST(CudaFromHost, LinearAndAdamMatchTheCpu) {
  using T = TypeParam;
  // The CPU reference computes in R, which is also the GPU layer's parameter
  // type (fp32 master weights for the 16-bit layers).
  using R = lora::param_t<T>;
  static_assert(std::is_same_v<R, std::conditional_t<std::is_same_v<T, double>, double, float>>);
  const double tol = parity_tolerance<T>();
  constexpr std::int64_t n = 7, d_in = 13, d_out = 11;
  lora::Config config;
  config.r = 3;
  config.alpha = 6.0;
  config.dropout = 0.25;
  config.seed = 99;
  // Inputs rounded to T, so both sides start from the same numbers.
  const std::vector<float> W = round_to<T>(uniform(d_out * d_in, 1, -0.3f, 0.3f));
  const std::vector<float> x = round_to<T>(uniform(n * d_in, 2));
  const std::vector<float> dL_dy = round_to<T>(uniform(n * d_out, 3));
  const std::vector<R> B0 = cast_all<R>(uniform(d_out * config.r, 4, -0.2f, 0.2f));  // B = 0 would hide dL/dA

  lora::cpu::Context cpu_ctx;
  std::vector<R> cpu_W = cast_all<R>(W), cpu_x = cast_all<R>(x), cpu_dL_dy = cast_all<R>(dL_dy);
  std::vector<R> cpu_y(n * d_out), cpu_dL_dx(n * d_in);
  lora::cpu::Linear<R> cpu(cpu_ctx, {cpu_W.data(), d_out, d_in}, {}, config);
  lora::cpu::Adam<R> cpu_adam(cpu_ctx, lora::AdamOptions::adamw(1e-3, 0.1));
  cpu_adam.add_group(cpu.parameters());

  lora::cuda::Context& ctx = this->ctx();
  Matrix<T> gpu_W = upload<T>(ctx, W, d_out, d_in), gpu_x = upload<T>(ctx, x, n, d_in);
  Matrix<T> gpu_dL_dy = upload<T>(ctx, dL_dy, n, d_out), gpu_y(n, d_out), gpu_dL_dx(n, d_in);
  lora::cuda::Linear<T> gpu(ctx, gpu_W.view(), {}, config);
  lora::cuda::Adam<R> gpu_adam(ctx, lora::AdamOptions::adamw(1e-3, 0.1));
  gpu_adam.add_group(gpu.parameters());

  lora::cpu::Backend::copy_from_host(cpu_ctx, MatrixView<const R, HostSpace>(B0.data(), d_out, config.r),
                                     cpu.lora_B().value);
  lora::cuda::Backend::copy_from_host(ctx, MatrixView<const R, HostSpace>(B0.data(), d_out, config.r),
                                      gpu.lora_B().value);
  poison(ctx, gpu_y.view());
  poison(ctx, gpu_dL_dx.view());

  cpu.forward({cpu_x.data(), n, d_in}, {cpu_y.data(), n, d_out});
  gpu.forward(gpu_x.view(), gpu_y.view());
  EXPECT_LE(rel_err(download<double>(ctx, gpu_y), cpu_y), tol) << "y";
  cpu.backward({cpu_x.data(), n, d_in}, {cpu_dL_dy.data(), n, d_out}, {cpu_dL_dx.data(), n, d_in});
  gpu.backward(gpu_x.view(), gpu_dL_dy.view(), gpu_dL_dx.view());
  EXPECT_LE(rel_err(download<double>(ctx, gpu_dL_dx), cpu_dL_dx), tol) << "dL_dx";
  const auto host = [](MatrixView<const R, HostSpace> v) { return std::vector<R>(v.data, v.data + v.size()); };
  EXPECT_LE(rel_err(download<double>(ctx, gpu.dL_dA()), host(cpu.dL_dA())), tol) << "dL_dA";
  EXPECT_LE(rel_err(download<double>(ctx, gpu.dL_dB()), host(cpu.dL_dB())), tol) << "dL_dB";

  cpu_adam.step();
  gpu_adam.step();
  EXPECT_LE(rel_err(download<double>(ctx, gpu.A()), host(cpu.A())), tol) << "A after Adam";
  EXPECT_LE(rel_err(download<double>(ctx, gpu.B()), host(cpu.B())), tol) << "B after Adam";

  // Merging adds s B A to W in place (an fp32 delta into a T weight on the GPU).
  cpu.merge();
  gpu.merge();
  EXPECT_LE(rel_err(download<double>(ctx, gpu_W), cpu_W), tol) << "merged W";
}

// The NF4 base from host C++: quantized on the GPU (the kernels come from
// lora_cuda_impl.cu), it holds nf4::quantize's bytes, and its forward and
// input gradient match the CPU base over the same weight.
TYPED_TEST(CudaFromHost, Nf4BaseMatchesTheCpu) {
  using T = TypeParam;
  using R = lora::param_t<T>;
  const double tol = parity_tolerance<T>();
  constexpr std::int64_t n = 5, d_in = 29, d_out = 9;  // 261 values: a partial last block
  const std::vector<float> W = round_to<T>(uniform(d_out * d_in, 31, -0.2f, 0.2f));
  const std::vector<float> x = round_to<T>(uniform(n * d_in, 32));
  const std::vector<float> dL_dy = round_to<T>(uniform(n * d_out, 33));
  const lora::nf4::Weight ref = lora::nf4::quantize(W.data(), d_out, d_in, d_in);

  lora::cuda::Context& ctx = this->ctx();
  const Matrix<T> gpu_W = upload<T>(ctx, W, d_out, d_in), gpu_x = upload<T>(ctx, x, n, d_in);
  const Matrix<T> gpu_dL_dy = upload<T>(ctx, dL_dy, n, d_out);
  Matrix<T> gpu_y(n, d_out), gpu_dL_dx(n, d_in);
  lora::cuda::Nf4Base<T> gpu = lora::cuda::Nf4Base<T>::quantize(ctx, gpu_W.view());
  const lora::nf4::Weight got = gpu.to_host();
  EXPECT_EQ(got.packed, ref.packed);
  EXPECT_EQ(got.absmax_q, ref.absmax_q);
  EXPECT_EQ(got.nested_absmax, ref.nested_absmax);
  EXPECT_EQ(got.offset, ref.offset);

  lora::cpu::Context cpu_ctx;
  const std::vector<R> cpu_x = cast_all<R>(x), cpu_dL_dy = cast_all<R>(dL_dy);
  std::vector<R> cpu_y(n * d_out), cpu_dL_dx(n * d_in);
  const lora::cpu::Nf4Base<R> cpu(cpu_ctx, ref);
  cpu.forward({cpu_x.data(), n, d_in}, {cpu_y.data(), n, d_out});
  cpu.backward_input({cpu_dL_dy.data(), n, d_out}, {cpu_dL_dx.data(), n, d_in});
  gpu.set_tile_rows(4);  // 3 tiles, the last of 1 row
  poison(ctx, gpu_y.view());
  poison(ctx, gpu_dL_dx.view());
  gpu.forward(gpu_x.view(), gpu_y.view());
  gpu.backward_input(gpu_dL_dy.view(), gpu_dL_dx.view());
  EXPECT_LE(rel_err(download<double>(ctx, gpu_y), cpu_y), tol) << "y";
  EXPECT_LE(rel_err(download<double>(ctx, gpu_dL_dx), cpu_dL_dx), tol) << "dL_dx";
}

}  // namespace
