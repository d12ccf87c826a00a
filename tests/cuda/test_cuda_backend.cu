// lora::cuda::Backend op by op: every GEMM type pair and transpose against a
// naive double-precision reference at sizes that fit no tile, the kernels
// against the CPU backend (bit for bit where the arithmetic is the same), the
// copies, the owning buffers, and the errors. Without a GPU every test that
// needs one skips; the error-reporting tests run everywhere.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/cuda_test_util.cuh"

namespace {

using namespace lora::cuda::testing;  // NOLINT(google-build-using-namespace)
using lora::HostSpace;
using lora::MatrixView;
using lora::Op;
using lora::cuda::Backend;
using lora::cuda::Context;
using lora::cuda::DeviceSpace;
using lora::cuda::Matrix;
using lora::cuda::value_cast;
using bf16 = __nv_bfloat16;
using half = __half;

// ---- compile-time facts --------------------------------------------------------

static_assert(lora::is_backend_v<Backend>);
static_assert(std::is_same_v<lora::param_t<bf16>, float> && std::is_same_v<lora::param_t<half>, float>);
static_assert(std::is_same_v<lora::param_t<float>, float>);
static_assert(!std::is_copy_constructible_v<Matrix<float>> && !std::is_copy_assignable_v<Matrix<float>>);
static_assert(std::is_nothrow_move_constructible_v<Matrix<float>> && std::is_nothrow_move_assignable_v<Matrix<float>>);
static_assert(!std::is_copy_constructible_v<Context> && !std::is_move_constructible_v<Context>);

// A host view handed to the CUDA backend does not compile (detected, not tried).
template <class V, class = void>
struct FillAccepts : std::false_type {};
template <class V>
struct FillAccepts<V, std::void_t<decltype(Backend::fill(std::declval<Context&>(), std::declval<V>(), 0.0f))>>
    : std::true_type {};
static_assert(FillAccepts<MatrixView<float, DeviceSpace>>::value);
static_assert(!FillAccepts<MatrixView<float, HostSpace>>::value);
static_assert(!std::is_convertible_v<MatrixView<float, HostSpace>, MatrixView<float, DeviceSpace>>);

// ---- errors: these run with or without a GPU -------------------------------------

cudaError_t failing_cuda_call() { return cudaErrorInvalidValue; }
cublasStatus_t failing_cublas_call() { return CUBLAS_STATUS_INVALID_VALUE; }

TEST(CudaCheck, CudaFailureThrowsWithExpressionFileAndLine) {
  const int line = __LINE__ + 2;
  try {
    LORA_CUDA_CHECK(failing_cuda_call());
    FAIL() << "LORA_CUDA_CHECK did not throw";
  } catch (const lora::Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("failing_cuda_call()"), std::string::npos) << what;
    EXPECT_NE(what.find("cudaErrorInvalidValue"), std::string::npos) << what;
    EXPECT_NE(what.find("test_cuda_backend.cu:" + std::to_string(line)), std::string::npos) << what;
  }
  EXPECT_NO_THROW(LORA_CUDA_CHECK(cudaSuccess));
}

TEST(CudaCheck, CublasFailureThrowsWithExpressionFileAndLine) {
  const int line = __LINE__ + 2;
  try {
    LORA_CUBLAS_CHECK(failing_cublas_call());
    FAIL() << "LORA_CUBLAS_CHECK did not throw";
  } catch (const lora::Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("failing_cublas_call()"), std::string::npos) << what;
    EXPECT_NE(what.find("CUBLAS_STATUS_INVALID_VALUE"), std::string::npos) << what;
    EXPECT_NE(what.find("test_cuda_backend.cu:" + std::to_string(line)), std::string::npos) << what;
  }
}

TEST(CudaCheck, ContextWithoutDeviceThrowsLoraError) {
  if (lora::cuda::device_count() > 0) GTEST_SKIP() << "a CUDA device is present: this checks the no-device path";
  try {
    Context ctx;
    FAIL() << "Context() succeeded without a device";
  } catch (const lora::Error& e) {
    EXPECT_NE(std::string(e.what()).find("cudaGetDeviceCount"), std::string::npos) << e.what();
  }
}

// ---- helpers -------------------------------------------------------------------

// A rows x cols view inside a wider (cols + pad) device allocation whose
// padding holds `sentinel`, so writes outside the view are caught.
template <class T>
struct Padded {
  Matrix<T> storage;
  MatrixView<T, DeviceSpace> view;
};
template <class T>
Padded<T> padded(Context& ctx, const std::vector<float>& values, std::int64_t rows, std::int64_t cols,
                 std::int64_t pad, float sentinel = 7.0f) {
  Padded<T> p{Matrix<T>(rows, cols + pad), {}};
  Backend::fill(ctx, p.storage.view(), value_cast<T>(sentinel));
  p.view = p.storage.view().col_block(0, cols);
  const std::vector<T> host = cast_all<T>(values);
  Backend::copy_from_host(ctx, MatrixView<const T, HostSpace>(host.data(), rows, cols), p.view);
  return p;
}
// The padding columns of a Padded, read back.
template <class T>
std::vector<float> padding_of(Context& ctx, const Padded<T>& p) {
  const std::vector<float> all = download(ctx, p.storage);
  std::vector<float> out;
  for (std::int64_t i = 0; i < p.storage.rows(); ++i)
    for (std::int64_t j = p.view.cols; j < p.storage.cols(); ++j) out.push_back(all[i * p.storage.cols() + j]);
  return out;
}
template <class Out = float, class T>
std::vector<Out> values_of(Context& ctx, MatrixView<T, DeviceSpace> view) {
  return download<Out>(ctx, MatrixView<const T, DeviceSpace>(view));
}

