// NF4 on the CUDA backend against the host format code (quant/nf4.hpp) and
// the CPU backend's Nf4Base: the GPU quantizer's bytes and absmax equal
// nf4::quantize_blocks' (fp32, fp64, bf16, fp16 input; strided; odd n; a
// block of zeros; several block sizes), the GPU dequantizer's values equal
// nf4::dequantize_rows' bit for bit (with and without double quantization,
// from a row inside the weight, a partial last block), Nf4Base::quantize on
// the GPU equals nf4::quantize byte for byte, and the GPU Nf4Base's forward
// and input gradient match the CPU one's within the parity bounds of
// test_cuda_linear.cu, whatever the tile height. Outputs are poisoned first,
// so a value the GPU fails to write fails the comparison.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/cuda_test_util.cuh"

namespace {

using namespace lora::cuda::testing;  // NOLINT(google-build-using-namespace)
using lora::HostSpace;
using lora::MatrixView;
using lora::cuda::Backend;
using lora::cuda::Context;
using lora::cuda::DeviceSpace;
using lora::cuda::Matrix;
using lora::cuda::value_cast;
namespace nf4 = lora::nf4;

template <class T>
class CudaNf4 : public CudaTest {};
using Nf4Types = ::testing::Types<float, double, __nv_bfloat16, __half>;
TYPED_TEST_SUITE(CudaNf4, Nf4Types);

// rows x cols values of W (flattened row-major), uniform in [-1, 1) and
// rounded to T, with flat indices [zero_first, zero_last) set to 0.
template <class T>
std::vector<float> weight_values(std::int64_t rows, std::int64_t cols, std::uint64_t seed, std::int64_t zero_first = 0,
                                 std::int64_t zero_last = 0) {
  std::vector<float> w = round_to<T>(uniform(static_cast<std::size_t>(rows * cols), seed));
  for (std::int64_t i = zero_first; i < zero_last; ++i) w[static_cast<std::size_t>(i)] = 0.0f;
  return w;
}

// A device matrix of rows x stride values of T whose first cols columns hold
// `values` (rows x cols) and the rest a value no block should see (100).
template <class T>
Matrix<T> upload_strided(Context& ctx, const std::vector<float>& values, std::int64_t rows, std::int64_t cols,
                         std::int64_t stride) {
  std::vector<float> padded(static_cast<std::size_t>(rows * stride), 100.0f);
  for (std::int64_t i = 0; i < rows; ++i) {
    for (std::int64_t j = 0; j < cols; ++j) {
      padded[static_cast<std::size_t>(i * stride + j)] = values[static_cast<std::size_t>(i * cols + j)];
    }
  }
  return upload<T>(ctx, padded, rows, stride);
}

// 1 x n device copies of host arrays, and back.
template <class U>
Matrix<U> device_copy(Context& ctx, const std::vector<U>& host) {
  return lora::cuda::to_device(ctx, MatrixView<const U, HostSpace>(host.data(), 1, static_cast<std::int64_t>(host.size())));
}
template <class U>
std::vector<U> host_copy(Context& ctx, const Matrix<U>& device) {
  std::vector<U> host(static_cast<std::size_t>(device.size()));
  Backend::copy_to_host(ctx, device.view(), MatrixView<U, HostSpace>(host.data(), 1, device.size()));
  return host;
}

// A quantized weight's arrays in device memory, and the view the kernels read.
struct DeviceWeight {
  Matrix<std::uint8_t> packed, absmax_q;
  Matrix<float> absmax, nested_absmax, nested_code;
  nf4::View<DeviceSpace> view;

