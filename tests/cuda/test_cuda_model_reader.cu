// ModelReader::copy_to<cuda::Backend>: a tensor stored as the device type's
// own dtype arrives bit for bit (BF16 -> __nv_bfloat16, F16 -> __half, F32 ->
// float); another dtype arrives rounded once, as CUDA's own host conversions
// round it. Skips without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "../io_test_util.hpp"
#include "cuda_test_util.cuh"
#include "lora/io/cuda_dtypes.hpp"
#include "lora/io/model_reader.hpp"

namespace {

using lora::cuda::testing::CudaTest;
using lora::io::Dtype;
using lora::io::ModelReader;

class CudaModelReader : public CudaTest {};

template <class T>
std::vector<std::uint16_t> bits_of(const lora::cpu::Matrix<T>& m) {
  std::vector<std::uint16_t> out(static_cast<std::size_t>(m.size()));
  std::memcpy(out.data(), m.data(), out.size() * 2);
  return out;
}

// Device matrix -> host, as T.
template <class T>
lora::cpu::Matrix<T> download(lora::cuda::Context& ctx, const lora::cuda::Matrix<T>& device) {
  return lora::cuda::to_host(ctx, device.view());
}

TEST_F(CudaModelReader, CopiesStoredBytesAsTheyAreAndConvertsTheRestOnce) {
  io_test::TempDir tmp;
  // [3, 70] values in [-1, 1), kept as F32, and the same rounded by the writer to BF16, F16 and F64.
  const std::int64_t rows = 3, cols = 70;
  const std::vector<float> v = lora::cuda::testing::uniform(static_cast<std::size_t>(rows * cols), 11);
  lora::io::SafetensorsWriter w;
  w.add("f32", {rows, cols}, v.data());
  w.add("bf16", {rows, cols}, v.data(), Dtype::BF16);
  w.add("f16", {rows, cols}, v.data(), Dtype::F16);
  w.add("f64", {rows, cols}, v.data(), Dtype::F64);
  w.write(tmp / "model.safetensors");
  const ModelReader model = ModelReader::open(tmp / "model.safetensors");
  lora::cuda::Context& c = ctx();

  // 1. Matching dtypes: the stored bytes.
  lora::cuda::Matrix<__nv_bfloat16> bf16(rows, cols);
  model.copy_to<lora::cuda::Backend>(c, "bf16", bf16.view());
  const std::vector<std::uint8_t> stored_bf16 = model.shard_of("bf16").read_bytes("bf16");
  std::vector<std::uint16_t> want(stored_bf16.size() / 2);
  std::memcpy(want.data(), stored_bf16.data(), stored_bf16.size());
  EXPECT_EQ(bits_of(download(c, bf16)), want);

  lora::cuda::Matrix<__half> f16(rows, cols);
  model.copy_to<lora::cuda::Backend>(c, "f16", f16.view());
  const std::vector<std::uint8_t> stored_f16 = model.shard_of("f16").read_bytes("f16");
  std::memcpy(want.data(), stored_f16.data(), stored_f16.size());
  EXPECT_EQ(bits_of(download(c, f16)), want);

  lora::cuda::Matrix<float> f32(rows, cols);
  model.copy_to<lora::cuda::Backend>(c, "f32", f32.view());
  const lora::cpu::Matrix<float> f32_back = download(c, f32);
  EXPECT_EQ(std::vector<float>(f32_back.data(), f32_back.data() + f32_back.size()), v);

  // 2. Converting: F32 -> bf16 and F64 -> fp16 on the device equal CUDA's own host rounding of the same floats.
  lora::cuda::Matrix<__nv_bfloat16> from_f32(rows, cols);
  model.copy_to<lora::cuda::Backend>(c, "f32", from_f32.view());
  lora::cuda::Matrix<__half> from_f64(rows, cols);
  model.copy_to<lora::cuda::Backend>(c, "f64", from_f64.view());
  const lora::cpu::Matrix<__nv_bfloat16> a = download(c, from_f32);
  const lora::cpu::Matrix<__half> b = download(c, from_f64);
  int mismatches = 0;
  for (std::int64_t i = 0; i < rows * cols; ++i) {
    const float x = v[static_cast<std::size_t>(i)];
    mismatches += __bfloat162float(a.data()[i]) != __bfloat162float(__float2bfloat16_rn(x));
    mismatches += __half2float(b.data()[i]) != __half2float(__float2half_rn(x));  // F64 of a float is that float
  }
  EXPECT_EQ(mismatches, 0);

  // 3. A wrong shape is refused before any copy.
  lora::cuda::Matrix<float> wrong(cols, rows);
  EXPECT_THROW(model.copy_to<lora::cuda::Backend>(c, "f32", wrong.view()), lora::Error);
}

}  // namespace