// c = alpha op(a) op(b) + beta c in double, the naive triple loop.
// a is stored (op_a == N ? m x k : k x m), b (op_b == N ? k x n : n x k), c m x n.
std::vector<double> reference_gemm(Op op_a, Op op_b, std::int64_t m, std::int64_t n, std::int64_t k, double alpha,
                                   const std::vector<float>& a, const std::vector<float>& b, double beta,
                                   const std::vector<float>& c) {
  std::vector<double> out(static_cast<std::size_t>(m * n));
  for (std::int64_t i = 0; i < m; ++i) {
    for (std::int64_t j = 0; j < n; ++j) {
      double sum = 0.0;
      for (std::int64_t p = 0; p < k; ++p) {
        const double av = op_a == Op::N ? a[i * k + p] : a[p * m + i];
        const double bv = op_b == Op::N ? b[p * n + j] : b[j * k + p];
        sum += av * bv;
      }
      out[i * n + j] = alpha * sum + (beta == 0.0 ? 0.0 : beta * c[i * n + j]);
    }
  }
  return out;
}

// ---- GEMM ------------------------------------------------------------------------

template <class In, class Out>
struct GemmTypes {
  using Tin = In;
  using Tout = Out;
};

template <class Types>
class CudaGemm : public CudaTest {};
using GemmTypeList = ::testing::Types<GemmTypes<float, float>, GemmTypes<double, double>, GemmTypes<bf16, bf16>,
                                      GemmTypes<bf16, float>, GemmTypes<half, half>, GemmTypes<half, float>>;
TYPED_TEST_SUITE(CudaGemm, GemmTypeList);

TYPED_TEST(CudaGemm, MatchesNaiveReferenceForEveryTransposeAndBeta) {
  using Tin = typename TypeParam::Tin;
  using Tout = typename TypeParam::Tout;
  Context& ctx = this->ctx();
  // Sizes that fit no 8/16/32 tile, views with row padding on every operand.
  const std::int64_t m = 37, n = 45, k = 53;
  // Output rounding dominates for 16-bit outputs (bf16: 8 bits, fp16: 11);
  // with fp32 accumulation the rest is ~1e-7.
  const double tolerance = std::is_same_v<Tout, double> ? 1e-12
                           : std::is_same_v<Tout, bf16> ? 1e-2
                           : std::is_same_v<Tout, half> ? 2e-3
                           : std::is_same_v<Tin, float> ? 1e-6
                                                        : 1e-5;  // 16-bit in, fp32 out: tensor-core accumulation
  for (Op op_a : {Op::N, Op::T}) {
    for (Op op_b : {Op::N, Op::T}) {
      for (double beta : {0.0, 1.0, -0.5}) {
        SCOPED_TRACE(::testing::Message() << "op_a " << (op_a == Op::N ? "N" : "T") << ", op_b "
                                        << (op_b == Op::N ? "N" : "T") << ", beta " << beta);
        const std::int64_t a_rows = op_a == Op::N ? m : k, a_cols = op_a == Op::N ? k : m;
        const std::int64_t b_rows = op_b == Op::N ? k : n, b_cols = op_b == Op::N ? n : k;
        const auto a_host = round_to<Tin>(uniform(static_cast<std::size_t>(m * k), 11));
        const auto b_host = round_to<Tin>(uniform(static_cast<std::size_t>(k * n), 12));
        const auto c_host = round_to<Tout>(uniform(static_cast<std::size_t>(m * n), 13));
        auto a = padded<Tin>(ctx, a_host, a_rows, a_cols, 3);
        auto b = padded<Tin>(ctx, b_host, b_rows, b_cols, 5);
        auto c = padded<Tout>(ctx, c_host, m, n, 2);
        if (beta == 0.0) poison(ctx, c.view);  // beta == 0 must not read c
        Backend::gemm<Tin, Tout>(ctx, op_a, op_b, 0.75, a.view, b.view, beta, c.view);
        const auto expected = reference_gemm(op_a, op_b, m, n, k, 0.75, a_host, b_host, beta, c_host);
        EXPECT_LE(rel_err(values_of<double>(ctx, c.view), expected), tolerance);
        for (float v : padding_of(ctx, c)) ASSERT_EQ(v, 7.0f) << "gemm wrote outside c's columns";
      }
    }
  }
}

TEST_F(CudaTest, GemmWithEmptyInnerDimensionScalesC) {
  Matrix<float> a(4, 0), b(0, 3);
  auto c = padded<float>(ctx(), std::vector<float>(12, 2.0f), 4, 3, 1);
  Backend::gemm<float, float>(ctx(), Op::N, Op::N, 1.0, a.view(), b.view(), 0.5, c.view);
  for (float v : values_of(ctx(), c.view)) EXPECT_EQ(v, 1.0f);
  poison(ctx(), c.view);
  Backend::gemm<float, float>(ctx(), Op::N, Op::N, 1.0, a.view(), b.view(), 0.0, c.view);
  for (float v : values_of(ctx(), c.view)) EXPECT_EQ(v, 0.0f);  // beta == 0: NaN never read
}