  DeviceWeight(Context& ctx, const nf4::Weight& w) {
    packed = device_copy(ctx, w.packed);
    view.packed = packed.data();
    if (w.nested()) {
      absmax_q = device_copy(ctx, w.absmax_q);
      nested_absmax = device_copy(ctx, w.nested_absmax);
      nested_code = device_copy(ctx, w.nested_code);
      view.absmax_q = absmax_q.data();
      view.nested_absmax = nested_absmax.data();
      view.nested_code = nested_code.data();
      view.offset = w.offset;
    } else {
      absmax = device_copy(ctx, w.absmax);
      view.absmax = absmax.data();
    }
    view.rows = w.rows;
    view.cols = w.cols;
    view.blocksize = w.blocksize;
    view.nested_blocksize = w.nested_blocksize;
  }
};

// ---- the backend's ops ---------------------------------------------------------

struct QuantizeCase {
  std::int64_t rows, cols, stride, blocksize;
  std::int64_t zero_first, zero_last;  // a run of zeros (a whole block: absmax 0)
};

TYPED_TEST(CudaNf4, QuantizeBlocksEqualsHostByteForByte) {
  using T = TypeParam;
  const QuantizeCase cases[] = {
      {7, 9, 13, 64, 0, 0},        // strided, n = 63 odd: one partial block, a padded last byte
      {33, 65, 65, 64, 128, 192},  // blocks across rows, block 2 all zeros, partial last block
      {5, 50, 51, 128, 0, 128},    // blocksize 128, the first block all zeros, strided
      {3, 11, 12, 2, 4, 6},        // blocksize 2 (one byte per block), odd n, a zero block
      {2, 700, 700, 256, 0, 0},    // blocksize 256: several values per lane
  };
  Context& ctx = this->ctx();
  for (const QuantizeCase& c : cases) {
    SCOPED_TRACE(::testing::Message() << c.rows << " x " << c.cols << " stride " << c.stride << " blocksize "
                                      << c.blocksize);
    const std::int64_t n = c.rows * c.cols, blocks = (n + c.blocksize - 1) / c.blocksize;
    const std::vector<float> w = weight_values<T>(c.rows, c.cols, 11, c.zero_first, c.zero_last);
    std::vector<std::uint8_t> packed_ref(static_cast<std::size_t>((n + 1) / 2));
    std::vector<float> absmax_ref(static_cast<std::size_t>(blocks));
    nf4::quantize_blocks(w.data(), c.rows, c.cols, c.cols, c.blocksize, packed_ref.data(), absmax_ref.data());
    // The zero block: absmax 0 and every index 0 (nf4.hpp: 0 * (1 / 0) is NaN, index 0).
    for (std::int64_t b = c.zero_first / c.blocksize; b < c.zero_last / c.blocksize; ++b) {
      EXPECT_EQ(absmax_ref[static_cast<std::size_t>(b)], 0.0f) << "block " << b;
      EXPECT_EQ(packed_ref[static_cast<std::size_t>(b * c.blocksize / 2)], 0) << "block " << b;
    }

    const Matrix<T> W = upload_strided<T>(ctx, w, c.rows, c.cols, c.stride);
    Matrix<std::uint8_t> packed(1, (n + 1) / 2);
    Matrix<float> absmax(1, blocks);
    LORA_CUDA_CHECK(cudaMemset(packed.data(), 0xAB, packed.bytes()));  // poison: every byte must be written
    LORA_CUDA_CHECK(cudaMemset(absmax.data(), 0xFF, absmax.bytes()));  // NaN
    Backend::nf4_quantize_blocks<T>(ctx, W.view().col_block(0, c.cols), c.blocksize, packed.data(),
                                    absmax.data());
    const std::vector<std::uint8_t> packed_gpu = host_copy(ctx, packed);
    const std::vector<float> absmax_gpu = host_copy(ctx, absmax);
    EXPECT_EQ(packed_gpu, packed_ref);
    ASSERT_EQ(absmax_gpu.size(), absmax_ref.size());
    EXPECT_EQ(std::memcmp(absmax_gpu.data(), absmax_ref.data(), absmax_ref.size() * sizeof(float)), 0);
  }
}

struct DequantizeCase {
  std::int64_t rows, cols, blocksize;
  bool double_quant;
  std::int64_t nested_blocksize;
  std::int64_t first_row, count;
};

TYPED_TEST(CudaNf4, DequantizeRowsEqualsHostBitForBit) {
  using T = TypeParam;
  const DequantizeCase cases[] = {
      {11, 37, 64, false, 256, 3, 7},   // blocks across rows, n = 407: a 23-value last block
      {11, 37, 64, true, 256, 0, 11},   // double quantization, the whole weight
      {13, 50, 64, true, 3, 5, 8},      // 11 blocks in 4 nested blocks, up to the last row
      {9, 5, 2, true, 4, 2, 6},         // blocksize 2 (several blocks per thread's run), odd n
      {4, 300, 128, false, 256, 1, 2},  // blocksize 128, rows longer than a thread's run
  };
  Context& ctx = this->ctx();
  for (const DequantizeCase& c : cases) {
    SCOPED_TRACE(::testing::Message() << c.rows << " x " << c.cols << " blocksize " << c.blocksize << " double_quant "
                                      << c.double_quant << " rows [" << c.first_row << ", " << c.first_row + c.count
                                      << ")");
    // Block 1 all zeros (dequantized to -0: 0 * code value -1).
    const std::vector<float> w = weight_values<float>(c.rows, c.cols, 12, c.blocksize, 2 * c.blocksize);
    nf4::Options options;
    options.blocksize = c.blocksize;
    options.double_quant = c.double_quant;
    options.nested_blocksize = c.nested_blocksize;
    const nf4::Weight q = nf4::quantize(w.data(), c.rows, c.cols, c.cols, options);
    ASSERT_EQ(q.nested(), c.double_quant);

    // The host's values, then rounded to T (the host dequantizer runs in float).
    std::vector<float> ref_float(static_cast<std::size_t>(c.count * c.cols));
    nf4::dequantize_rows(q.view(), c.first_row, c.count, ref_float.data(), c.cols);
    const std::vector<T> ref = cast_all<T>(ref_float);

    const DeviceWeight device(ctx, q);
    const std::int64_t ld = c.cols + 3;  // a strided output
    Matrix<T> out(c.count, ld);
    poison(ctx, out.view());
    Backend::nf4_dequantize_rows<T>(ctx, device.view, c.first_row, out.view().col_block(0, c.cols));
    const std::vector<T> all = download<T>(ctx, out);
    std::vector<T> gpu;
    for (std::int64_t r = 0; r < c.count; ++r) gpu.insert(gpu.end(), all.begin() + r * ld, all.begin() + r * ld + c.cols);
    ASSERT_EQ(gpu.size(), ref.size());
    EXPECT_EQ(std::memcmp(gpu.data(), ref.data(), ref.size() * sizeof(T)), 0);
    // The padding columns were left alone (still NaN).
    EXPECT_TRUE(std::isnan(value_cast<float>(all[static_cast<std::size_t>(c.cols)])));
  }
}

TEST_F(CudaTest, Nf4OpsRejectBadArguments) {
  Context& ctx = this->ctx();
  const std::vector<float> w = weight_values<float>(4, 8, 13);
  const nf4::Weight q = nf4::quantize(w.data(), 4, 8, 8);
  const DeviceWeight device(ctx, q);
  Matrix<float> out(3, 8), wrong_cols(1, 7);
  EXPECT_THROW(Backend::nf4_dequantize_rows<float>(ctx, device.view, 2, out.view()), lora::Error);  // rows 2..5 of 4
  EXPECT_THROW(Backend::nf4_dequantize_rows<float>(ctx, device.view, 0, wrong_cols.view()), lora::Error);
  Matrix<std::uint8_t> packed(1, 16);
  Matrix<float> absmax(1, 1);
  const Matrix<float> W = upload<float>(ctx, w, 4, 8);
  EXPECT_THROW(Backend::nf4_quantize_blocks<float>(ctx, W.view(), 63, packed.data(), absmax.data()), lora::Error);
  EXPECT_THROW(Backend::nf4_quantize_blocks<float>(ctx, W.view(), 64, nullptr, absmax.data()), lora::Error);
}

// ---- Nf4Base on the GPU --------------------------------------------------------

TYPED_TEST(CudaNf4, BaseQuantizeEqualsHostQuantize) {
  using T = TypeParam;
  Context& ctx = this->ctx();
  constexpr std::int64_t rows = 45, cols = 53, stride = 60;  // 2385 values: 38 blocks, the last of 17
  const std::vector<float> w = weight_values<T>(rows, cols, 14, 64, 128);
  const Matrix<T> W = upload_strided<T>(ctx, w, rows, cols, stride);
  for (const bool double_quant : {true, false}) {
    SCOPED_TRACE(::testing::Message() << "double_quant " << double_quant);
    nf4::Options options;
    options.double_quant = double_quant;
    options.nested_blocksize = 16;  // 3 nested blocks
    const nf4::Weight ref = nf4::quantize(w.data(), rows, cols, cols, options);
    const auto base = lora::cuda::Nf4Base<T>::quantize(ctx, W.view().col_block(0, cols), options);
    const nf4::Weight got = base.to_host();
    EXPECT_EQ(got.rows, rows);
    EXPECT_EQ(got.cols, cols);
    EXPECT_EQ(got.blocksize, ref.blocksize);
    EXPECT_EQ(got.packed, ref.packed);
    ASSERT_EQ(got.nested(), double_quant);
    const auto same_floats = [](const std::vector<float>& a, const std::vector<float>& b) {
      return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
    };
    EXPECT_TRUE(same_floats(got.absmax, ref.absmax));
    EXPECT_EQ(got.absmax_q, ref.absmax_q);
    EXPECT_TRUE(same_floats(got.nested_absmax, ref.nested_absmax));
    EXPECT_TRUE(same_floats(got.nested_code, ref.nested_code));
    EXPECT_EQ(std::memcmp(&got.offset, &ref.offset, sizeof(float)), 0);
    EXPECT_EQ(got.nested_blocksize, ref.nested_blocksize);
    EXPECT_EQ(base.bytes(), ref.bytes());

    // And the dense W it stands for, whole, equals the host's dequantized W in T.
    Matrix<T> dense(rows, cols);
    poison(ctx, dense.view());
    base.dequantize(dense.view());
    const std::vector<T> expected = cast_all<T>(nf4::dequantize<float>(ref));
    const std::vector<T> got_dense = download<T>(ctx, dense);
    EXPECT_EQ(std::memcmp(got_dense.data(), expected.data(), expected.size() * sizeof(T)), 0);
  }
}

struct BaseCase {
  std::int64_t d_out, d_in, n;
  bool fan_in_fan_out, bias, double_quant;
};

TYPED_TEST(CudaNf4, BaseForwardAndInputGradientMatchTheCpu) {
  using T = TypeParam;
  Context& ctx = this->ctx();
  const double tol = parity_tolerance<T>();
  const BaseCase cases[] = {
      {45, 53, 37, false, true, true},   // sizes that fit no tile or block, a partial last block
      {45, 53, 37, true, false, true},   // fan_in_fan_out (W stored 53 x 45)
      {130, 67, 9, false, false, false}, // without double quantization
      {31, 70, 1, true, true, false},    // N = 1
  };
  for (const BaseCase& c : cases) {
    SCOPED_TRACE(::testing::Message() << c.d_out << " x " << c.d_in << " N " << c.n << " fan_in_fan_out "
                                      << c.fan_in_fan_out << " bias " << c.bias << " double_quant " << c.double_quant);
    const std::int64_t rows = c.fan_in_fan_out ? c.d_in : c.d_out, cols = c.fan_in_fan_out ? c.d_out : c.d_in;
    // Inputs rounded to T, so both sides start from the same numbers; W's
    // scale ~ 1/sqrt(d_in) keeps y of order one.
    const std::vector<float> w = uniform(static_cast<std::size_t>(rows * cols), 21, -0.15f, 0.15f);
    const std::vector<float> bias = round_to<T>(uniform(static_cast<std::size_t>(c.d_out), 22));
    const std::vector<float> x = round_to<T>(uniform(static_cast<std::size_t>(c.n * c.d_in), 23));
    const std::vector<float> dL_dy = round_to<T>(uniform(static_cast<std::size_t>(c.n * c.d_out), 24));
    nf4::Options options;
    options.double_quant = c.double_quant;
    const nf4::Weight q = nf4::quantize(w.data(), rows, cols, cols, options);

    // The CPU base in fp32 (fp64 for fp64).
    using R = std::conditional_t<std::is_same_v<T, double>, double, float>;
    lora::cpu::Context cpu_ctx;
    const std::vector<R> cpu_bias = cast_all<R>(bias), cpu_x = cast_all<R>(x), cpu_dL_dy = cast_all<R>(dL_dy);
    std::vector<R> cpu_y(static_cast<std::size_t>(c.n * c.d_out)), cpu_dL_dx(static_cast<std::size_t>(c.n * c.d_in));
    const lora::cpu::Nf4Base<R> cpu(cpu_ctx, q,
                                    c.bias ? MatrixView<const R, HostSpace>(cpu_bias.data(), 1, c.d_out)
                                           : MatrixView<const R, HostSpace>(),
                                    c.fan_in_fan_out);
    cpu.forward({cpu_x.data(), c.n, c.d_in}, {cpu_y.data(), c.n, c.d_out});
    cpu.backward_input({cpu_dL_dy.data(), c.n, c.d_out}, {cpu_dL_dx.data(), c.n, c.d_in});

    const Matrix<T> gpu_bias = upload<T>(ctx, bias, 1, c.d_out), gpu_x = upload<T>(ctx, x, c.n, c.d_in);
    const Matrix<T> gpu_dL_dy = upload<T>(ctx, dL_dy, c.n, c.d_out);
    Matrix<T> gpu_y(c.n, c.d_out), gpu_dL_dx(c.n, c.d_in);
    lora::cuda::Nf4Base<T> gpu(ctx, q, c.bias ? cview(gpu_bias) : MatrixView<const T, DeviceSpace>(), c.fan_in_fan_out);
    ASSERT_EQ(gpu.d_in(), c.d_in);
    ASSERT_EQ(gpu.d_out(), c.d_out);
    // The default tile (all of W here), then tiles of 4 stored rows (the last
    // one shorter), then of 1: each must give the CPU's numbers.
    for (const std::int64_t tile_rows : {std::int64_t{0}, std::int64_t{4}, std::int64_t{1}}) {
      SCOPED_TRACE(::testing::Message() << "tile_rows " << (tile_rows == 0 ? gpu.tile_rows() : tile_rows));
      if (tile_rows > 0) gpu.set_tile_rows(tile_rows);
      poison(ctx, gpu_y.view());
      poison(ctx, gpu_dL_dx.view());
      gpu.forward(cview(gpu_x), gpu_y.view());
      gpu.backward_input(cview(gpu_dL_dy), gpu_dL_dx.view());
      EXPECT_LE(rel_err(download<double>(ctx, gpu_y), cpu_y), tol) << "y";
      EXPECT_LE(rel_err(download<double>(ctx, gpu_dL_dx), cpu_dL_dx), tol) << "dL_dx";
    }
    EXPECT_EQ(gpu.bytes(), q.bytes() + (c.bias ? static_cast<std::size_t>(c.d_out) * sizeof(T) : 0));
  }
}

}  // namespace
