// The stored dtypes of the CUDA backend's 16-bit element types, for ModelReader:
// a BF16 tensor is copied to a __nv_bfloat16 matrix, and an F16 tensor to a
// __half one, as the bytes lie in the file; other dtypes are rounded once to
// them on the host. Host code: needs the CUDA toolkit's headers, not nvcc.
//
//   lora::cuda::Matrix<__nv_bfloat16> W(rows, cols);
//   model.copy_to<lora::cuda::Backend>(ctx, "model.layers.0.mlp.down_proj.weight", W.view());
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "lora/io/model_reader.hpp"

namespace lora::io {

static_assert(sizeof(__nv_bfloat16) == 2 && sizeof(__half) == 2, "the 16-bit CUDA types hold their bits and nothing else");

template <>
struct StoredDtype<__nv_bfloat16> {
  static constexpr Dtype value = Dtype::BF16;
};
template <>
struct StoredDtype<__half> {
  static constexpr Dtype value = Dtype::F16;
};

}  // namespace lora::io
