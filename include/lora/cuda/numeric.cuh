// The element types of the CUDA backend: fp32, fp64, bf16 and fp16. For each,
// the type kernels compute in (fp32 for the 16-bit types), cuBLAS's name for
// it, and correctly rounded conversions usable on host and device. Also the
// ParamType specialisations: bf16/fp16 layers keep fp32 master weights.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <library_types.h>

#include <type_traits>

#include "lora/core/backend.hpp"
#include "lora/core/matrix_view.hpp"  // LORA_HOST_DEVICE

namespace lora {

// A, B, their gradients and Adam state stay in fp32 when the activations are
// 16-bit; the layer keeps 16-bit copies of A and B for its GEMMs.
template <>
struct ParamType<__nv_bfloat16> {
  using type = float;
};
template <>
struct ParamType<__half> {
  using type = float;
};

}  // namespace lora

namespace lora::cuda {

template <class T>
struct Numeric;  // only the four types below are supported
template <>
struct Numeric<float> {
  using compute = float;
  static constexpr cudaDataType_t kDataType = CUDA_R_32F;
  static constexpr const char* kName = "fp32";
};
template <>
struct Numeric<double> {
  using compute = double;
  static constexpr cudaDataType_t kDataType = CUDA_R_64F;
  static constexpr const char* kName = "fp64";
};
template <>
struct Numeric<__nv_bfloat16> {
  using compute = float;
  static constexpr cudaDataType_t kDataType = CUDA_R_16BF;
  static constexpr const char* kName = "bf16";
};
template <>
struct Numeric<__half> {
  using compute = float;
  static constexpr cudaDataType_t kDataType = CUDA_R_16F;
  static constexpr const char* kName = "fp16";
};

// The type a kernel computes in for elements of T.
template <class T>
using compute_t = typename Numeric<std::remove_const_t<T>>::compute;

template <class T>
inline constexpr bool is_16bit_v = std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>;

// To(x) rounded to nearest even, exactly once: 16-bit values widen exactly to
// fp32 first; fp32/fp64 values narrow straight to the target.
template <class To, class From>
LORA_HOST_DEVICE inline To value_cast(From x) {
  if constexpr (std::is_same_v<To, From>) {
    return x;
  } else if constexpr (std::is_same_v<From, __nv_bfloat16>) {
    return value_cast<To>(__bfloat162float(x));
  } else if constexpr (std::is_same_v<From, __half>) {
    return value_cast<To>(__half2float(x));
  } else if constexpr (std::is_same_v<To, __nv_bfloat16>) {
    if constexpr (std::is_same_v<From, double>) {
      return __double2bfloat16(x);
    } else {
      return __float2bfloat16_rn(static_cast<float>(x));
    }
  } else if constexpr (std::is_same_v<To, __half>) {
    if constexpr (std::is_same_v<From, double>) {
      return __double2half(x);
    } else {
      return __float2half_rn(static_cast<float>(x));
    }
  } else {
    return static_cast<To>(x);
  }
}

}  // namespace lora::cuda
