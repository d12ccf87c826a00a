// LORA_CUDA_CHECK / LORA_CUBLAS_CHECK: every CUDA runtime and cuBLAS call of
// the backend goes through one of them, and LORA_CUDA_CHECK_LAUNCH follows
// every kernel launch. A failure throws lora::Error naming the failing
// expression, the file and line, and CUDA's own name for the error.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <sstream>

#include "lora/core/error.hpp"

namespace lora::cuda::detail {

inline void check_cuda(cudaError_t status, const char* expression, const char* file, int line) {
  if (status == cudaSuccess) return;
  // Reset the runtime's last-error slot (for errors that are not sticky), so
  // that the next launch check does not report this failure a second time.
  cudaGetLastError();
  std::ostringstream out;
  out << "CUDA call `" << expression << "` failed: " << cudaGetErrorName(status) << " ("
      << cudaGetErrorString(status) << ")";
  ::lora::detail::throw_error(file, line, out.str());
}

inline void check_cublas(cublasStatus_t status, const char* expression, const char* file, int line) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  std::ostringstream out;
  out << "cuBLAS call `" << expression << "` failed: " << cublasGetStatusName(status) << " ("
      << cublasGetStatusString(status) << ")";
  ::lora::detail::throw_error(file, line, out.str());
}

}  // namespace lora::cuda::detail

#define LORA_CUDA_CHECK(expression) ::lora::cuda::detail::check_cuda((expression), #expression, __FILE__, __LINE__)
#define LORA_CUBLAS_CHECK(expression) \
  ::lora::cuda::detail::check_cublas((expression), #expression, __FILE__, __LINE__)

// After a kernel launch. A bad launch (configuration, no device) is reported
// here; a fault inside the kernel surfaces at the next synchronising call,
// unless LORA_CUDA_SYNC_LAUNCHES is defined, which waits for every kernel so
// that the error points at the launch that caused it (debugging only: slow).
#if defined(LORA_CUDA_SYNC_LAUNCHES)
#define LORA_CUDA_CHECK_LAUNCH()               \
  do {                                         \
    LORA_CUDA_CHECK(cudaGetLastError());       \
    LORA_CUDA_CHECK(cudaDeviceSynchronize());  \
  } while (false)
#else
#define LORA_CUDA_CHECK_LAUNCH() LORA_CUDA_CHECK(cudaGetLastError())
#endif