TEST_F(CudaTest, GemmRejectsMismatchedShapesAndOversizedDimensions) {
  Matrix<float> a(4, 5), b(6, 3), c(4, 3);
  EXPECT_THROW((Backend::gemm<float, float>(ctx(), Op::N, Op::N, 1.0, a.view(), b.view(), 0.0, c.view())),
               lora::Error);
  // A dimension beyond cuBLAS's int is refused before any call is made.
  const MatrixView<const float, DeviceSpace> wide(a.data(), 1, std::int64_t{3} << 30);
  Matrix<float> c11(1, 1);
  try {
    Backend::gemm<float, float>(ctx(), Op::N, Op::T, 1.0, wide, wide, 0.0, c11.view());
    FAIL() << "expected lora::Error";
  } catch (const lora::Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("k = 3221225472 exceeds cuBLAS's int limit 2147483647"), std::string::npos) << what;
  }
}

TEST_F(CudaTest, Tf32OnlyWhenAskedFor) {
  const std::int64_t s = 512;
  const auto a_host = uniform(static_cast<std::size_t>(s * s), 21);
  const auto b_host = uniform(static_cast<std::size_t>(s * s), 22);
  auto a = upload<float>(ctx(), a_host, s, s);
  auto b = upload<float>(ctx(), b_host, s, s);
  Matrix<float> c(s, s);
  const auto expected = reference_gemm(Op::N, Op::N, s, s, s, 1.0, a_host, b_host, 0.0, {});
  ASSERT_FALSE(ctx().allow_tf32());
  Backend::gemm<float, float>(ctx(), Op::N, Op::N, 1.0, a.view(), b.view(), 0.0, c.view());
  const double fp32_err = rel_err(download(ctx(), c), expected);
  ctx().set_allow_tf32(true);
  Backend::gemm<float, float>(ctx(), Op::N, Op::N, 1.0, a.view(), b.view(), 0.0, c.view());
  const double tf32_err = rel_err(download(ctx(), c), expected);
  EXPECT_LE(fp32_err, 1e-6);
  // TF32 keeps 10 mantissa bits: visibly less exact, still close.
  EXPECT_GT(tf32_err, 1e-5) << "allow_tf32 did not reach cuBLAS";
  EXPECT_LE(tf32_err, 1e-2);
}

// ---- dropout: the CPU's mask, bit for bit ----------------------------------------

TEST_F(CudaTest, DropoutMatchesCpuBitForBit) {
  const std::int64_t rows = 37, cols = 53;
  const auto x_host = uniform(static_cast<std::size_t>(rows * cols), 31, 0.25f, 1.25f);  // no zeros
  lora::cpu::Context cpu;
  std::vector<float> cpu_out(x_host.size());
  // Layer stream 2^31 + 3 draws from RNG stream 2^32 + 7, which needs the 33rd bit on both sides.
  for (const std::uint32_t stream : {3u, 0x8000'0003u}) {
    for (float p : {0.1f, 0.5f, 0.9f}) {
      for (std::uint32_t call : {0u, 1u, 1000u}) {
        SCOPED_TRACE(::testing::Message() << "stream " << stream << ", p " << p << ", call " << call);
        const std::uint64_t seed = 0x1234567890abcdefull;
        lora::cpu::Backend::dropout(cpu, MatrixView<const float, HostSpace>(x_host.data(), rows, cols),
                                    MatrixView<float, HostSpace>(cpu_out.data(), rows, cols), p, seed, stream, call);
        // Strided input and output on the GPU: the index is i * cols + j regardless.
        auto x = padded<float>(ctx(), x_host, rows, cols, 3);
        auto out = padded<float>(ctx(), std::vector<float>(x_host.size(), 0.0f), rows, cols, 1);
        poison(ctx(), out.view);
        Backend::dropout(ctx(), cview(x.view), out.view, p, seed, stream, call);
        const auto gpu_out = values_of(ctx(), out.view);
        ASSERT_EQ(gpu_out.size(), cpu_out.size());
        EXPECT_EQ(std::memcmp(gpu_out.data(), cpu_out.data(), cpu_out.size() * sizeof(float)), 0);
        std::size_t dropped = 0;
        for (float v : gpu_out) dropped += v == 0.0f;
        const double fraction = static_cast<double>(dropped) / static_cast<double>(gpu_out.size());
        EXPECT_NEAR(fraction, p, 0.05);  // 1961 draws: a fixed mask or a wrong p shows here
        // In place (out aliases x) gives the same result.
        Backend::dropout(ctx(), cview(x.view), x.view, p, seed, stream, call);
        EXPECT_EQ(values_of(ctx(), x.view), gpu_out);
      }
    }
  }
}

TEST_F(CudaTest, Bf16DropoutDrawsTheCpuMask) {
  const std::int64_t rows = 29, cols = 61;
  const auto x_host = round_to<bf16>(uniform(static_cast<std::size_t>(rows * cols), 32, 0.25f, 1.25f));
  const float p = 0.3f;
  lora::cpu::Context cpu;
  std::vector<float> cpu_out(x_host.size());
  lora::cpu::Backend::dropout(cpu, MatrixView<const float, HostSpace>(x_host.data(), rows, cols),
                              MatrixView<float, HostSpace>(cpu_out.data(), rows, cols), p, 5, 1, 2);
  auto x = upload<bf16>(ctx(), x_host, rows, cols);
  Matrix<bf16> out(rows, cols);
  Backend::dropout(ctx(), cview(x), out.view(), p, 5, 1, 2);
  const auto gpu_out = download(ctx(), out);
  for (std::size_t i = 0; i < gpu_out.size(); ++i) {
    ASSERT_EQ(gpu_out[i] == 0.0f, cpu_out[i] == 0.0f) << "mask differs at " << i;
    EXPECT_EQ(gpu_out[i], value_cast<float>(value_cast<bf16>(cpu_out[i]))) << i;  // x * 1/(1-p), rounded once
  }
}

// The mask as bits: the CPU's dropout_mask word for word, at odd widths (ragged
// last words, rows at every Philox phase) and on a strided view; applied, it
// is the CPU's dropout.
TEST_F(CudaTest, DropoutMaskMatchesCpuBitForBit) {
  lora::cpu::Context cpu;
  for (auto [rows, cols] : {std::pair<std::int64_t, std::int64_t>{37, 53}, {5, 64}, {300, 1021}, {1, 1}}) {
    for (const std::uint32_t stream : {3u, 0x8000'0003u}) {
      SCOPED_TRACE(::testing::Message() << rows << " x " << cols << ", stream " << stream);
      const std::int64_t words = lora::dropout_mask_words(cols);
      std::vector<std::uint32_t> want(static_cast<std::size_t>(rows * words));
      lora::cpu::Backend::dropout_mask(cpu, cols, 0.3f, 0x1234567890abcdefull, stream, 7,
                                       MatrixView<std::uint32_t, HostSpace>(want.data(), rows, words));
      Matrix<std::uint32_t> buf(rows, words + 3);
      auto bits = buf.view().col_block(1, words);
      Backend::dropout_mask(ctx(), cols, 0.3f, 0x1234567890abcdefull, stream, 7, bits);
      std::vector<std::uint32_t> got(want.size());
      Backend::copy_to_host(ctx(), cview(bits), MatrixView<std::uint32_t, HostSpace>(got.data(), rows, words));
      EXPECT_EQ(got, want);
    }
  }
}

TEST_F(CudaTest, ApplyDropoutMaskIsTheCpuDropout) {
  const std::int64_t rows = 41, cols = 75;
  const float p = 0.35f;
  const auto x_host = uniform(static_cast<std::size_t>(rows * cols), 33, 0.25f, 1.25f);
  lora::cpu::Context cpu;
  std::vector<float> dropped(x_host.size());
  lora::cpu::Backend::dropout(cpu, MatrixView<const float, HostSpace>(x_host.data(), rows, cols),
                              MatrixView<float, HostSpace>(dropped.data(), rows, cols), p, 11, 2, 5);
  Matrix<std::uint32_t> bits(rows, lora::dropout_mask_words(cols));
  Backend::dropout_mask(ctx(), cols, p, 11, 2, 5, bits.view());
  auto x = upload<float>(ctx(), x_host, rows, cols);
  Matrix<float> out(rows, cols);
  poison(ctx(), out.view());  // never read
  Backend::apply_dropout_mask(ctx(), cview(x), cview(bits), p, out.view());
  EXPECT_EQ(download(ctx(), out), dropped);
  // in place, on rows [10, 30) only
  Backend::apply_dropout_mask(ctx(), cview(x).row_block(10, 20), cview(bits).row_block(10, 20), p,
                              x.view().row_block(10, 20));
  const auto got = download(ctx(), x);
  for (std::int64_t i = 0; i < rows; ++i) {
    for (std::int64_t j = 0; j < cols; ++j) {
      const auto k = static_cast<std::size_t>(i * cols + j);
      ASSERT_EQ(got[k], i >= 10 && i < 30 ? dropped[k] : x_host[k]) << i << ", " << j;
    }
  }
  // bf16: the same mask, the kept value rounded once
  auto x16 = upload<bf16>(ctx(), x_host, rows, cols);
  Matrix<bf16> out16(rows, cols);
  Backend::apply_dropout_mask(ctx(), cview(x16), cview(bits), p, out16.view());
  const auto got16 = download(ctx(), out16);
  const auto x_rounded = round_to<bf16>(x_host);
  for (std::size_t k = 0; k < got16.size(); ++k) {
    ASSERT_EQ(got16[k] == 0.0f, dropped[k] == 0.0f) << "mask differs at " << k;
    if (dropped[k] != 0.0f) {
      const float want = value_cast<float>(value_cast<bf16>(x_rounded[k] * static_cast<float>(1.0 / (1.0 - p))));
      EXPECT_EQ(got16[k], want) << k;
    }
  }
}

// ---- elementwise kernels ---------------------------------------------------------

TEST_F(CudaTest, FillWritesTheViewAndNothingElse) {
  auto x = padded<float>(ctx(), std::vector<float>(35, 1.0f), 5, 7, 3);
  Backend::fill(ctx(), x.view, -2.5f);
  for (float v : values_of(ctx(), x.view)) EXPECT_EQ(v, -2.5f);
  for (float v : padding_of(ctx(), x)) EXPECT_EQ(v, 7.0f);
}

TEST_F(CudaTest, ConvertRoundsToNearestEven) {
  const std::int64_t rows = 13, cols = 17;
  auto values = uniform(static_cast<std::size_t>(rows * cols), 41, -3.0f, 3.0f);
  values[0] = 1.0f + 0x1p-8f;   // a bf16 tie: rounds to even (1.0)
  values[1] = 1.0f + 3 * 0x1p-8f;  // the other tie: rounds to even (1 + 2^-6)
  auto src = upload<float>(ctx(), values, rows, cols);
  Matrix<bf16> as_bf16(rows, cols);
  Matrix<half> as_half(rows, cols);
  Matrix<double> as_double(rows, cols);
  Backend::convert(ctx(), cview(src), as_bf16.view());
  Backend::convert(ctx(), cview(src), as_half.view());
  Backend::convert(ctx(), cview(src), as_double.view());
  const auto bf = download(ctx(), as_bf16), hf = download(ctx(), as_half);
  const auto db = download<double>(ctx(), as_double);
  EXPECT_EQ(bf[0], 1.0f);
  EXPECT_EQ(bf[1], 1.0f + 0x1p-6f);
  for (std::size_t i = 0; i < values.size(); ++i) {
    EXPECT_EQ(bf[i], value_cast<float>(__float2bfloat16_rn(values[i]))) << i;
    EXPECT_EQ(hf[i], __half2float(__float2half_rn(values[i]))) << i;
    EXPECT_EQ(db[i], static_cast<double>(values[i])) << i;
  }
  // Back from bf16 to fp32 is exact.
  Matrix<float> back(rows, cols);
  Backend::convert(ctx(), cview(as_bf16), back.view());
  EXPECT_EQ(download(ctx(), back), bf);
}

TEST_F(CudaTest, AddRowVectorAddScaledAndScaleMatchCpu) {
  const std::int64_t rows = 19, cols = 23;
  const auto y0 = uniform(static_cast<std::size_t>(rows * cols), 51);
  const auto x0 = uniform(static_cast<std::size_t>(rows * cols), 52);
  const auto bias0 = uniform(static_cast<std::size_t>(cols), 53);
  lora::cpu::Context cpu;
  lora::cpu::Matrix<float> y_cpu(rows, cols);
  std::copy(y0.begin(), y0.end(), y_cpu.data());
  const MatrixView<const float, HostSpace> x_cpu(x0.data(), rows, cols), bias_cpu(bias0.data(), 1, cols);
  lora::cpu::Backend::add_row_vector(cpu, y_cpu.view(), bias_cpu);
  lora::cpu::Backend::add_scaled(cpu, -0.37, x_cpu, y_cpu.view());
  lora::cpu::Backend::scale(cpu, y_cpu.view(), 1.3);

  auto y = padded<float>(ctx(), y0, rows, cols, 2);
  auto x = upload<float>(ctx(), x0, rows, cols);
  auto bias = upload<float>(ctx(), bias0, 1, cols);
  Backend::add_row_vector(ctx(), y.view, cview(bias));
  Backend::add_scaled(ctx(), -0.37, cview(x), y.view);
  Backend::scale(ctx(), y.view, 1.3);
  const auto gpu = values_of(ctx(), y.view);
  EXPECT_EQ(std::memcmp(gpu.data(), y_cpu.data(), gpu.size() * sizeof(float)), 0);
  for (float v : padding_of(ctx(), y)) EXPECT_EQ(v, 7.0f);

  // Scaling by zero never reads x: NaN becomes 0.
  poison(ctx(), y.view);
  Backend::scale(ctx(), y.view, 0.0);
  for (float v : values_of(ctx(), y.view)) EXPECT_EQ(v, 0.0f);
}

TEST_F(CudaTest, AddScaledIntoBf16RoundsOnceFromDouble) {
  const std::int64_t rows = 7, cols = 9;
  const auto y0 = round_to<bf16>(uniform(static_cast<std::size_t>(rows * cols), 54));
  const auto x0 = uniform(static_cast<std::size_t>(rows * cols), 55);
  auto y = upload<bf16>(ctx(), y0, rows, cols);
  auto x = upload<float>(ctx(), x0, rows, cols);
  Backend::add_scaled(ctx(), 0.01, cview(x), y.view());
  const auto out = download(ctx(), y);
  for (std::size_t i = 0; i < out.size(); ++i) {
    const double exact = static_cast<double>(y0[i]) + 0.01 * static_cast<double>(x0[i]);
    EXPECT_EQ(out[i], value_cast<float>(__double2bfloat16(exact))) << i;
  }
}

TEST_F(CudaTest, SumSquaresAccumulatesInDouble) {
  const std::int64_t rows = 1031, cols = 37;  // more rows than reduction blocks
  const auto values = uniform(static_cast<std::size_t>(rows * cols), 61, -2.0f, 2.0f);
  auto x = padded<float>(ctx(), values, rows, cols, 4, 1e6f);  // huge padding: any read of it shows
  double expected = 0.0;
  for (float v : values) expected += static_cast<double>(v) * v;
  EXPECT_NEAR(Backend::sum_squares(ctx(), cview(x.view)), expected, 1e-12 * expected);
  auto b = upload<bf16>(ctx(), round_to<bf16>(values), rows, cols);
  double expected_bf16 = 0.0;
  for (float v : round_to<bf16>(values)) expected_bf16 += static_cast<double>(v) * v;
  EXPECT_NEAR(Backend::sum_squares(ctx(), cview(b)), expected_bf16, 1e-12 * expected_bf16);
  Matrix<float> empty(0, 4);
  EXPECT_EQ(Backend::sum_squares(ctx(), cview(empty)), 0.0);
}

// Many tensors in one call (one transfer): each sum is what sum_squares gives
// alone, bit for bit (the same kernels, partials shared in stream order),
// empty views included; the scratch grows from 3 to 40 results.
TEST_F(CudaTest, SumSquaresEachEqualsOneCallPerTensor) {
  std::vector<Matrix<float>> tensors;
  for (int t = 0; t < 40; ++t) {
    const std::int64_t rows = t % 7 == 3 ? 0 : 1 + 97 * (t % 5), cols = 1 + 13 * (t % 3);
    tensors.push_back(upload<float>(ctx(), uniform(static_cast<std::size_t>(rows * cols), 80 + t), rows, cols));
  }
  for (const std::size_t count : {std::size_t{3}, std::size_t{40}}) {
    std::vector<MatrixView<const float, DeviceSpace>> views;
    std::vector<double> alone;
    for (std::size_t t = 0; t < count; ++t) {
      views.push_back(cview(tensors[t]));
      alone.push_back(Backend::sum_squares(ctx(), views.back()));
    }
    std::vector<double> sums(count, -1.0);
    Backend::sum_squares_each(ctx(), views.data(), count, sums.data());
    EXPECT_EQ(sums, alone);
    if (count > 3) EXPECT_EQ(sums[3], 0.0);  // tensor 3 is empty (in the call of 40)
  }
}

// gemm_grouped against one gemm per term: 1, 3 and 17 terms of different
// shapes (k = 1, k = 64 and odd sizes; one term with k = 0, c = beta c; one
// empty), in the two op pairs of the LoRA path, beta 0 on outputs that start
// as NaN (never read) and beta 1 on values. With `shift`, every operand and
// output is a view that starts one row into its matrix, as a segment's rows
// do inside a batch: with odd widths its pointer is not 16-byte aligned.
template <class Tin, class Tout>
void expect_grouped_equals_one_gemm_per_term(Context& ctx, std::int64_t shift = 0) {
  for (const auto& [op_a, op_b] : {std::pair{Op::N, Op::T}, std::pair{Op::T, Op::N}}) {
    for (const int count : {1, 3, 17}) {
      SCOPED_TRACE(::testing::Message() << count << " terms, op_a " << (op_a == Op::N ? "N" : "T") << ", shift "
                                        << shift);
      std::vector<Matrix<Tin>> as, bs;
      std::vector<Matrix<Tout>> grouped, single;
      std::vector<lora::GemmTerm<Tin, Tout, DeviceSpace>> terms;
      std::vector<double> alphas, betas;
      // A rows x cols operand `shift` rows into its matrix.
      auto make = [&](auto tag, std::int64_t rows, std::int64_t cols, std::uint64_t seed) {
        using U = decltype(tag);
        return upload<U>(ctx, uniform(static_cast<std::size_t>((rows + shift) * cols), seed), rows + shift, cols);
      };
      auto at = [&](auto& m) { return m.view().row_block(shift, m.rows() - shift); };
      for (int t = 0; t < count; ++t) {
        const std::int64_t m = t == 5 ? 0 : 1 + (37 * t) % 53, n = t == 1 ? 64 : 1 + (11 * t) % 19;
        const std::int64_t k = t == 2 ? 0 : t == 0 ? 1 : t == 3 ? 64 : 1 + (29 * t) % 67;
        const double beta = t == 2 ? 0.5 : t % 2 == 0 ? 0.0 : 1.0;
        alphas.push_back(0.5 + 0.25 * t);
        betas.push_back(beta);
        const auto seed = static_cast<std::uint64_t>(100 + 3 * t);
        as.push_back(op_a == Op::N ? make(Tin{}, m, k, seed) : make(Tin{}, k, m, seed));
        bs.push_back(op_b == Op::N ? make(Tin{}, k, n, seed + 1) : make(Tin{}, n, k, seed + 1));
        grouped.push_back(make(Tout{}, m, n, seed + 2));
        single.push_back(make(Tout{}, m, n, seed + 2));
        if (beta == 0.0) {
          poison(ctx, at(grouped.back()));
          poison(ctx, at(single.back()));
        }
      }
      for (int t = 0; t < count; ++t) terms.push_back({alphas[t], at(as[t]), at(bs[t]), betas[t], at(grouped[t])});
      Backend::gemm_grouped<Tin, Tout>(ctx, op_a, op_b, terms);
      for (int t = 0; t < count; ++t) {
        Backend::gemm<Tin, Tout>(ctx, op_a, op_b, alphas[t], at(as[t]), at(bs[t]), betas[t], at(single[t]));
        const std::vector<double> got = download<double>(ctx, grouped[t]), want = download<double>(ctx, single[t]);
        if (want.empty()) continue;
        EXPECT_LE(rel_err(got, want), parity_tolerance<Tout>()) << "term " << t;
      }
    }
  }
}

TEST_F(CudaTest, GemmGroupedEqualsOneGemmPerTerm) {
  expect_grouped_equals_one_gemm_per_term<float, float>(ctx());
  expect_grouped_equals_one_gemm_per_term<double, double>(ctx());
  expect_grouped_equals_one_gemm_per_term<bf16, bf16>(ctx());
  expect_grouped_equals_one_gemm_per_term<half, half>(ctx());
  expect_grouped_equals_one_gemm_per_term<bf16, float>(ctx());  // the gradients' kind
  // Views at odd offsets: the 16-bit and TF32 grouped launches need 16-byte
  // aligned pointers; misaligned terms run one gemm each, with the same result.
  expect_grouped_equals_one_gemm_per_term<bf16, bf16>(ctx(), 1);
  expect_grouped_equals_one_gemm_per_term<half, half>(ctx(), 1);
  expect_grouped_equals_one_gemm_per_term<float, float>(ctx(), 1);
}

TEST_F(CudaTest, GatherAndScatterAddRows) {
  const std::int64_t m = 5, c = 7;
  const auto src0 = uniform(static_cast<std::size_t>(m * c), 71);
  auto src = upload<float>(ctx(), src0, m, c);
  const std::vector<std::int64_t> rows_host = {4, 0, 2};
  Matrix<std::int64_t> rows(1, 3);
  Backend::copy_from_host(ctx(), MatrixView<const std::int64_t, HostSpace>(rows_host.data(), 1, 3), rows.view());
  Matrix<float> gathered(3, c);
  Backend::gather_rows(ctx(), cview(src), cview(rows), gathered.view());
  const auto g = download(ctx(), gathered);
  for (std::int64_t i = 0; i < 3; ++i)
    for (std::int64_t j = 0; j < c; ++j) EXPECT_EQ(g[i * c + j], src0[rows_host[i] * c + j]);
  // dst[rows[i]] += gathered[i] doubles the three chosen rows of src.
  Backend::scatter_add_rows(ctx(), cview(gathered), cview(rows), src.view());
  const auto s = download(ctx(), src);
  for (std::int64_t i = 0; i < m; ++i) {
    const bool chosen = i == 4 || i == 0 || i == 2;
    for (std::int64_t j = 0; j < c; ++j) EXPECT_EQ(s[i * c + j], (chosen ? 2.0f : 1.0f) * src0[i * c + j]);
  }
  const std::vector<std::int64_t> bad = {1, 5, 0}, repeated = {1, 1, 0};
  Backend::copy_from_host(ctx(), MatrixView<const std::int64_t, HostSpace>(bad.data(), 1, 3), rows.view());
  EXPECT_THROW(Backend::gather_rows(ctx(), cview(src), cview(rows), gathered.view()), lora::Error);
  Backend::copy_from_host(ctx(), MatrixView<const std::int64_t, HostSpace>(repeated.data(), 1, 3), rows.view());
  EXPECT_THROW(Backend::scatter_add_rows(ctx(), cview(gathered), cview(rows), src.view()), lora::Error);
}

// ---- Adam ----------------------------------------------------------------------

// The fused kernel against the CPU backend's loop on identical inputs.
void expect_adam_matches_cpu(Context& ctx, const std::vector<std::int64_t>& sizes, bool decoupled) {
  struct Tensors {
    std::vector<float> param, grad, m, v;
  };
  std::vector<Tensors> host;
  std::vector<Matrix<float>> device;  // param, grad, m, v per slot
  for (std::size_t s = 0; s < sizes.size(); ++s) {
    const auto n = static_cast<std::size_t>(sizes[s]);
    Tensors t{uniform(n, 100 + s), uniform(n, 200 + s), uniform(n, 300 + s, -0.1f, 0.1f),
              uniform(n, 400 + s, 0.0f, 0.01f)};
    for (const auto* values : {&t.param, &t.grad, &t.m, &t.v}) device.push_back(upload<float>(ctx, *values, 1, sizes[s]));
    host.push_back(std::move(t));
  }
  std::vector<lora::AdamSlot<float>> cpu_slots, gpu_slots;
  for (std::size_t s = 0; s < sizes.size(); ++s) {
    const float lr = 1e-2f * static_cast<float>(s % 3 + 1), wd = 0.05f * static_cast<float>(s % 2);
    cpu_slots.push_back({host[s].param.data(), host[s].grad.data(), host[s].m.data(), host[s].v.data(), sizes[s], lr, wd});
    gpu_slots.push_back({device[4 * s].data(), device[4 * s + 1].data(), device[4 * s + 2].data(),
                         device[4 * s + 3].data(), sizes[s], lr, wd});
  }
  lora::cpu::Context cpu;
  for (int t = 1; t <= 3; ++t) {
    lora::AdamStep<float> h{0.9f, 0.999f, 1e-8f, static_cast<float>(1.0 - std::pow(0.9, t)),
                            static_cast<float>(std::sqrt(1.0 - std::pow(0.999, t))), decoupled};
    lora::cpu::Backend::adam_step(cpu, cpu_slots.data(), cpu_slots.size(), h);
    Backend::adam_step(ctx, gpu_slots.data(), gpu_slots.size(), h);
  }
  for (std::size_t s = 0; s < sizes.size(); ++s) {
    SCOPED_TRACE(::testing::Message() << "slot " << s);
    EXPECT_LE(rel_err(download(ctx, device[4 * s]), host[s].param), 1e-6);
    EXPECT_LE(rel_err(download(ctx, device[4 * s + 2]), host[s].m), 1e-6);
    EXPECT_LE(rel_err(download(ctx, device[4 * s + 3]), host[s].v), 1e-6);
    if (::testing::Test::HasFailure()) return;
  }
}

TEST_F(CudaTest, FusedAdamAndAdamWMatchTheCpuStepByStep) {
  for (bool decoupled : {false, true}) {
    SCOPED_TRACE(decoupled ? "AdamW" : "Adam");
    expect_adam_matches_cpu(ctx(), {37 * 5, 45 * 5, 1, 0, 4099}, decoupled);
  }
}

TEST_F(CudaTest, FusedAdamCoversMoreSlotsThanOneLaunchHolds) {
  std::vector<std::int64_t> sizes(static_cast<std::size_t>(lora::cuda::kernels::kAdamSlotsPerLaunch + 45));
  for (std::size_t s = 0; s < sizes.size(); ++s) sizes[s] = static_cast<std::int64_t>(s % 7 + 1);
  expect_adam_matches_cpu(ctx(), sizes, true);
}

// ---- copies and buffers ----------------------------------------------------------

TEST_F(CudaTest, CopiesHonourStridesOnBothSides) {
  const std::int64_t rows = 6, cols = 5, host_stride = 8;
  std::vector<float> host(static_cast<std::size_t>(rows * host_stride), -1.0f);
  for (std::int64_t i = 0; i < rows; ++i)
    for (std::int64_t j = 0; j < cols; ++j) host[i * host_stride + j] = static_cast<float>(10 * i + j);
  auto dev = padded<float>(ctx(), std::vector<float>(static_cast<std::size_t>(rows * cols), 0.0f), rows, cols, 3);
  Backend::copy_from_host(ctx(), MatrixView<const float, HostSpace>(host.data(), rows, cols, host_stride), dev.view);
  std::vector<float> back(static_cast<std::size_t>(rows * host_stride), -2.0f);
  Backend::copy_to_host(ctx(), MatrixView<const float, DeviceSpace>(dev.view),
                        MatrixView<float, HostSpace>(back.data(), rows, cols, host_stride));
  for (std::int64_t i = 0; i < rows; ++i) {
    for (std::int64_t j = 0; j < host_stride; ++j) {
      EXPECT_EQ(back[i * host_stride + j], j < cols ? static_cast<float>(10 * i + j) : -2.0f) << i << ", " << j;
    }
  }
  for (float v : padding_of(ctx(), dev)) EXPECT_EQ(v, 7.0f);
  std::vector<float> wrong(4);
  EXPECT_THROW(Backend::copy_to_host(ctx(), MatrixView<const float, DeviceSpace>(dev.view),
                                     MatrixView<float, HostSpace>(wrong.data(), 2, 2)),
               lora::Error);
}

TEST_F(CudaTest, MatrixIsZeroedMoveOnlyAndClonesExplicitly) {
  Matrix<float> a(3, 4);
  for (float v : download(ctx(), a)) EXPECT_EQ(v, 0.0f);
  Backend::fill(ctx(), a.view(), 5.0f);
  Matrix<float> copy = a.clone(ctx().stream());
  Matrix<float> copy2 = a.clone();
  Backend::fill(ctx(), a.view(), 6.0f);
  for (float v : download(ctx(), copy)) EXPECT_EQ(v, 5.0f);
  for (float v : download(ctx(), copy2)) EXPECT_EQ(v, 5.0f);
  Matrix<float> moved = std::move(a);
  EXPECT_EQ(moved.rows(), 3);
  EXPECT_EQ(a.rows(), 0);  // NOLINT(bugprone-use-after-move): the moved-from matrix is empty
  EXPECT_EQ(a.data(), nullptr);
  for (float v : download(ctx(), moved)) EXPECT_EQ(v, 6.0f);

  Matrix<float> empty(0, 5);
  EXPECT_EQ(empty.data(), nullptr);
  EXPECT_EQ(empty.bytes(), 0u);
  EXPECT_TRUE(empty.view().empty());
  Matrix<float> empty_copy = empty.clone();
  EXPECT_EQ(empty_copy.cols(), 5);
  Backend::fill(ctx(), empty.view(), 1.0f);  // no launch, no error
}

TEST_F(CudaTest, FailingAllocationThrowsLoraError) {
  try {
    Matrix<float> huge(std::int64_t{1} << 22, std::int64_t{1} << 22);  // 64 TiB
    FAIL() << "a 64 TiB allocation succeeded";
  } catch (const lora::Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("cudaMalloc"), std::string::npos) << what;
    EXPECT_NE(what.find("cudaErrorMemoryAllocation"), std::string::npos) << what;
  }
  // The context still works afterwards.
  Matrix<float> small(2, 2);
  EXPECT_EQ(Backend::sum_squares(ctx(), cview(small)), 0.0);
}

__global__ void noop_kernel() {}

TEST_F(CudaTest, BadLaunchIsReportedByTheLaunchCheck) {
  noop_kernel<<<1, 4096>>>();  // more threads per block than any GPU allows
  try {
    LORA_CUDA_CHECK_LAUNCH();
    FAIL() << "the bad launch was not reported";
  } catch (const lora::Error& e) {
    // The error's name depends on the driver (CUDA 13 on an H200 reports
    // cudaErrorInvalidValue, older ones cudaErrorInvalidConfiguration): check
    // that the message names the failing call, a CUDA error and this file.
    const std::string what = e.what();
    EXPECT_NE(what.find("cudaGetLastError()"), std::string::npos) << what;
    EXPECT_NE(what.find("failed: cudaError"), std::string::npos) << what;
    EXPECT_NE(what.find("test_cuda_backend.cu"), std::string::npos) << what;
  }
  EXPECT_NO_THROW(ctx().synchronize());  // not sticky: the context goes on
}

}  // namespace
